"""Dead letters, the journal and replays: what did not go through, kept to be sent again
(issue #14, docs/deadletters.md).

Everything lives in the spool's database and is written by its writer, in its group commits:
a journal row in the same transaction as its uplink's deliveries, a dead letter in the same
transaction as the delete of its delivery (`Spool.complete(final=...)`), a re-send or a
replay's next uplinks in one transaction with what marks them sent (the letter's
`resending` flag, the replay's cursor). So a crash, even kill -9, neither loses nor
duplicates any of them, and a replay resumes where its cursor is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiosqlite
import orjson

from iotflow.config.model import DeadLetterSettings, JournalSettings
from iotflow.delivery.worker import EventRecorder
from iotflow.routing import RoutingIndex, Target
from iotflow.spool import Delivery, Spool
from iotflow.telemetry.logging import get_logger
from iotflow.telemetry.metrics import Metrics

__all__ = ["LetterFilter", "LetterRow", "Recovery", "ReplayRow", "route_of"]

log = get_logger("iotflow.delivery")

_CHUNK = 500  # letters re-sent, or journal rows read, per transaction
_RESYNC = 1.0  # seconds: a waiting replay checks its committed counts at least this often
_PRUNE_CHUNK = 5000  # journal rows deleted per transaction
_ROW_OVERHEAD = 64  # bytes a journal row costs beyond its document and route (estimate)

Dispatch = Callable[[Sequence[Delivery]], None]
# The document a connection gets for a journaled uplink: (document, driver) -> bytes.
Render = Callable[[bytes, str | None], Awaitable[bytes]]


@functools.lru_cache(maxsize=4096)  # once per uplink: a fleet has few distinct routes
def route_of(tags: frozenset[str], application: str | None, application_name: str | None) -> str:
    """What the journal keeps of an uplink to route it again at a replay, as JSON."""
    return orjson.dumps([sorted(tags), application, application_name]).decode()


def _targets(index: RoutingIndex, dev_eui: str, route: str) -> tuple[Target, ...]:
    try:
        tags, application, name = orjson.loads(route)
    except (orjson.JSONDecodeError, ValueError):
        return index.targets(dev_eui)
    return index.targets(dev_eui, frozenset(tags), application, name)


@dataclass(frozen=True, slots=True)
class LetterFilter:
    outcome: str | None = None
    dev_eui: str | None = None

    def where(self, connection_id: str) -> tuple[str, list[Any]]:
        clauses = ["connection_id = ?"]
        values: list[Any] = [connection_id]
        if self.outcome is not None:
            clauses.append("outcome = ?")
            values.append(self.outcome)
        if self.dev_eui is not None:
            clauses.append("dev_eui = ?")
            values.append(self.dev_eui)
        return " AND ".join(clauses), values


@dataclass(frozen=True, slots=True)
class LetterRow:
    id: int
    dev_eui: str
    uplink_time: float
    outcome: str
    reason: str
    status: int | None
    body: str | None
    attempts: int
    first_attempt: float | None
    last_attempt: float | None
    time: float
    document: bytes | None = None


_LETTER_COLUMNS = (
    "id, dev_eui, uplink_time, outcome, reason, status, body, attempts, first_attempt,"
    " last_attempt, time"
)


@dataclass(frozen=True, slots=True)
class ReplayRow:
    id: str
    connection_id: str
    start: float
    end: float
    devices: list[str]
    requested_at: float
    state: str
    total: int
    fed: int
    cursor: int
    delivered: int
    expired: int
    failed: int

    @property
    def done(self) -> int:
        return self.delivered + self.expired + self.failed

    @property
    def pending(self) -> int:
        """Queued and not ended yet, plus (while running) what is still to be queued."""
        queued = max(0, self.fed - self.done)
        return queued + (max(0, self.total - self.fed) if self.state == "running" else 0)


_REPLAY_COLUMNS = (
    "id, connection_id, start, end, devices, requested_at, state, total, fed, cursor,"
    " delivered, expired, failed"
)


def _replay(row: Sequence[Any]) -> ReplayRow:
    values = list(row)
    values[4] = orjson.loads(values[4])
    return ReplayRow(*values)


class Recovery:
    """Dead letters and replays of every connection, over the spool's database."""

    def __init__(
        self,
        *,
        spool: Spool,
        dispatch: Dispatch,
        index: Callable[[], RoutingIndex],
        metrics: Metrics,
        record: EventRecorder,
        journal: JournalSettings,
        letters: DeadLetterSettings,
        window: Callable[[str], int],
        render: Render | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._dispatch = dispatch
        self._index = index
        self._metrics = metrics
        self._record = record
        self.journal = journal
        self.letters_settings = letters
        self._window = window  # replay deliveries a connection may have queued at once
        self._render = render
        self._clock = clock
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._outstanding: dict[str, int] = {}  # per replay: fed and not ended
        self._progress: dict[str, asyncio.Event] = {}
        self._gauged: set[str] = set()
        self._journal_bytes = 0
        self._prune_task: asyncio.Task[None] | None = None
        spool.on_letters = self._letters_changed

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, prune_every: float = 10.0) -> None:
        """Resume the replays that were running, and prune in the background."""
        rows = await self._spool.read(
            "SELECT coalesce(sum(length(document) + length(route)), 0), count(*) FROM journal"
        )
        self._journal_bytes = int(rows[0][0]) + _ROW_OVERHEAD * int(rows[0][1])
        running = await self._spool.read(
            f"SELECT {_REPLAY_COLUMNS} FROM replays WHERE state = 'running'"
        )
        for row in running:
            replay = _replay(row)
            log.info(
                "Replay resumed", connection=replay.connection_id, replay=replay.id, fed=replay.fed
            )
            self._launch(replay)
        await self.prune()
        self._prune_task = asyncio.create_task(self._prune_loop(prune_every), name="prune")

    async def close(self) -> None:
        tasks = [*self._runs.values()]
        if self._prune_task is not None:
            tasks.append(self._prune_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runs.clear()

    def journaled(self, size: int) -> None:
        """An uplink of `size` bytes (document and route) went into the journal."""
        self._journal_bytes += size + _ROW_OVERHEAD

    # -- dead letters ----------------------------------------------------------------------

    async def letters(
        self, connection_id: str, filters: LetterFilter, offset: int, limit: int
    ) -> tuple[list[LetterRow], int]:
        where, values = filters.where(connection_id)
        total = await self._spool.read(f"SELECT count(*) FROM dead_letters WHERE {where}", values)
        rows = await self._spool.read(
            f"SELECT {_LETTER_COLUMNS} FROM dead_letters WHERE {where}"
            " ORDER BY time DESC, id DESC LIMIT ? OFFSET ?",
            [*values, limit, offset],
        )
        return [LetterRow(*r) for r in rows], int(total[0][0])

    async def letter(self, connection_id: str, letter_id: int) -> LetterRow | None:
        rows = await self._spool.read(
            f"SELECT {_LETTER_COLUMNS}, document FROM dead_letters"
            " WHERE connection_id = ? AND id = ?",
            (connection_id, letter_id),
        )
        return LetterRow(*rows[0]) if rows else None

    async def resend(
        self,
        connection_id: str,
        *,
        ids: Sequence[int] | None = None,
        filters: LetterFilter | None = None,
        by: str | None = None,
    ) -> int:
        """Put letters back in the connection's queue, oldest first; return how many.

        A letter already being re-sent is skipped (it is in the queue once already)."""
        if ids is not None:
            where, values = (
                "connection_id = ? AND id IN (SELECT value FROM json_each(?))",
                [
                    connection_id,
                    orjson.dumps(sorted(set(ids))).decode(),
                ],
            )
        else:
            where, values = (filters or LetterFilter()).where(connection_id)
        now = self._clock()
        count = 0
        after = 0
        while True:
            rows = await self._spool.read(
                # The document before the processors: the re-send goes through them again.
                "SELECT id, dev_eui, uplink_time, received_at, coalesce(original, document),"
                f" validity FROM dead_letters WHERE {where} AND resending = 0 AND id > ?"
                " ORDER BY id LIMIT ?",
                [*values, after, _CHUNK],
            )
            if not rows:
                break
            after = rows[-1][0]
            first = self._spool.allocate(len(rows))
            wanted = [
                Delivery(first + i, connection_id, r[1], r[2], r[3], r[4], r[5], now, r[0])
                for i, r in enumerate(rows)
            ]
            sent: list[Delivery] = await self._spool.write(
                functools.partial(_insert_resent, wanted=wanted)
            )
            self._dispatch(sent)
            count += len(sent)
            if len(rows) < _CHUNK:
                break
        if count:
            log.info("Dead letters re-sent", connection=connection_id, count=count)
            self._record(connection_id, "dead_letters_resent", _by({"count": count}, by))
        await self.update_gauges()
        return count

    async def purge(
        self, connection_id: str, filters: LetterFilter, *, by: str | None = None
    ) -> int:
        where, values = filters.where(connection_id)

        async def action(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(f"DELETE FROM dead_letters WHERE {where}", values)
            return cursor.rowcount

        count: int = await self._spool.write(action)
        if count:
            log.info("Dead letters purged", connection=connection_id, count=count)
            self._record(connection_id, "dead_letters_purged", _by({"count": count}, by))
        await self.update_gauges()
        return count

    # -- replays ---------------------------------------------------------------------------

    async def start_replay(
        self,
        connection_id: str,
        start: float,
        end: float,
        devices: list[str] | None,
        *,
        by: str | None = None,
    ) -> ReplayRow:
        """Count the window's uplinks of the devices and start sending them."""
        if devices is None:
            devices = await self._routed_devices(connection_id, start, end)
        listed = orjson.dumps(devices).decode()
        rows = await self._spool.read(
            "SELECT count(*), coalesce(min(id), 1) - 1 FROM journal"
            " WHERE uplink_time BETWEEN ? AND ? AND dev_eui IN (SELECT value FROM json_each(?))",
            (start, end, listed),
        )
        # The cursor starts before the window's first row: the feed skips older ones.
        total, cursor = int(rows[0][0]), int(rows[0][1])
        now = self._clock()
        replay = ReplayRow(
            uuid.uuid4().hex,
            connection_id,
            start,
            end,
            devices,
            now,
            "running",
            total,
            0,
            cursor,
            0,
            0,
            0,
        )

        async def action(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO replays (id, connection_id, start, end, devices, requested_at,"
                " state, total, cursor) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (replay.id, connection_id, start, end, listed, now, total, cursor),
            )

        await self._spool.write(action)
        log.info("Replay started", connection=connection_id, replay=replay.id, uplinks=total)
        self._record(
            connection_id,
            "replay_started",
            _by({"replay": replay.id, "uplinks": total, "devices": len(devices)}, by),
        )
        self._launch(replay)
        return replay

    async def replay(self, replay_id: str) -> ReplayRow | None:
        rows = await self._spool.read(
            f"SELECT {_REPLAY_COLUMNS} FROM replays WHERE id = ?", (replay_id,)
        )
        return _replay(rows[0]) if rows else None

    async def cancel_replay(self, replay_id: str) -> ReplayRow | None:
        """Stop feeding a replay; what it queued already is still sent."""
        row = await self.replay(replay_id)
        if row is None or row.state != "running":
            return row
        # Marked first: a feed queued after this finds it cancelled and queues nothing; one
        # queued before commits and is dispatched. The task sees it at its next turn.
        await self._finish_replay(row, "cancelled")
        progress = self._progress.get(replay_id)
        if progress is not None:
            progress.set()
        return await self.replay(replay_id)

    def replayed(self, replay_id: str, connection_id: str, outcome: str) -> None:
        """A delivery a replay fed has ended (the worker tells)."""
        self._metrics.replayed.labels(connection_id, outcome).inc()
        if replay_id in self._outstanding:
            self._outstanding[replay_id] -= 1
            self._progress[replay_id].set()

    async def _routed_devices(self, connection_id: str, start: float, end: float) -> list[str]:
        index = self._index()
        rows = await self._spool.read(
            "SELECT DISTINCT dev_eui, route FROM journal WHERE uplink_time BETWEEN ? AND ?",
            (start, end),
        )
        found = {
            dev_eui
            for dev_eui, route in rows
            if any(t.connection_id == connection_id for t in _targets(index, dev_eui, route))
        }
        return sorted(found)

    def _launch(self, replay: ReplayRow) -> None:
        self._outstanding[replay.id] = max(0, replay.fed - replay.done)
        self._progress[replay.id] = asyncio.Event()
        task = asyncio.create_task(self._run(replay), name=f"replay:{replay.id}")
        self._runs[replay.id] = task

    async def _run(self, replay: ReplayRow) -> None:
        rid, cid = replay.id, replay.connection_id
        listed = orjson.dumps(replay.devices).decode()
        cursor = replay.cursor
        progress = self._progress[rid]
        exhausted = False
        try:
            while True:
                window = self._window(cid)
                room = window - self._outstanding[rid]
                if exhausted and self._outstanding[rid] <= 0:
                    break
                # Fed again once half the window is free: a transaction for half a window,
                # not one per uplink that ends (each commit is an fsync live uplinks share).
                if exhausted or room < max(1, window // 2):
                    progress.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(progress.wait(), _RESYNC)
                    if not await self._resync(rid):
                        return  # cancelled, or its connection deleted
                    continue
                rows = await self._spool.read(
                    "SELECT id, dev_eui, uplink_time, received_at, route, document FROM journal"
                    " WHERE id > ? AND uplink_time BETWEEN ? AND ?"
                    " AND dev_eui IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
                    (cursor, replay.start, replay.end, listed, min(room, _CHUNK)),
                )
                if not rows:
                    exhausted = True
                    continue
                deliveries = await self._deliveries(replay, rows)
                cursor = rows[-1][0]
                self._outstanding[rid] += len(deliveries)
                fed = await self._spool.write(
                    functools.partial(
                        _insert_replayed, replay_id=rid, deliveries=deliveries, cursor=cursor
                    )
                )
                if not fed:  # cancelled (or the connection deleted) meanwhile
                    self._outstanding[rid] -= len(deliveries)
                    return
                self._dispatch(deliveries)
            current = await self.replay(rid)
            if current is not None and current.state == "running":
                await self._finish_replay(current, "done")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A replay must not die silently: said once; it resumes at the next start.
            log.error("Replay stopped", connection=cid, replay=rid, error=str(exc))
        finally:
            if self._runs.get(rid) is asyncio.current_task():
                del self._runs[rid]
            self._outstanding.pop(rid, None)
            self._progress.pop(rid, None)

    async def _resync(self, replay_id: str) -> bool:
        """The committed counts bound what is outstanding from above (a completion not yet
        committed is still outstanding there), as the in-memory count does; the lower one is
        closer. It corrects a completion the count missed (one that ended while the daemon
        was starting, before the replay was resumed). Returns whether it is still running."""
        row = await self.replay(replay_id)
        if row is None or row.state != "running":
            return False
        committed = max(0, row.fed - row.done)
        self._outstanding[replay_id] = min(self._outstanding[replay_id], committed)
        return True

    async def _deliveries(self, replay: ReplayRow, rows: Sequence[Any]) -> list[Delivery]:
        index = self._index()
        first = self._spool.allocate(len(rows))
        made = []
        for i, (_, dev_eui, uplink_time, received_at, route, document) in enumerate(rows):
            target = next(
                (
                    t
                    for t in _targets(index, dev_eui, route)
                    if t.connection_id == replay.connection_id
                ),
                None,
            )
            driver = target.driver_id if target is not None else None
            validity = target.validity if target is not None else None
            if driver is not None and self._render is not None:
                document = await self._render(document, driver)
            made.append(
                Delivery(
                    first + i,
                    replay.connection_id,
                    dev_eui,
                    uplink_time,
                    received_at,
                    document,
                    validity,
                    replay.requested_at,
                    None,
                    replay.id,
                )
            )
        return made

    async def _finish_replay(self, replay: ReplayRow, state: str) -> None:
        now = self._clock()

        async def action(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE replays SET state = ?, finished_at = ? WHERE id = ? AND state = 'running'",
                (state, now, replay.id),
            )

        await self._spool.write(action)
        current = await self.replay(replay.id) or replay
        log.info(
            "Replay ended",
            connection=replay.connection_id,
            replay=replay.id,
            state=state,
            delivered=current.delivered,
            expired=current.expired,
            failed=current.failed,
        )
        self._record(
            replay.connection_id,
            "replay_ended",
            {
                "replay": replay.id,
                "state": state,
                "total": current.total,
                "delivered": current.delivered,
                "expired": current.expired,
                "failed": current.failed,
            },
        )

    # -- bounds ----------------------------------------------------------------------------

    async def _prune_loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.prune()
            except Exception as exc:
                log.warning("Pruning failed", error=str(exc))

    async def prune(self) -> dict[str, int]:
        """Apply retention and sizes: the journal's, the dead letters'. Returns what left."""
        now = self._clock()
        journal = self.journal
        letters = self.letters_settings
        counts = {"journal": 0}
        if journal.retention.total_seconds() > 0:
            limit = now - journal.retention.total_seconds()
            counts["journal"] += await self._prune_journal("id < ?", (await self._young(limit),))
            if self._journal_bytes > journal.max_size:
                counts["journal"] += await self._shrink_journal(journal.max_size)
        else:
            counts["journal"] += await self._prune_journal("1", ())
        # Letters and replays of connections deleted while the daemon was down (those
        # deleted while it runs went with their deliveries, `Spool.drop_connection`).
        known = orjson.dumps(sorted(self._index().connections)).decode()
        # Per known connection, through the (connection_id, time) index: a condition on the
        # time alone scanned every letter in the spool's writer at each turn.
        gone = await self._spool.read(
            "SELECT DISTINCT connection_id FROM dead_letters"
            " WHERE connection_id NOT IN (SELECT value FROM json_each(?))",
            (known,),
        )
        for (cid,) in gone:
            await self._spool.drop_connection(str(cid))
            log.info("Dead letters of a deleted connection removed", connection=cid)
        dropped: dict[str, int] = {}
        limit = now - letters.retention.total_seconds()
        expired = await self._prune_letters(
            "connection_id IN (SELECT value FROM json_each(?)) AND time < ? AND resending = 0",
            (known, limit),
        )
        for cid, n in expired.items():
            dropped[cid] = dropped.get(cid, 0) + n
        over = await self._spool.read(
            "SELECT connection_id, count(*) FROM dead_letters GROUP BY connection_id"
            " HAVING count(*) > ?",
            (letters.max_per_connection,),
        )
        for cid, n in over:
            excess = int(n) - letters.max_per_connection
            removed = await self._prune_letters(
                "id IN (SELECT id FROM dead_letters WHERE connection_id = ? ORDER BY id LIMIT ?)",
                (cid, excess),
            )
            for key, value in removed.items():
                dropped[key] = dropped.get(key, 0) + value
        for cid, n in dropped.items():
            if not n:
                continue
            self._metrics.dead_letters_dropped.labels(cid).inc(n)
            log.warning("Dead letters dropped", connection=cid, count=n, why="retention or size")
            self._record(cid, "dead_letters_dropped", {"count": n})
            counts[cid] = n
        await self.update_gauges()
        return counts

    async def _young(self, limit: float) -> int:
        """The id of the oldest journal row received at or after `limit` (past the newest
        row when there is none): the rows before it are the ones retention removes.

        The journal is in arrival order (its id), so this is found from the oldest end at
        the cost of what goes. `received_at < limit` as such has no index and scanned the
        whole journal, in the spool's writer, at every turn: half a second per million
        rows, which live uplinks' commits waited behind. A row received before a clock
        stepped back stays until the rows before it have gone."""
        rows = await self._spool.read(
            "SELECT coalesce((SELECT id FROM journal WHERE received_at >= ? ORDER BY id LIMIT 1),"
            " (SELECT coalesce(max(id), 0) + 1 FROM journal))",
            (limit,),
        )
        return int(rows[0][0])

    async def _prune_journal(self, where: str, values: Sequence[Any]) -> int:
        """Delete the journal rows matching `where`, oldest first, `_PRUNE_CHUNK` a
        transaction: a large prune (the journal turned off, a long downtime) must not hold
        the spool's writer, and so live uplinks' commits, for seconds."""
        chosen = f"SELECT id FROM journal WHERE {where} ORDER BY id LIMIT {_PRUNE_CHUNK}"

        async def action(db: aiosqlite.Connection) -> tuple[int, int]:
            async with db.execute(
                "SELECT count(*), coalesce(sum(length(document) + length(route)), 0)"
                f" FROM journal WHERE id IN ({chosen})",
                values,
            ) as cursor:
                row = await cursor.fetchone()
            if row is None or not row[0]:
                return 0, 0
            # An uplink still pending keeps its document: it was only in its journal row
            # (the spool's `_IN_JOURNAL`); copied back before that row goes.
            await db.execute(
                "UPDATE uplinks SET document ="
                " (SELECT j.document FROM journal AS j WHERE j.id = uplinks.id)"
                f" WHERE length(document) = 0 AND id IN ({chosen})",
                values,
            )
            await db.execute(f"DELETE FROM journal WHERE id IN ({chosen})", values)
            return int(row[0]), int(row[1])

        total = 0
        while True:
            count, size = cast(tuple[int, int], await self._spool.write(action))
            self._journal_bytes = max(0, self._journal_bytes - size - _ROW_OVERHEAD * count)
            total += count
            if count < _PRUNE_CHUNK:
                return total

    async def _shrink_journal(self, max_size: int) -> int:
        """The oldest journal rows go until the journal fits in `max_size` (90% of it, so
        that it is not pruned again at every turn)."""
        goal = self._journal_bytes - int(max_size * 0.9)
        freed = 0
        last = 0
        while freed < goal:
            rows = await self._spool.read(
                "SELECT id, length(document) + length(route) FROM journal WHERE id > ?"
                " ORDER BY id LIMIT 1000",
                (last,),
            )
            if not rows:
                break
            for row_id, size in rows:
                last = row_id
                freed += int(size) + _ROW_OVERHEAD
                if freed >= goal:
                    break
        if not last:
            return 0
        return await self._prune_journal("id <= ?", (last,))

    async def _prune_letters(self, where: str, values: Sequence[Any]) -> dict[str, int]:
        async def action(db: aiosqlite.Connection) -> dict[str, int]:
            async with db.execute(
                f"SELECT connection_id, count(*) FROM dead_letters WHERE {where}"
                " GROUP BY connection_id",
                values,
            ) as cursor:
                found = {str(r[0]): int(r[1]) for r in await cursor.fetchall()}
            if found:
                await db.execute(f"DELETE FROM dead_letters WHERE {where}", values)
            return found

        result: dict[str, int] = await self._spool.write(action)
        return result

    def _letters_changed(self, changes: dict[str, int]) -> None:
        for cid, change in changes.items():
            self._metrics.dead_letters.labels(cid).inc(change)
            self._gauged.add(cid)

    async def update_gauges(self) -> None:
        rows = await self._spool.read(
            "SELECT connection_id, count(*) FROM dead_letters GROUP BY connection_id"
        )
        counts = {str(r[0]): int(r[1]) for r in rows}
        for cid in self._gauged - set(counts):
            self._metrics.dead_letters.labels(cid).set(0)
        for cid, n in counts.items():
            self._metrics.dead_letters.labels(cid).set(n)
        self._gauged = set(counts)


async def _insert_resent(db: aiosqlite.Connection, wanted: list[Delivery]) -> list[Delivery]:
    """In the writer's transaction: each letter still there and not being re-sent is
    flagged and queued again, with its own uplink row."""
    sent = []
    for d in wanted:
        cursor = await db.execute(
            "UPDATE dead_letters SET resending = 1"
            " WHERE id = ? AND connection_id = ? AND resending = 0",
            (d.letter, d.connection_id),
        )
        if cursor.rowcount:
            sent.append(d)
    await _insert_deliveries(db, sent)
    return sent


async def _insert_replayed(
    db: aiosqlite.Connection, replay_id: str, deliveries: list[Delivery], cursor: int
) -> bool:
    """In the writer's transaction: the replay's next deliveries and its cursor, together;
    nothing when it is no longer running."""
    result = await db.execute(
        "UPDATE replays SET cursor = ?, fed = fed + ? WHERE id = ? AND state = 'running'",
        (cursor, len(deliveries), replay_id),
    )
    if not result.rowcount:
        return False
    await _insert_deliveries(db, deliveries)
    return True


async def _insert_deliveries(db: aiosqlite.Connection, deliveries: list[Delivery]) -> None:
    await db.executemany(
        "INSERT INTO uplinks (id, dev_eui, uplink_time, received_at, document)"
        " VALUES (?, ?, ?, ?, ?)",
        [(d.id, d.dev_eui, d.uplink_time, d.received_at, d.document) for d in deliveries],
    )
    await db.executemany(
        "INSERT INTO deliveries (id, uplink_id, connection_id, validity, since, letter, replay)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (d.id, d.id, d.connection_id, d.validity, d.since, d.letter, d.replay)
            for d in deliveries
        ],
    )


def _by(data: dict[str, Any], by: str | None) -> dict[str, Any]:
    """An event's data with who asked for it (an API token's name), when someone did."""
    return {"by": by, **data} if by is not None else data
