"""How long the background prune (every 10 s) holds the spool with a large journal.

    .venv/bin/python tests/bench/bench_prune.py                  # 500,000 journal rows
    .venv/bin/python tests/bench/bench_prune.py --rows 1000000 --letters 100000

Fills a spool's journal with `--rows` uplinks of about 700 bytes, received one millisecond
apart (as 1,000 uplinks/s would), and `--letters` dead letters, then times
`Recovery.prune()` as the daemon runs it: in the steady state (nothing older than the
retention: what every turn but a few finds) and with the oldest 1 % past the retention.
Each is the median of `--repeat` turns; the spool's writer, which live uplinks' commits
wait behind, is held for about that long. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ByteSize

from iotflow.config.model import DeadLetterSettings, JournalSettings
from iotflow.connectors import parse_connection
from iotflow.delivery.recovery import Recovery
from iotflow.routing import RoutingIndex
from iotflow.spool import Delivery, Spool
from iotflow.spool.store import DeadLetter
from iotflow.telemetry.metrics import Metrics

DEV = "0018B20000000A01"
ROUTE = "[[], null, null]"
DOCUMENT = b'{"DevEUI_uplink": {"payload_hex": "' + b"0" * 640 + b'"}}'


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def fill(spool: Spool, rows: int, letters: int, start: float) -> None:
    batch = 2000
    for first in range(0, rows, batch):
        made = await asyncio.gather(
            *(
                spool.append(
                    DOCUMENT,
                    dev_eui=DEV,
                    uplink_time=start + n / 1000,
                    received_at=start + n / 1000,
                    connection_ids=["c"] if n < letters else [],
                    journal=ROUTE,
                )
                for n in range(first, min(first + batch, rows))
            )
        )
        for deliveries in made:
            for delivery in deliveries:
                delivery.attempts = 1
                letter = DeadLetter("failed", "HTTP 400", 400, "", delivery.received_at)
                spool.complete(delivery.id, final=delivery, outcome="failed", letter=letter)
        await spool.flush()


async def turns(recovery: Recovery, repeat: int) -> list[float]:
    taken = []
    for _ in range(repeat):
        started = time.perf_counter()
        await recovery.prune()
        taken.append((time.perf_counter() - started) * 1000)
    return taken


async def run(args: argparse.Namespace, path: Path) -> None:
    spool = await Spool.open(path)
    start = time.time() - args.rows / 1000
    clock = Clock(start + args.rows / 1000)
    connection = parse_connection(
        {
            "id": "c",
            "name": "c",
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": "http://127.0.0.1:9/"},
        }
    )
    index = RoutingIndex([connection], {DEV: ["c"]})

    def ignore(connection_id: str, kind: str, data: dict[str, Any]) -> None: ...

    def dispatch(_: Sequence[Delivery]) -> None: ...

    recovery = Recovery(
        spool=spool,
        dispatch=dispatch,
        index=lambda: index,
        metrics=Metrics(),
        record=ignore,
        journal=JournalSettings(retention=timedelta(hours=24), max_size=ByteSize(1 << 40)),
        letters=DeadLetterSettings(max_per_connection=10**8, retention=timedelta(days=7)),
        window=lambda _: 32,
        clock=clock,
    )
    try:
        began = time.perf_counter()
        await fill(spool, args.rows, args.letters, start)
        size = (await asyncio.to_thread(path.stat)).st_size
        print(
            f"filled {args.rows:,} journal rows and {args.letters:,} dead letters"
            f" in {time.perf_counter() - began:.1f} s ({size / 1e6:,.0f} MB)"
        )
        await recovery.start(prune_every=10**9)
        steady = await turns(recovery, args.repeat)
        print(
            f"prune, nothing past retention   median {statistics.median(steady):8.1f} ms"
            f"  (turns: {', '.join(f'{t:.1f}' for t in steady)})"
        )
        # The oldest 1 % past the retention, a turn at a time, as time goes by.
        step = args.rows / 1000 / 100 / args.repeat
        clock.now = start + 24 * 3600
        pruning = []
        for _ in range(args.repeat):
            clock.now += step
            pruning += await turns(recovery, 1)
        print(
            f"prune, the oldest 1 % past it   median {statistics.median(pruning):8.1f} ms"
            f"  (turns: {', '.join(f'{t:.1f}' for t in pruning)})"
        )
    finally:
        await recovery.close()
        await spool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500_000, help="journal rows")
    parser.add_argument("--letters", type=int, default=20_000, help="dead letters")
    parser.add_argument("--repeat", type=int, default=5, help="turns per figure")
    parser.add_argument("--dir", default=".", help="where the spool goes (a real disk)")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"load average {f.read().split()[0]}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="iotflow-bench-prune-") as work:
        asyncio.run(run(args, Path(work) / "spool.db"))


if __name__ == "__main__":
    main()
