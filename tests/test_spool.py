"""The spool on real SQLite files: order, fan-out, completion, reopen, kill -9, group commit."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from structlog.testing import capture_logs

import iotflow.spool.store as spool_store
from iotflow.spool import (
    SCHEMA_VERSION,
    DeadLetter,
    Delivery,
    Spool,
    SpoolClosedError,
    SpoolError,
    SpoolFullError,
    SpoolWriteError,
)
from support.smalldisk import small_disk

DAEMON = Path(__file__).resolve().parents[1] / "daemon"
DEV_EUI = "0018B20000000B20"


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(tmp_path / "spool.db")
    yield spool
    await spool.close()


def submit(spool: Spool, n: int, *connection_ids: str) -> asyncio.Future[list[Delivery]]:
    return spool.submit(
        b'{"n": %d}' % n,
        dev_eui=DEV_EUI,
        uplink_time=1_700_000_000.0 + n,
        received_at=1_700_000_000.5 + n,
        connection_ids=connection_ids,
    )


async def add(spool: Spool, n: int, *connection_ids: str) -> list[Delivery]:
    return await submit(spool, n, *connection_ids)  # what `Spool.append` awaits


def count_rows(path: Path) -> tuple[int, int]:
    """(uplinks, deliveries) as another process would see them."""
    with sqlite3.connect(path) as db:
        uplinks = db.execute("SELECT count(*) FROM uplinks").fetchone()[0]
        deliveries = db.execute("SELECT count(*) FROM deliveries").fetchone()[0]
    db.close()
    return int(uplinks), int(deliveries)


async def test_append_then_load_in_order(spool: Spool) -> None:
    appended = [(await add(spool, n, "a"))[0] for n in range(20)]

    loaded = await spool.load("a")

    assert loaded == appended
    assert [d.id for d in loaded] == sorted(d.id for d in loaded)
    assert loaded[3].document == b'{"n": 3}'
    assert loaded[3].uplink_time == 1_700_000_003.0
    assert loaded[3].received_at == 1_700_000_003.5
    assert await spool.load("a", after_id=appended[9].id, limit=5) == appended[10:15]
    assert await spool.load("other") == []


async def test_fanout_shares_one_uplink_row(spool: Spool) -> None:
    deliveries = await add(spool, 1, "a", "b", "c")

    assert [d.connection_id for d in deliveries] == ["a", "b", "c"]
    assert len({d.id for d in deliveries}) == 3
    assert all(d.document is deliveries[0].document for d in deliveries)
    assert count_rows(spool.path) == (1, 3)
    for d in deliveries:
        assert await spool.load(d.connection_id) == [d]


async def test_append_without_connections_writes_nothing(spool: Spool) -> None:
    assert await add(spool, 1) == []
    assert count_rows(spool.path) == (0, 0)


async def test_duplicate_connection_gets_one_delivery(spool: Spool) -> None:
    deliveries = await add(spool, 1, "a", "a", "b")

    assert [d.connection_id for d in deliveries] == ["a", "b"]


async def test_complete_and_flush_remove_rows_and_orphaned_uplinks(spool: Spool) -> None:
    first = await add(spool, 1, "a", "b")
    second = await add(spool, 2, "a")

    spool.complete(first[0].id)
    await spool.flush()
    assert count_rows(spool.path) == (2, 2)  # uplink 1 still has its delivery to b

    spool.complete(first[1].id)
    spool.complete(second[0].id)
    spool.complete(second[0].id)  # twice is harmless
    await spool.flush()
    assert count_rows(spool.path) == (0, 0)
    assert await spool.pending_counts() == {}


async def test_uncommitted_completes_are_not_pending(spool: Spool) -> None:
    deliveries = [(await add(spool, n, "a", "b"))[0] for n in range(3)]

    spool.complete(deliveries[1].id)  # no flush: still a row, but no longer pending

    assert await spool.load("a") == [deliveries[0], deliveries[2]]
    assert await spool.pending_counts() == {"a": 2, "b": 3}


async def test_reopen_resumes_everything_and_ids_keep_increasing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spool.db"  # the directory does not exist yet
    spool = await Spool.open(path)
    before = [d for n in range(10) for d in await add(spool, n, "a", "b")]
    await spool.close()

    spool = await Spool.open(path)
    assert await spool.load("a") + await spool.load("b") == sorted(
        before, key=lambda d: (d.connection_id, d.id)
    )
    assert await spool.connection_ids() == ["a", "b"]
    after = await add(spool, 10, "a")
    assert after[0].id > max(d.id for d in before)

    # Even once the spool is empty, ids are never reused.
    for d in [*before, *after]:
        spool.complete(d.id)
    await spool.close()
    spool = await Spool.open(path)
    assert await spool.pending_counts() == {}
    again = await add(spool, 11, "a")
    assert again[0].id > after[0].id
    await spool.close()


async def test_schema_version_is_recorded_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    await (await Spool.open(path)).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("PRAGMA user_version = 99")
    db.close()

    with pytest.raises(SpoolError, match="schema version 99"):
        await Spool.open(path)


CHILD = """
import asyncio, sys, time
from iotflow.spool import Spool

async def main(path):
    spool = await Spool.open(path, max_batch=64)

    async def one(n):
        now = time.time()
        deliveries = await spool.append(
            b'{"n": %d}' % n, dev_eui="0018B20000000B20", uplink_time=now,
            received_at=now, connection_ids=["a", "b"],
        )
        # One write() below PIPE_BUF is atomic: a line is whole or absent.
        sys.stdout.write("".join(f"{d.id}\\n" for d in deliveries))
        sys.stdout.flush()

    n = 0
    while True:
        await asyncio.gather(*(one(n + k) for k in range(50)))
        n += 50

asyncio.run(main(sys.argv[1]))
"""


async def test_kill_9_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    env = {**os.environ, "PYTHONPATH": str(DAEMON)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), stdout=asyncio.subprocess.PIPE, env=env
    )
    assert child.stdout is not None
    printed: list[int] = []
    try:
        async with asyncio.timeout(60):
            while len(printed) < 2000:
                line = await child.stdout.readline()
                assert line, "the child exited early"
                printed.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)  # mid-stream: the child appends in a loop
    rest = await child.stdout.read()
    await child.wait()
    printed += [int(line) for line in rest.split(b"\n") if line]

    spool = await Spool.open(path)
    try:
        spooled = {d.id for c in ("a", "b") for d in await spool.load(c, limit=10**9)}
    finally:
        await spool.close()

    assert child.returncode == -signal.SIGKILL
    assert set(printed) <= spooled
    assert len(spooled) >= len(printed)


async def test_group_commit_batches_concurrent_appends(spool: Spool) -> None:
    results = await asyncio.gather(*(add(spool, n, "a", "b") for n in range(500)))

    assert spool.stats.uplinks == 500
    assert spool.stats.deliveries == 1000
    assert spool.stats.transactions <= 5  # one when all 500 are queued before it starts
    ids = [d.id for deliveries in results for d in deliveries]
    assert ids == sorted(ids)  # arrival order


async def test_a_paced_stream_shares_commits_and_a_slower_one_does_not_wait(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uplinks that come one at a time but close together wait `_GATHER` for the next ones
    to join their transaction (issue #16); uplinks further apart are written at once."""
    # A long wait, so that the test's next submit can never miss it; the spool's clock is
    # the test's, to say how far apart the uplinks came.
    monkeypatch.setattr(spool_store, "_GATHER", 0.2)
    now = [1000.0]
    monkeypatch.setattr(spool, "_now", lambda: now[0])

    async def writer_woke() -> None:
        # The writer clears its wake-up flag as it wakes; no event says so. A yield each
        # turn of the loop, no timed sleep.
        while spool._wakeup.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0)

    await submit(spool, 1, "a")  # nothing came before it: written at once
    assert spool.stats.transactions == 1
    now[0] += 0.01  # 10 ms after the one before: a paced stream
    second = submit(spool, 2, "a")
    await writer_woke()  # for the second alone, and it waits for more
    third = submit(spool, 3, "a")
    await asyncio.gather(second, third)
    assert (spool.stats.transactions, spool.stats.largest_batch) == (2, 2)

    now[0] += 10.0  # seconds after the one before: the writer does not wait
    fourth = submit(spool, 4, "a")
    await writer_woke()  # for the fourth alone, and it writes it
    # Too late for the fourth's transaction, which a waiting writer would have made it join.
    fifth = submit(spool, 5, "a")
    await asyncio.gather(fourth, fifth)
    assert spool.stats.transactions == 4
    ids = [d.id for d in await spool.load("a")]
    assert ids == sorted(ids)


async def test_a_delete_goes_with_the_next_appends_and_does_not_wake_the_writer(
    tmp_path: Path,
) -> None:
    """A delivery's delete waits (COMPLETE_LINGER) for the next transaction rather than
    making one of its own (issue #16), and is committed by `close` all the same."""
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        (first,) = await add(spool, 1, "a")
        assert spool.stats.transactions == 1
        spool.complete(first.id)
        assert not spool._wakeup.is_set()  # no transaction for it alone, now
        assert spool._linger is not None  # but the writer comes for it, later
        (second,) = await add(spool, 2, "a")
        assert (spool.stats.transactions, spool.stats.completed) == (2, 1)  # it went along
        assert spool._linger is None
        assert count_rows(spool.path) == (1, 1)

        spool.complete(second.id)
        assert not spool._wakeup.is_set()
    finally:
        await spool.close()
    assert count_rows(spool.path) == (0, 0)  # close committed it


async def test_group_commit_respects_max_batch(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db", max_batch=100)
    try:
        await asyncio.gather(*(add(spool, n, "a") for n in range(500)))
    finally:
        await spool.close()

    assert spool.stats.largest_batch <= 100
    assert 5 <= spool.stats.transactions < 500


async def test_pending_counts_and_drop_connection(spool: Spool) -> None:
    for n in range(3):
        await add(spool, n, "a", "b")
    await add(spool, 3, "b")

    assert await spool.pending_counts() == {"a": 3, "b": 4}
    assert await spool.drop_connection("b") == 4
    assert await spool.pending_counts() == {"a": 3}
    assert count_rows(spool.path) == (3, 3)  # the uplink only b had is gone
    assert await spool.drop_connection("b") == 0


async def test_drop_connection_keeps_appends_queued_after_it(spool: Spool) -> None:
    await add(spool, 1, "a")

    dropped, later = await asyncio.gather(spool.drop_connection("a"), add(spool, 2, "a"))

    assert dropped == 1
    assert await spool.load("a") == later


async def test_drop_connection_does_not_count_completed(spool: Spool) -> None:
    deliveries = [(await add(spool, n, "a"))[0] for n in range(3)]
    spool.complete(deliveries[0].id)

    assert await spool.drop_connection("a") == 2


def failing_once(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Make the next batch fail with `error` in the writer's thread, after it has written
    something (which the rollback must take back)."""
    monkeypatch.undo()
    original = spool_store._write_rows
    failed: list[bool] = []

    def write_rows(db: sqlite3.Connection, *args: Any) -> dict[str, int]:
        if failed:
            return original(db, *args)
        failed.append(True)
        db.execute("UPDATE meta SET value = value + 1000 WHERE key = 'next_id'")
        raise error

    monkeypatch.setattr(spool_store, "_write_rows", write_rows)


async def test_failed_transaction_fails_its_waiters_and_keeps_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    try:
        done = await add(spool, 1, "a")
        failing_once(monkeypatch, sqlite3.OperationalError("disk I/O error"))
        spool.complete(done[0].id)
        with pytest.raises(SpoolWriteError, match="disk I/O error") as raised:
            await spool.flush()
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)

        failing_once(monkeypatch, sqlite3.OperationalError("disk I/O error"))
        results = await asyncio.gather(
            add(spool, 2, "a"), add(spool, 3, "a"), return_exceptions=True
        )
        assert all(isinstance(r, SpoolWriteError) for r in results)
        assert spool.stats.failed_transactions == 2

        # The writer lives on; the next batch also carries the complete that failed twice.
        later = await add(spool, 4, "a")
    finally:
        await spool.close()
    assert count_rows(path) == (1, 1)
    spool = await Spool.open(path)
    try:
        assert await spool.load("a") == later
    finally:
        await spool.close()


async def test_disk_full_fails_the_batch_and_the_next_one_succeeds(spool: Spool) -> None:
    first = await add(spool, 1, "a")
    # A real SQLITE_FULL: cap the database at its current size.
    async with spool._writer.execute("PRAGMA page_count") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    await spool._writer.execute(f"PRAGMA max_page_count = {row[0]}")

    with pytest.raises(SpoolWriteError, match="full"):
        await spool.append(
            b"x" * 200_000, dev_eui=DEV_EUI, uplink_time=0.0, received_at=0.0, connection_ids=["a"]
        )

    await spool._writer.execute("PRAGMA max_page_count = 1073741823")
    second = await add(spool, 2, "a")
    assert await spool.load("a") == first + second


async def test_cancelled_append_is_written_whole(spool: Spool) -> None:
    task = asyncio.create_task(add(spool, 1, "a", "b"))
    await asyncio.sleep(0)  # let it queue its write
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await spool.flush()
    assert count_rows(spool.path) == (1, 2)
    assert len(await spool.load("a")) == 1


async def test_submit_queues_at_once_and_resolves_at_the_commit(spool: Spool) -> None:
    def submit(document: bytes, targets: list[str], journal: str | None = None) -> Any:
        return spool.submit(
            document,
            dev_eui="0018B20000000B20",
            uplink_time=1_700_000_000.0,
            received_at=1_700_000_000.5,
            connection_ids=targets,
            journal=journal,
        )

    first = submit(b"1", ["a"])
    second = submit(b"2", ["a"], journal="[]")
    assert not first.done()  # not before its group commit
    second.cancel()  # its caller went away: the op stays, written whole

    delivered = await first
    await spool.flush()

    assert count_rows(spool.path) == (2, 2)
    assert [d.id for d in await spool.load("a")] == [delivered[0].id, delivered[0].id + 1]
    nothing = submit(b"3", [])
    assert nothing.done()
    assert nothing.result() == []


async def test_closed_spool_refuses_work(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    await add(spool, 1, "a")
    await spool.close()
    await spool.close()  # idempotent

    with pytest.raises(SpoolClosedError):
        await add(spool, 2, "a")
    with pytest.raises(SpoolClosedError):
        spool.complete(1)
    with pytest.raises(SpoolClosedError):
        await spool.load("a")


async def test_close_commits_what_was_queued(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    deliveries = await add(spool, 1, "a", "b")
    spool.complete(deliveries[0].id)
    pending = asyncio.ensure_future(add(spool, 2, "a"))
    await asyncio.sleep(0)  # let it queue its write
    await spool.close()

    assert len(await pending) == 1
    assert count_rows(path) == (2, 2)


CONNECTIONS = ("a", "b", "c")


class SpoolMachine(RuleBasedStateMachine):
    """Random appends, completes, drops and reopens keep `load` equal to a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "spool.db"
        # A loop of its own: hypothesis drives the machine synchronously.
        self.loop = asyncio.new_event_loop()
        self.model: dict[int, Delivery] = {}
        self.last_id = 0

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    @initialize()
    def start(self) -> None:
        self.spool: Spool = self.run(Spool.open(self.path, max_batch=3))

    def record(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            assert d.id > self.last_id
            self.last_id = d.id
            self.model[d.id] = d

    @rule(
        connection_ids=st.lists(st.sampled_from(CONNECTIONS), max_size=3),
        document=st.binary(max_size=16),
        time=st.floats(min_value=0, max_value=4e9),
    )
    def append(self, connection_ids: list[str], document: bytes, time: float) -> None:
        self.record(
            self.run(
                self.spool.append(
                    document,
                    dev_eui=DEV_EUI,
                    uplink_time=time,
                    received_at=time + 1,
                    connection_ids=connection_ids,
                )
            )
        )

    @rule(
        burst=st.lists(st.lists(st.sampled_from(CONNECTIONS), min_size=1, max_size=3), max_size=8)
    )
    def append_concurrently(self, burst: list[list[str]]) -> None:
        async def appends() -> list[list[Delivery]]:
            # Queued in one loop turn, so they share batches (max_batch=3 splits them).
            return await asyncio.gather(
                *(
                    self.spool.append(
                        b"{}", dev_eui=DEV_EUI, uplink_time=1.0, received_at=2.0, connection_ids=c
                    )
                    for c in burst
                )
            )

        for deliveries in self.run(appends()):
            self.record(deliveries)

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        if not self.model:
            return
        delivery_id = data.draw(st.sampled_from(sorted(self.model)))
        self.spool.complete(delivery_id)
        del self.model[delivery_id]

    @rule(delivery_id=st.integers(min_value=0, max_value=50))
    def complete_gone(self, delivery_id: int) -> None:
        # Gone: given out once and completed since (the daemon completes no other id; a
        # complete of an id not given out yet would cover the delivery that later gets it).
        if delivery_id not in self.model and delivery_id <= self.last_id:
            self.spool.complete(delivery_id)

    @rule(connection_id=st.sampled_from(CONNECTIONS))
    def drop(self, connection_id: str) -> None:
        expected = [i for i, d in self.model.items() if d.connection_id == connection_id]
        assert self.run(self.spool.drop_connection(connection_id)) == len(expected)
        for i in expected:
            del self.model[i]

    @rule()
    def flush(self) -> None:
        self.run(self.spool.flush())

    @rule()
    def reopen(self) -> None:
        self.run(self.spool.close())
        self.spool = self.run(Spool.open(self.path, max_batch=3))

    @invariant()
    def load_matches_model(self) -> None:
        for c in CONNECTIONS:
            expected = sorted(
                (d for d in self.model.values() if d.connection_id == c), key=lambda d: d.id
            )
            assert self.run(self.spool.load(c)) == expected
            after = expected[len(expected) // 2].id if expected else 0
            assert (
                self.run(self.spool.load(c, after_id=after, limit=2))
                == [d for d in expected if d.id > after][:2]
            )
        counts: dict[str, int] = {}
        for d in self.model.values():
            counts[d.connection_id] = counts.get(d.connection_id, 0) + 1
        assert self.run(self.spool.pending_counts()) == counts

    def teardown(self) -> None:
        try:
            if hasattr(self, "spool"):
                self.run(self.spool.close())
        finally:
            self.loop.close()
            self.dir.cleanup()


SpoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestSpoolModel = SpoolMachine.TestCase


# -- a small disk: the WAL stays small, a full disk is survived ----------------------------

DOCUMENT = b'{"DevEUI_uplink": {"payload_hex": "%s"}}' % (b"ab" * 280)  # ~600 bytes


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def stream(spool: Spool, n: int, *, concurrency: int = 16) -> int:
    """Append and complete `n` uplinks as a steady stream; return the largest WAL seen."""
    wal = Path(f"{spool.path}-wal")
    peak = 0
    next_n = 0

    async def client() -> None:
        nonlocal next_n, peak
        while next_n < n:
            next_n += 1
            deliveries = await spool.append(
                DOCUMENT, dev_eui=DEV_EUI, uplink_time=0.0, received_at=0.0, connection_ids=["a"]
            )
            for d in deliveries:
                spool.complete(d.id)
            peak = max(peak, file_size(wal))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    await spool.flush()
    return peak


async def test_wal_stays_small_under_a_steady_stream(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        peak = await stream(spool, 4000)
        # The backlog is a few uplinks; SQLite alone lets the WAL reach ~4 MB.
        assert peak < 1.5 * 2**20
        assert spool.stats.wal_peak < 1.5 * 2**20
        assert await spool.pending_counts() == {}
    finally:
        await spool.close()


async def test_a_steady_stream_does_not_fill_a_small_disk(tmp_path: Path) -> None:
    """The issue's jam: 3 MB free, a backlog of a few KB, and yet "database or disk is full"."""
    with small_disk(tmp_path / "small", "3m") as disk:
        spool = await Spool.open(disk.path / "spool.db")
        try:
            await stream(spool, 6000)
            assert spool.stats.failed_transactions == 0
            assert disk.free() > 1 * 2**20
        finally:
            await spool.close()


async def cap_pages(spool: Spool, extra: int = 0) -> None:
    """A real SQLITE_FULL without root: cap the database near its current size."""
    async with spool._writer.execute("PRAGMA page_count") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    await spool._writer.execute(f"PRAGMA max_page_count = {row[0] + extra}")


async def big(spool: Spool) -> list[Delivery]:
    return await spool.append(
        b"x" * 200_000, dev_eui=DEV_EUI, uplink_time=0.0, received_at=0.0, connection_ids=["a"]
    )


async def test_full_database_is_a_typed_error_logged_once_and_recovers_by_itself(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path / "spool.db", retry_initial=0.01, retry_max=0.05)
    try:
        first = await add(spool, 1, "a")
        await cap_pages(spool)
        with capture_logs() as logs:
            for _ in range(20):
                with pytest.raises(SpoolFullError, match="full"):
                    await big(spool)
            assert not spool.writable
            await spool._writer.execute("PRAGMA max_page_count = 1073741823")
            async with asyncio.timeout(5):
                await spool.wait_writable()  # retried by the spool itself
            assert spool.writable
            second = await big(spool)
        assert await spool.load("a") == first + second
        warnings = [e for e in logs if e["log_level"] in ("warning", "error")]
        assert [e["event"] for e in warnings] == ["Spool cannot commit"]
        assert "full" in warnings[0]["error"]
        assert [e["event"] for e in logs if e["log_level"] == "info"] == ["Spool commits again"]
        assert spool.stats.unavailable >= 1
    finally:
        await spool.close()


async def test_a_full_disk_fails_appends_fast_keeps_completes_and_recovers(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "small", "2m") as disk:
        spool = await Spool.open(disk.path / "spool.db", retry_initial=0.05, retry_max=0.2)
        try:
            done = [d for n in range(10) for d in await add(spool, n, "a")]
            await spool.flush()
            disk.fill()
            with capture_logs() as logs:
                # Appends fail (typed, at once), completes are kept: nothing wedges.
                for n in range(50):
                    with pytest.raises(SpoolFullError):
                        async with asyncio.timeout(5):
                            await big(spool)
                    spool.complete(done[n % 10].id)
                assert not spool.writable
                assert await spool.load("a") == []  # completed, if not yet committed
                with pytest.raises(SpoolFullError):
                    await spool.flush()
                disk.free_up()
                async with asyncio.timeout(10):
                    await spool.wait_writable()
                later = await add(spool, 99, "a")
                await spool.flush()
            assert count_rows(spool.path) == (1, 1)  # the ten completes went through
            assert await spool.load("a") == later
            warnings = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
            assert warnings == ["Spool cannot commit"]
        finally:
            await spool.close()


async def test_close_while_full_closes_and_raises_then_nothing_is_lost(tmp_path: Path) -> None:
    with small_disk(tmp_path / "small", "2m") as disk:
        path = disk.path / "spool.db"
        spool = await Spool.open(path)
        kept = [d for n in range(5) for d in await add(spool, n, "a")]
        disk.fill()
        with pytest.raises(SpoolFullError):
            await big(spool)
        spool.complete(kept[0].id)

        with pytest.raises(SpoolFullError, match="1 completes"):
            async with asyncio.timeout(10):
                await spool.close()

        disk.free_up()
        spool = await Spool.open(path)
        try:
            # The complete was not committed: delivered again (at least once), not lost.
            assert await spool.load("a") == kept
        finally:
            await spool.close()


async def test_a_spool_with_room_for_a_probe_only_stays_quiet_and_backs_off(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path / "spool.db", retry_initial=0.01, retry_max=0.08)
    try:
        await add(spool, 1, "a")
        await cap_pages(spool)  # the one-row probe fits, a 200 kB uplink does not
        with capture_logs() as logs:
            for _ in range(6):
                with pytest.raises(SpoolFullError):
                    await big(spool)
                async with asyncio.timeout(5):
                    await spool.wait_writable()  # the probe committed: try again
            assert spool._retry_wait == 0.08  # flapping backs off as failing does
            await spool._writer.execute("PRAGMA max_page_count = 1073741823")
            await big(spool)
        events = [e["event"] for e in logs if e["log_level"] != "debug"]
        assert events == ["Spool cannot commit", "Spool commits again"]
    finally:
        await spool.close()


class LogRecorder:
    """Stands in for the module's structlog logger: records events, and they can be awaited."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._changed = asyncio.Condition()

    def _record(self, level: str, event: str) -> None:
        self.events.append((level, event))

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def debug(self, event: str, **fields: Any) -> None:
        self._record("debug", event)

    def info(self, event: str, **fields: Any) -> None:
        self._record("info", event)

    def warning(self, event: str, **fields: Any) -> None:
        self._record("warning", event)

    async def wait_for(self, event: str, count: int) -> None:
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: [e for _, e in self.events].count(event) >= count)


async def test_a_long_episode_logs_a_reminder_per_interval_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    monkeypatch.setattr(spool_store, "log", recorder)
    monkeypatch.setattr(spool_store, "_REMINDER", 0.3)
    with small_disk(tmp_path / "small", "2m") as disk:
        spool = await Spool.open(disk.path / "spool.db", retry_initial=0.01, retry_max=0.02)
        try:
            await add(spool, 1, "a")
            disk.fill()
            with pytest.raises(SpoolFullError):
                await big(spool)
            await recorder.wait_for("Spool still cannot commit", 2)
            warnings = [e for level, e in recorder.events if level == "warning"]
            retries = [e for level, e in recorder.events if e == "Spool write failed"]
            assert warnings == ["Spool cannot commit", *["Spool still cannot commit"] * 2]
            assert len(retries) >= 10  # it kept retrying all along, quietly
            disk.free_up()
            async with asyncio.timeout(10):
                await spool.wait_writable()
            await add(spool, 2, "a")
            assert [e for _, e in recorder.events if e.startswith("Spool commits")] == [
                "Spool commits again"
            ]
        finally:
            await spool.close()


# -- per-delivery validity (flows, issue #13)


async def test_a_deliverys_own_validity_survives_a_restart(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    appended = await spool.append(
        b"{}",
        dev_eui="0018B20000000B20",
        uplink_time=1.0,
        received_at=2.0,
        connection_ids=["flow", "binding"],
        validity={"flow": 259200.0},
    )
    assert [d.validity for d in appended] == [259200.0, None]
    await spool.close()
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        assert [d.validity for d in await spool.load("flow")] == [259200.0]
        assert [d.validity for d in await spool.load("binding")] == [None]
    finally:
        await spool.close()


async def test_a_version_1_spool_is_upgraded_keeping_its_deliveries(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    # The schema of version 1, as the previous iotflow wrote it, with one pending delivery.
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE uplinks (id INTEGER PRIMARY KEY, dev_eui TEXT NOT NULL,
            uplink_time REAL NOT NULL, received_at REAL NOT NULL, document BLOB NOT NULL);
        CREATE TABLE deliveries (id INTEGER PRIMARY KEY, uplink_id INTEGER NOT NULL,
            connection_id TEXT NOT NULL);
        CREATE INDEX deliveries_connection ON deliveries (connection_id, id);
        CREATE INDEX deliveries_uplink ON deliveries (uplink_id);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta (key, value) VALUES ('next_id', 2);
        INSERT INTO uplinks VALUES (1, '0018B20000000B20', 1.0, 2.0, X'7B7D');
        INSERT INTO deliveries VALUES (1, 1, 'c');
        PRAGMA user_version = 1;
        """
    )
    db.close()
    spool = await Spool.open(path)
    try:
        (old,) = await spool.load("c")
        assert (old.id, old.validity, old.document) == (1, None, b"{}")
        (new,) = await spool.append(
            b"{}",
            dev_eui="0018B20000000B20",
            uplink_time=1.0,
            received_at=2.0,
            connection_ids=["c"],
            validity={"c": 60.0},
        )
        assert new.id == 2
    finally:
        await spool.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_a_version_2_spool_is_upgraded_keeping_its_deliveries(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    # The schema of version 2, as the previous iotflow wrote it, with one pending delivery.
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE uplinks (id INTEGER PRIMARY KEY, dev_eui TEXT NOT NULL,
            uplink_time REAL NOT NULL, received_at REAL NOT NULL, document BLOB NOT NULL);
        CREATE TABLE deliveries (id INTEGER PRIMARY KEY, uplink_id INTEGER NOT NULL,
            connection_id TEXT NOT NULL, validity REAL);
        CREATE INDEX deliveries_connection ON deliveries (connection_id, id);
        CREATE INDEX deliveries_uplink ON deliveries (uplink_id);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta (key, value) VALUES ('next_id', 3);
        CREATE TRIGGER uplinks_gc AFTER DELETE ON deliveries
        WHEN NOT EXISTS (SELECT 1 FROM deliveries WHERE uplink_id = OLD.uplink_id)
        BEGIN
            DELETE FROM uplinks WHERE id = OLD.uplink_id;
        END;
        INSERT INTO uplinks VALUES (1, '0018B20000000B20', 1.0, 2.0, X'7B7D');
        INSERT INTO deliveries VALUES (1, 1, 'c', 30.0);
        INSERT INTO deliveries VALUES (2, 1, 'd', NULL);
        PRAGMA user_version = 2;
        """
    )
    db.close()
    spool = await Spool.open(path)
    try:
        (old,) = await spool.load("c")
        assert (old.id, old.validity, old.since, old.letter, old.replay) == (
            1,
            30.0,
            None,
            None,
            None,
        )
        # The new tables work at once: a dead letter is written with the delete.
        old.attempts = 1
        spool.complete(
            old.id, final=old, outcome="failed", letter=DeadLetter("failed", "no", 400, "x", 3.0)
        )
        await spool.flush()
        assert await spool.load("c") == []
        rows = await spool.read("SELECT connection_id, reason, status FROM dead_letters")
        assert [tuple(r) for r in rows] == [("c", "no", 400)]
        (other,) = await spool.load("d")
        assert other.id == 2
        (new,) = await spool.append(
            b"{}",
            dev_eui="0018B20000000B20",
            uplink_time=1.0,
            received_at=2.0,
            connection_ids=["c"],
            journal="[[], null, null]",
        )
        assert new.id == 3
        assert len(await spool.read("SELECT id FROM journal")) == 1
    finally:
        await spool.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_a_version_3_spool_is_upgraded_keeping_its_journaled_deliveries(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    # Version 3 as the previous iotflow wrote it: a journaled uplink's document in both rows.
    spool = await Spool.open(path)
    (old,) = await spool.append(
        b'{"n": 1}',
        dev_eui="0018B20000000B20",
        uplink_time=1.0,
        received_at=2.0,
        connection_ids=["c"],
        journal="[[], null, null]",
    )
    await spool.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE uplinks SET document = X'7B226E223A20317D'")  # {"n": 1}
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()

    spool = await Spool.open(path)
    try:
        assert [(d.id, d.document) for d in await spool.load("c")] == [(old.id, b'{"n": 1}')]
        (new,) = await spool.append(
            b'{"n": 2}',
            dev_eui="0018B20000000B20",
            uplink_time=3.0,
            received_at=4.0,
            connection_ids=["c"],
            journal="[[], null, null]",
        )
        assert [d.document for d in await spool.load("c")] == [b'{"n": 1}', b'{"n": 2}']
        rows = await spool.read("SELECT id, length(document) FROM uplinks ORDER BY id")
        assert [tuple(r) for r in rows] == [(old.id, 8), (new.id, 0)]  # the new one: once
    finally:
        await spool.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
