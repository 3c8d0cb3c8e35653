"""The spool: a durable local queue of deliveries in SQLite (WAL), written by group commit.

An MQTT uplink is acknowledged to the broker only once `Spool.append` has returned, so a
committed row is the only copy left: the broker forgets the uplink at the PUBACK.

Durability: WAL with `synchronous=FULL`. With WAL, a commit is in the WAL file before
`COMMIT` returns, so both NORMAL and FULL survive a process crash (kill -9). They differ on
an OS crash or power loss: NORMAL may roll back the last transactions, which would lose
uplinks the broker has already forgotten; FULL fsyncs the WAL at every commit. iotflow runs
on gateway hosts, where power loss is an ordinary event, so FULL. Group commit is what makes
FULL affordable: one fsync per batch of up to `max_batch` uplinks, not one per uplink, and
the batch grows by itself while the previous fsync runs. A paced stream (uplinks one at a
time, less than a millisecond apart) would still commit one by one: there the writer waits
a millisecond for the next ones (`_GATHER`). `bench/bench_spool.py
--synchronous` measures both; on a disk whose fsync takes milliseconds (SD card, eMMC) the
difference is all in the per-commit fsync that batching amortises.

Writes: one writer task owns the write connection. `append`, `complete` and
`drop_connection` only queue work; the writer drains the queue into ONE transaction
(`executemany` inserts, then deletes of completed deliveries, then at most one drop),
commits, and resolves the waiting futures in FIFO order. Ids are allocated in memory
(the writer is the only writer), so a batch needs no read-back: its statements and its
commit go to the aiosqlite thread in one hop, whatever its size.

An uplink that is journaled too (issue #14) keeps its document once, in its journal row
(same id), and its uplinks row holds an empty one: the document was written twice in every
commit. Journal pruning copies it back for an uplink still pending (`recovery.py`).

Uplinks without deliveries are deleted by a trigger on `deliveries`, in the same statement
as the delete: measured as fast as an explicit sweep (490k vs 480k deletes/s, batches of
512) and it needs no extra statement, so no extra thread hop, per batch.

Reads use a second connection: under WAL it sees only committed rows, never a batch being
written, and never blocks the writer.

The WAL is kept as small as the backlog: SQLite's own checkpoint runs only once the WAL
holds ~4 MB (1000 pages) and never shrinks the file, so on a disk with a few MB free the
WAL alone fills it, every commit fails, and no checkpoint can run after a failed commit.
So SQLite checkpoints once the WAL holds `wal_limit` bytes (1 MiB) and starts it over
from the beginning (the file is reused, not grown); the writer itself checkpoints with
TRUNCATE when it goes idle (at most once per `_IDLE_CHECKPOINT` seconds), while it
cannot commit, and as a backstop past twice the limit: the WAL stays under `wal_limit`
plus one batch and is empty between bursts. The database file keeps the pages of the
largest backlog it held, for reuse.

When a transaction fails (disk full, I/O error) the spool is *unavailable*: its waiters
get `SpoolFullError` / `SpoolUnavailableError` (nothing of their batch was written) and
the writer retries on its own, with backoff (`retry_initial` doubling to `retry_max`):
a checkpoint (which frees the WAL's space when it can), then the queued completes or a
one-row probe. Appends queued meanwhile are still tried, batched as usual; completes
alone wait for the retry, so a failing disk is not spun on. The first commit that
succeeds makes the spool writable again (`wait_writable` returns). One log line when it
starts ("Spool cannot commit"), one reminder a minute, one when it ends ("Spool commits
again"). The durability argument above is unchanged: a waiter is resolved only by a
committed transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
import structlog

from iotflow.backoff import Backoff
from iotflow.errors import (
    SpoolClosedError,
    SpoolError,
    SpoolFullError,
    SpoolUnavailableError,
    SpoolWriteError,
)

__all__ = [
    "SCHEMA_VERSION",
    "SYNCHRONOUS",
    "DeadLetter",
    "Delivery",
    "Spool",
    "SpoolClosedError",
    "SpoolError",
    "SpoolFullError",
    "SpoolStats",
    "SpoolUnavailableError",
    "SpoolWriteError",
]

log = structlog.get_logger("iotflow.spool")

SCHEMA_VERSION = 4

# Module level rather than an `open` argument: the durability level is a decision of this
# module (see above), not a knob; only the benchmark changes it, to measure the cost.
SYNCHRONOUS = "FULL"

_IDLE_CHECKPOINT = 1.0  # seconds between checkpoints of an idle writer, at least
_REMINDER = 60.0  # seconds between log lines of one unavailability episode, at least
# A paced stream's group commit (issue #16). Uplinks that come close together but each
# alone (a few thousand a second) were a transaction each: an fsync, about eight writes
# and a round of wake-ups of the writer's thread and of the event loop per uplink. When the
# uplink before came less than _GATHER seconds earlier, the writer waits that long before
# a batch of fewer than _GATHER_BELOW, for the next ones to join it. Slower streams do not
# wait (nothing would join), nor do floods (their batches are large already).
_GATHER = 0.001
_GATHER_BELOW = 8
# Seconds a delivery's delete may wait for the next appends' transaction. Uplinks further
# apart than a delivery's round trip (a few hundred a second and fewer) had two transactions
# each, the append's and the delete's. A crash within the wait sends the delivery again, as
# one within a commit does: at least once.
COMPLETE_LINGER = 0.025

# Version 2 to 3: the journal, dead letters and replays (issue #14), one transaction too.
_V3 = """
CREATE TABLE journal (
    id INTEGER PRIMARY KEY,  -- the uplink's id: arrival order
    dev_eui TEXT NOT NULL,
    uplink_time REAL NOT NULL,
    received_at REAL NOT NULL,
    route TEXT NOT NULL,  -- JSON [tags, application, applicationName]: routed again at replay
    document BLOB NOT NULL
);
CREATE INDEX journal_time ON journal (uplink_time);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an id an operator saw stays his
    connection_id TEXT NOT NULL,
    dev_eui TEXT NOT NULL,
    uplink_time REAL NOT NULL,
    received_at REAL NOT NULL,
    document BLOB NOT NULL,  -- as it was to be sent (after the connection's processors)
    original BLOB,  -- before the processors, when they changed it: what a re-send uses
    validity REAL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER,
    body TEXT,
    attempts INTEGER NOT NULL,
    first_attempt REAL,
    last_attempt REAL,
    time REAL NOT NULL,
    resending INTEGER NOT NULL DEFAULT 0  -- 1 while a re-sent copy is pending
);
CREATE INDEX dead_letters_connection ON dead_letters (connection_id, id);
CREATE INDEX dead_letters_time ON dead_letters (connection_id, time);  -- the list's order
CREATE TABLE replays (
    id TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    devices TEXT NOT NULL,  -- JSON list of DevEUIs, resolved at the request
    requested_at REAL NOT NULL,
    state TEXT NOT NULL,
    total INTEGER NOT NULL,
    fed INTEGER NOT NULL DEFAULT 0,
    cursor INTEGER NOT NULL DEFAULT 0,  -- the last journal id fed
    delivered INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    finished_at REAL
);
"""
_SCHEMA = (
    """
BEGIN;
CREATE TABLE uplinks (
    id INTEGER PRIMARY KEY,
    dev_eui TEXT NOT NULL,
    uplink_time REAL NOT NULL,
    received_at REAL NOT NULL,
    document BLOB NOT NULL
);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    uplink_id INTEGER NOT NULL,
    connection_id TEXT NOT NULL,
    validity REAL,  -- seconds, a flow's uplinkTimeValidity; NULL: the connection's
    since REAL,  -- validity counted from (a re-send, a replay); NULL: the uplink's time
    letter INTEGER,  -- the dead letter this delivery re-sends
    replay TEXT  -- the replay that fed it
);
CREATE INDEX deliveries_connection ON deliveries (connection_id, id);
CREATE INDEX deliveries_uplink ON deliveries (uplink_id);
-- The highest id ever allocated: without it an emptied spool would reuse ids after restart.
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('next_id', 1);
CREATE TRIGGER uplinks_gc AFTER DELETE ON deliveries
WHEN NOT EXISTS (SELECT 1 FROM deliveries WHERE uplink_id = OLD.uplink_id)
BEGIN
    DELETE FROM uplinks WHERE id = OLD.uplink_id;
END;
"""
    + _V3
    + """
PRAGMA user_version = 4;
COMMIT;
"""
)

# Version 1 to 2: the per-delivery validity (flows, issue #13). One transaction: a crash
# leaves version 1 whole, and the next open does it again.
_UPGRADE_2 = """
BEGIN;
ALTER TABLE deliveries ADD COLUMN validity REAL;
PRAGMA user_version = 2;
COMMIT;
"""

_UPGRADE_3 = f"""
BEGIN;
ALTER TABLE deliveries ADD COLUMN since REAL;
ALTER TABLE deliveries ADD COLUMN letter INTEGER;
ALTER TABLE deliveries ADD COLUMN replay TEXT;
{_V3}
PRAGMA user_version = 3;
COMMIT;
"""

# Version 3 to 4: an uplink that is journaled too keeps its document in the journal row only
# (same id), and its `uplinks.document` is empty (issue #16: the document was written twice
# in every group commit). No table changes: the version says that an empty document means
# "see the journal", so that an older iotflow, which would read it as empty, refuses the file.
# A journal row has the id of its uplink's row only when both come from the same append: an
# empty document with no journal row of that id is an empty document.
_UPGRADE_4 = """
BEGIN;
PRAGMA user_version = 4;
COMMIT;
"""
_IN_JOURNAL = b""  # uplinks.document of an uplink whose document is its journal row's

_INSERT_UPLINK = (
    "INSERT INTO uplinks (id, dev_eui, uplink_time, received_at, document) VALUES (?, ?, ?, ?, ?)"
)
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (id, uplink_id, connection_id, validity, since, letter, replay)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_JOURNAL = (
    "INSERT INTO journal (id, dev_eui, uplink_time, received_at, route, document)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_LETTER = (
    "INSERT INTO dead_letters (connection_id, dev_eui, uplink_time, received_at, document,"
    " original, validity, outcome, reason, status, body, attempts, first_attempt,"
    " last_attempt, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A re-sent letter that fails again is the same letter again, with the new attempts.
_UPDATE_LETTER = (
    "UPDATE dead_letters SET outcome = ?, reason = ?, status = ?, body = ?,"
    " attempts = attempts + ?, last_attempt = ?, time = ?, resending = 0 WHERE id = ?"
)
_DELETE_LETTER = "DELETE FROM dead_letters WHERE id = ?"
_RELEASE_LETTER = "UPDATE dead_letters SET resending = 0 WHERE id = ?"
_DROP_LETTERS = "DELETE FROM dead_letters WHERE connection_id = ?"
_CANCEL_REPLAYS = (
    "UPDATE replays SET state = 'cancelled', finished_at = ?"
    " WHERE connection_id = ? AND state = 'running'"
)
_DELETE_DELIVERY = "DELETE FROM deliveries WHERE id = ?"
_DROP_CONNECTION = "DELETE FROM deliveries WHERE connection_id = ?"
_UPDATE_NEXT_ID = "UPDATE meta SET value = ? WHERE key = 'next_id'"

_SELECT = (
    "SELECT d.id, d.connection_id, u.dev_eui, u.uplink_time, u.received_at,"
    " CASE WHEN length(u.document) THEN u.document"
    " ELSE coalesce((SELECT j.document FROM journal AS j WHERE j.id = u.id), u.document) END,"
    " d.validity, d.since, d.letter, d.replay"
    " FROM deliveries AS d JOIN uplinks AS u ON u.id = d.uplink_id"
    " WHERE d.connection_id = ? AND d.id > ?"
)
# Completes not yet committed are still rows; `?` is a JSON array of their ids.
_NOT_COMPLETED = " AND d.id NOT IN (SELECT value FROM json_each(?))"
# A worker's lanes (delivery/worker.py): replayed and re-sent deliveries, or the others.
_LANES = {
    None: "",
    True: " AND (d.replay IS NOT NULL OR d.letter IS NOT NULL)",
    False: " AND d.replay IS NULL AND d.letter IS NULL",
}
_LOAD = {lane: _SELECT + where + " ORDER BY d.id LIMIT ?" for lane, where in _LANES.items()}
_LOAD_EXCLUDING = {
    lane: _SELECT + where + _NOT_COMPLETED + " ORDER BY d.id LIMIT ?"
    for lane, where in _LANES.items()
}
_COUNTS = "SELECT connection_id, count(*) FROM deliveries AS d GROUP BY connection_id"
_COUNTS_EXCLUDING = (
    "SELECT connection_id, count(*) FROM deliveries AS d"
    " WHERE d.id NOT IN (SELECT value FROM json_each(?)) GROUP BY connection_id"
)


@dataclass(slots=True)
class Delivery:
    """One uplink to deliver to one connection."""

    id: int  # unique, increasing in arrival order across the spool
    connection_id: str
    dev_eui: str
    uplink_time: float  # epoch seconds (the uplink's own time, for expiry)
    received_at: float  # epoch seconds (when iotflow received it, for latency)
    document: bytes  # the uplink document as JSON bytes, shared by all deliveries of one uplink
    validity: float | None = None  # seconds: a flow's uplinkTimeValidity; None: the connection's
    since: float | None = None  # validity counted from (re-send, replay); None: uplink_time
    letter: int | None = None  # the dead letter this delivery re-sends
    replay: str | None = None  # the replay that fed it
    attempts: int = 0  # in memory only
    first_attempt: float | None = None  # epoch seconds, in memory only
    last_attempt: float | None = None
    # In memory: the document before the connection's processors, when they changed it
    # (a dead letter keeps both: what was to be sent, and what a re-send starts from).
    source: bytes | None = None


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A delivery that ended failed or expired, as `complete` writes it."""

    outcome: str  # "failed" | "expired"
    reason: str  # redacted by the worker
    status: int | None
    body: str | None  # redacted and truncated by the worker
    time: float  # when it became a dead letter


@dataclass(slots=True)
class _Final:
    """What completing a delivery writes besides deleting its row."""

    delivery: Delivery
    outcome: str
    letter: DeadLetter | None


@dataclass(slots=True)
class SpoolStats:
    """Counters of the writer, for metrics and tests."""

    transactions: int = 0  # committed
    failed_transactions: int = 0
    uplinks: int = 0  # committed uplink rows
    deliveries: int = 0  # committed delivery rows
    completed: int = 0  # completes committed (including ids that were already gone)
    dropped: int = 0  # deliveries deleted by drop_connection
    largest_batch: int = 0  # uplinks in the largest transaction
    checkpoints: int = 0  # TRUNCATE checkpoints of the writer that completed (not SQLite's own)
    wal_peak: int = 0  # bytes: the largest WAL seen after a commit
    unavailable: int = 0  # episodes of failing commits


@dataclass(slots=True)
class _Append:
    uplink: tuple[int, str, float, float, bytes]
    deliveries: list[Delivery]
    future: asyncio.Future[list[Delivery]]
    route: str | None = None  # journaled with this route (JSON) when not None


@dataclass(slots=True)
class _Write:
    """Statements of a caller, run inside the writer's transaction (re-sends, replays,
    pruning): committed with the batch, or not at all."""

    action: Callable[[aiosqlite.Connection], Awaitable[Any]]
    future: asyncio.Future[Any]
    result: Any = None


@dataclass(slots=True)
class _Drop:
    connection_id: str
    future: asyncio.Future[int]


@dataclass(slots=True)
class _Barrier:
    future: asyncio.Future[None]


_Op = _Append | _Drop | _Barrier | _Write


@dataclass(slots=True)
class _Batch:
    ops: list[_Op] = field(default_factory=list)
    appends: list[_Append] = field(default_factory=list)
    writes: list[_Write] = field(default_factory=list)
    drop: _Drop | None = None
    completes: list[int] = field(default_factory=list)
    finals: list[_Final] = field(default_factory=list)
    letters: dict[str, int] = field(default_factory=dict)  # dead letters gained, by connection


class Spool:
    """The durable queue of deliveries. Create it with `await Spool.open(path)`."""

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        next_id: int,
        max_batch: int,
        wal_limit: int = 1 << 20,
        retry_initial: float = 0.25,
        retry_max: float = 5.0,
    ) -> None:
        self.path = path
        self.stats = SpoolStats()
        # Told after a commit how many dead letters each connection gained (or lost).
        self.on_letters: Callable[[dict[str, int]], None] | None = None
        self._writer = writer
        self._reader = reader
        self._next_id = next_id
        self._max_batch = max_batch
        self._ops: deque[_Op] = deque()
        self._completes: list[int] = []  # queued for the next batch
        self._finals: list[_Final] = []  # completes that also write a dead letter or a count
        self._completing: set[int] = set()  # queued or in a batch not yet committed
        self._linger: asyncio.TimerHandle | None = None  # wakes the writer for completes
        self._wakeup = asyncio.Event()
        self._last_submit = -math.inf  # loop time of the last append
        self._dense = False  # it came less than _GATHER after the one before
        self._closed = False  # no more work accepted
        self._closing = False  # close() has been called
        self._stopping = False  # the writer exits once idle
        self._finished = asyncio.Event()
        self._inflight: list[_Op] = []
        self._wal = Path(f"{path}-wal")
        self._wal_limit = wal_limit
        # Doubling without jitter: one writer, and a spacing the tests can predict.
        self._backoff = Backoff(retry_initial, retry_max, jitter="none")
        self._loop = loop = asyncio.get_running_loop()
        self._now = loop.time
        self._last_checkpoint = self._now()
        self._wal_dirty = False  # committed since the last complete TRUNCATE
        # Unavailability: the error of the last failed transaction, None while commits work.
        self._fault: Exception | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._fault_since = 0.0
        self._retry_at = 0.0
        self._retry_wait = 0.0  # the last wait before a retry
        self._warned_at = -_REMINDER  # when the last warning of an episode was logged
        self._warned = False  # this episode's warning was logged: log its end too
        self._recovered_at = -_REMINDER
        self._task = asyncio.create_task(self._run(), name="spool-writer")

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        max_batch: int = 512,
        wal_limit: int = 1 << 20,
        retry_initial: float = 0.25,
        retry_max: float = 5.0,
    ) -> Spool:
        """Open (or create) the spool at `path` and start its writer.

        `wal_limit`: WAL bytes past which the writer checkpoints; `retry_initial` and
        `retry_max`: the backoff (seconds) of its retries while it cannot commit.
        """
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if wal_limit < 0 or not 0 < retry_initial <= retry_max:
            raise ValueError("wal_limit must be >= 0 and 0 < retry_initial <= retry_max")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(path)
        reader: aiosqlite.Connection | None = None
        try:
            next_id = await _prepare(writer, path, wal_limit)
            reader = await aiosqlite.connect(path, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout = 5000")
            await reader.execute("PRAGMA query_only = ON")
        except BaseException:
            # Don't leave aiosqlite threads running behind a failed open.
            await writer.close()
            if reader is not None:
                await reader.close()
            raise
        return cls(path, writer, reader, next_id, max_batch, wal_limit, retry_initial, retry_max)

    async def append(
        self,
        document: bytes,
        *,
        dev_eui: str,
        uplink_time: float,
        received_at: float,
        connection_ids: Sequence[str],
        validity: Mapping[str, float | None] | None = None,
        journal: str | None = None,
    ) -> list[Delivery]:
        """Spool one uplink for each connection; return once its group commit is durable.

        `submit`, awaited: see there.
        """
        # Cancelling the caller cancels only this future: the op stays queued and is
        # written whole with its batch, or not at all.
        return await self.submit(
            document,
            dev_eui=dev_eui,
            uplink_time=uplink_time,
            received_at=received_at,
            connection_ids=connection_ids,
            validity=validity,
            journal=journal,
        )

    def submit(
        self,
        document: bytes,
        *,
        dev_eui: str,
        uplink_time: float,
        received_at: float,
        connection_ids: Sequence[str],
        validity: Mapping[str, float | None] | None = None,
        journal: str | None = None,
    ) -> asyncio.Future[list[Delivery]]:
        """Queue one uplink for each connection; the future resolves once its group commit
        is durable. Not a coroutine, so that the daemon's ingest needs no task per uplink.

        Fails with `SpoolFullError` (disk full) or `SpoolUnavailableError` (another write
        failure) when that transaction failed: nothing of it was written, and
        `wait_writable` tells when to try again. `SpoolClosedError` after `close`.
        A duplicate connection id gets one delivery. `validity` gives a connection's
        delivery its own uplinkTimeValidity (seconds; a flow's), stored with it.
        `journal`: the uplink's route (JSON), to keep it in the journal too, in the same
        transaction (also when it goes to no connection).
        """
        self._check_open()
        future: asyncio.Future[list[Delivery]] = asyncio.get_running_loop().create_future()
        targets = list(dict.fromkeys(connection_ids))
        if not targets and journal is None:
            future.set_result([])
            return future
        # Allocated now, in call order, so ids increase in arrival order; a failed batch
        # leaves a gap rather than reusing ids a caller may have seen.
        uplink_id = self._next_id
        self._next_id += max(len(targets), 1)
        deliveries = [
            Delivery(
                uplink_id + i,
                cid,
                dev_eui,
                uplink_time,
                received_at,
                document,
                validity.get(cid) if validity else None,
            )
            for i, cid in enumerate(targets)
        ]
        uplink = (uplink_id, dev_eui, uplink_time, received_at, document)
        self._ops.append(_Append(uplink, deliveries, future, journal))
        now = self._now()
        self._dense = now - self._last_submit < _GATHER
        self._last_submit = now
        self._wakeup.set()
        return future

    def complete(
        self,
        delivery_id: int,
        *,
        final: Delivery | None = None,
        outcome: str = "",
        letter: DeadLetter | None = None,
    ) -> None:
        """Mark a delivery done; its row goes in the next batch (no wait), within
        COMPLETE_LINGER when nothing else is written before.

        `final` (the delivery), when it re-sent a dead letter, was fed by a replay or ends
        as a dead letter (`letter`): that is written in the same transaction as the delete,
        so that a crash neither loses nor duplicates it.
        """
        self._check_open()
        if delivery_id in self._completing:
            return
        self._completing.add(delivery_id)
        if final is not None:
            self._finals.append(_Final(final, outcome, letter))
        else:
            self._completes.append(delivery_id)
        if self._fault is not None:
            return  # they wait for the writer's next retry
        if final is None and len(self._completes) < self._max_batch:
            # The next appends take it along, or the writer comes for it (COMPLETE_LINGER).
            if self._linger is None:
                self._linger = self._loop.call_later(COMPLETE_LINGER, self._wakeup.set)
        else:
            self._wakeup.set()

    async def flush(self) -> None:
        """Wait until everything queued so far (appends and completes) is committed.

        Raises `SpoolUnavailableError` if that transaction failed, or at once while the
        spool is unavailable and completes wait; failed completes stay queued.
        """
        self._check_open()
        if self._fault is not None and (self._completes or self._finals):
            raise _error(self._fault)
        await self._barrier()

    @property
    def writable(self) -> bool:
        """False while the spool cannot commit (its last transaction failed) or is closed."""
        return self._fault is None and not self._closed

    async def wait_writable(self) -> None:
        """Return once the spool commits again (at once while it does).

        Raises `SpoolClosedError` if it is closed first.
        """
        self._check_open()
        await self._writable.wait()
        self._check_open()

    def wal_bytes(self) -> int:
        """The size of the WAL file now."""
        try:
            return self._wal.stat().st_size
        except FileNotFoundError:
            return 0

    async def load(
        self,
        connection_id: str,
        *,
        after_id: int = 0,
        limit: int = 1000,
        background: bool | None = None,
    ) -> list[Delivery]:
        """Pending deliveries of one connection with id > after_id, in id order; only the
        replayed and re-sent ones (`background`), only the others (False), or all (None)."""
        self._check_open()
        excluded = self._excluded()
        if excluded is None:
            rows = await self._reader.execute_fetchall(
                _LOAD[background], (connection_id, after_id, limit)
            )
        else:
            rows = await self._reader.execute_fetchall(
                _LOAD_EXCLUDING[background], (connection_id, after_id, excluded, limit)
            )
        return [Delivery(*row) for row in rows]

    async def pending_counts(self) -> dict[str, int]:
        """Pending deliveries by connection id."""
        self._check_open()
        excluded = self._excluded()
        if excluded is None:
            rows = await self._reader.execute_fetchall(_COUNTS)
        else:
            rows = await self._reader.execute_fetchall(_COUNTS_EXCLUDING, (excluded,))
        return {str(row[0]): int(row[1]) for row in rows}

    async def connection_ids(self) -> list[str]:
        """Ids of the connections that have pending deliveries, sorted."""
        return sorted(await self.pending_counts())

    def allocate(self, count: int) -> int:
        """Reserve `count` ids (for deliveries a `write` inserts); return the first.

        Reserved at the call, like `append`'s: ids increase in the order callers queue."""
        first = self._next_id
        self._next_id += count
        return first

    async def write(self, action: Callable[[aiosqlite.Connection], Awaitable[Any]]) -> Any:
        """Run `action(db)` inside the next batch's transaction; return its result once
        committed. Raises like `append` when that transaction fails."""
        self._check_open()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append(_Write(action, future))
        self._wakeup.set()
        return await future

    async def read(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Rows of a query on the reader connection (committed rows only)."""
        self._check_open()
        return list(await self._reader.execute_fetchall(sql, parameters))

    async def drop_connection(self, connection_id: str) -> int:
        """Delete all pending deliveries of a connection, its dead letters and replays;
        return how many deliveries there were."""
        self._check_open()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._ops.append(_Drop(connection_id, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the database.

        The database is closed whatever happens. Raises `SpoolUnavailableError` when the
        spool could not commit at the end (after one last try): completes that were not
        committed are delivered again after a restart, appends were not acknowledged.
        """
        if self._closing:
            await self._finished.wait()
            return
        self._closing = self._closed = True
        self._writable.set()  # wake `wait_writable` callers: they see the spool closed
        try:
            if not self._task.done():
                with contextlib.suppress(SpoolWriteError):
                    await self._barrier()
        finally:
            self._stopping = True
            self._wakeup.set()
            await asyncio.wait([self._task])  # waits without re-raising its outcome
            try:
                await self._writer.close()
            finally:
                await self._reader.close()
                self._finished.set()
        if self._fault is not None:
            raise _error(
                self._fault,
                f"spool {self.path} closed without committing"
                f" {len(self._completes)} completes: {self._fault}",
            )

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosedError(f"spool {self.path} is closed")

    def _excluded(self) -> str | None:
        """The uncommitted completes as a JSON array, or None when there are none."""
        if not self._completing:
            return None
        return orjson.dumps(list(self._completing)).decode()

    async def _barrier(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops.append(_Barrier(future))
        self._wakeup.set()
        await future

    async def _run(self) -> None:
        try:
            while True:
                if self._fault is None and not self._wal_dirty:
                    await self._wakeup.wait()
                else:
                    # Unavailable: ops still wake us (their callers wait), the retry is due
                    # at `_retry_at`; completes alone do not wake us. Idle with a WAL: it
                    # is emptied `_IDLE_CHECKPOINT` after the last checkpoint.
                    due = self._last_checkpoint + _IDLE_CHECKPOINT
                    if self._fault is not None:
                        due = self._retry_at
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), max(due - self._now(), 0.0))
                self._wakeup.clear()
                if self._fault is not None and (self._stopping or self._now() >= self._retry_at):
                    await self._retry()
                if self._dense and 0 < len(self._ops) < _GATHER_BELOW and self._fault is None:
                    await asyncio.sleep(_GATHER)  # the next uplinks of a paced stream join
                while self._ops or ((self._completes or self._finals) and self._fault is None):
                    await self._write_batch()
                if self._fault is None:
                    await self._checkpoint_if_due(idle=True)
                if self._stopping:
                    if self._fault is not None:
                        await self._retry()  # one last try before closing
                    return
        finally:
            # Only reached early if the task is cancelled (event loop teardown): nobody
            # may be left waiting on a future that will never be resolved.
            self._closed = True
            error = SpoolClosedError(f"spool {self.path} writer stopped")
            for op in [*self._inflight, *self._ops]:
                if not op.future.done():
                    op.future.set_exception(error)
            self._ops.clear()

    def _take_batch(self) -> _Batch:
        batch = _Batch(completes=self._completes, finals=self._finals)
        self._completes = []
        self._finals = []
        if self._linger is not None:
            self._linger.cancel()  # its completes go now
            self._linger = None
        while self._ops and len(batch.appends) < self._max_batch:
            op = self._ops.popleft()
            batch.ops.append(op)
            if isinstance(op, _Append):
                batch.appends.append(op)
            elif isinstance(op, _Write):
                batch.writes.append(op)
            elif isinstance(op, _Drop):
                # A drop closes the batch: appends queued after it must survive it.
                batch.drop = op
                break
        return batch

    async def _write_batch(self, *, probe: bool = False) -> bool:
        """Write one batch in one transaction; return whether it committed.

        `probe`: a batch with nothing to write still writes (one row), to learn whether
        the spool commits again.
        """
        batch = self._take_batch()
        self._inflight = batch.ops
        try:
            empty = (
                not batch.appends
                and batch.drop is None
                and not batch.completes
                and not batch.finals
                and not batch.writes
            )
            if empty and not (probe and self._fault is not None):
                for op in batch.ops:  # only barriers: everything before them is committed
                    _resolve(op, 0)
                return True
            try:
                dropped = await self._transact(batch)
            except Exception as exc:
                await self._rollback()
                # Completes are still owed: first in line for the next batch.
                self._completes = batch.completes + self._completes
                self._finals = batch.finals + self._finals
                self.stats.failed_transactions += 1
                self._failed(exc, batch)
                for op in batch.ops:
                    _fail(op, exc)
                return False
            self._completing.difference_update(batch.completes)
            self._completing.difference_update(f.delivery.id for f in batch.finals)
            self._record(batch, dropped)
            if batch.letters and self.on_letters is not None:
                self.on_letters(batch.letters)
            if self._fault is not None:
                self._recovered()
            if self._warned and not empty:
                self._warned = False  # a probe alone does not end the episode in the log
                log.info(
                    "Spool commits again",
                    path=str(self.path),
                    seconds=round(self._now() - self._fault_since, 3),
                    failed_transactions=self.stats.failed_transactions,
                )
            for op in batch.ops:
                _resolve(op, dropped)
            await self._checkpoint_if_due(idle=False)
            return True
        finally:
            self._inflight = []

    def _failed(self, exc: Exception, batch: _Batch) -> None:
        """A transaction failed: the spool is unavailable until one commits."""
        now = self._now()
        if self._fault is None:
            if not self._warned:  # a flap within a logged episode keeps its start
                self._fault_since = now
            self.stats.unavailable += 1
            self._writable.clear()
            # A spool that flaps (room for a probe, not for a batch) backs off further.
            if now - self._recovered_at > _REMINDER:
                self._backoff.reset()
            self._retry_wait = self._backoff.next()
            self._retry_at = now + self._retry_wait
            if now - self._warned_at >= _REMINDER:
                self._warned_at = now
                self._warned = True
                log.warning(
                    "Spool cannot commit",
                    path=str(self.path),
                    uplinks=len(batch.appends),
                    completes=len(batch.completes),
                    error=str(exc),
                )
        else:
            log.debug("Spool write failed", path=str(self.path), error=str(exc))
        self._fault = exc

    def _recovered(self) -> None:
        self._fault = None
        self._writable.set()
        self._recovered_at = self._now()
        self._wakeup.set()  # completes that waited go in the next batch

    async def _retry(self) -> None:
        """While unavailable: free the WAL if possible, then commit what waits (or a probe)."""
        await self._checkpoint()
        if await self._write_batch(probe=True):
            return
        now = self._now()
        self._retry_wait = self._backoff.next()
        self._retry_at = now + self._retry_wait
        if now - self._warned_at >= _REMINDER:
            self._warned_at = now
            self._warned = True
            log.warning(
                "Spool still cannot commit",
                path=str(self.path),
                seconds=round(now - self._fault_since, 3),
                completes=len(self._completes),
                error=str(self._fault),
            )

    async def _checkpoint_if_due(self, *, idle: bool) -> None:
        size = self.wal_bytes()
        self.stats.wal_peak = max(self.stats.wal_peak, size)
        self._wal_dirty = size > 0
        if size == 0:
            return
        # Under load SQLite's own checkpoint keeps the WAL near `wal_limit` (see `_prepare`);
        # this one empties it when idle, or when a reader kept SQLite's from completing.
        if size >= 2 * self._wal_limit or (
            idle and self._now() - self._last_checkpoint >= _IDLE_CHECKPOINT
        ):
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (when no reader holds it)."""
        self._last_checkpoint = self._now()
        try:
            async with self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                row = await cursor.fetchone()
        except Exception as exc:
            # Disk full may refuse it too (the database file has to grow); retried later.
            log.debug("Spool checkpoint failed", path=str(self.path), error=str(exc))
            return
        if row is not None and row[0] == 0:
            self.stats.checkpoints += 1
            self._wal_dirty = False

    async def _transact(self, batch: _Batch) -> int:
        """One transaction for the batch. Its rows go in one hop to the writer's thread
        (aiosqlite makes one of every statement: six for a batch of appends and completes,
        each a wake-up of that thread and then of the event loop); the writes that recovery
        hands in are coroutines on the connection and run between the rows and the commit.
        """
        db = self._writer
        probe = not (
            batch.appends
            or batch.completes
            or batch.drop is not None
            or batch.finals
            or batch.writes
        )
        last = not batch.writes and batch.drop is None
        letters = await _in_writer_thread(db, _write_rows, batch, self._next_id, probe, last)
        for cid, change in letters.items():
            batch.letters[cid] = batch.letters.get(cid, 0) + change
        if last:
            return 0
        for write in batch.writes:
            write.result = await write.action(db)
        drop = batch.drop.connection_id if batch.drop is not None else None
        dropped: int = await _in_writer_thread(
            db, _write_end, self._next_id if batch.writes else None, drop, time.time()
        )
        return dropped

    async def _rollback(self) -> None:
        try:
            await self._writer.rollback()
        except Exception as exc:
            # SQLite may already have rolled back (e.g. on SQLITE_FULL); the next batch
            # starts a new transaction either way.
            log.debug("Spool rollback failed", path=str(self.path), error=str(exc))

    def _record(self, batch: _Batch, dropped: int) -> None:
        stats = self.stats
        stats.transactions += 1
        stats.uplinks += len(batch.appends)
        stats.deliveries += sum(len(a.deliveries) for a in batch.appends)
        stats.completed += len(batch.completes) + len(batch.finals)
        stats.dropped += dropped
        stats.largest_batch = max(stats.largest_batch, len(batch.appends))


_COUNTERS = {"delivered": "delivered", "filtered": "delivered", "expired": "expired"}


def _in_writer_thread(db: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(connection, *args)` in aiosqlite's thread, with its sqlite3 connection: one hop
    for many statements. aiosqlite has no public call for this (`_execute`, `_conn`)."""
    connection = db._conn
    return db._execute(fn, connection, *args)  # type: ignore[no-untyped-call]


def _write_rows(
    db: sqlite3.Connection, batch: _Batch, next_id: int, probe: bool, commit: bool
) -> dict[str, int]:
    """The batch's appends, completes and ends (in the writer's thread); committed when
    nothing else is to be written in the transaction. Returns the change in each
    connection's number of dead letters."""
    if probe:
        db.execute(_UPDATE_NEXT_ID, (next_id,))
    if batch.appends:
        # An uplink without deliveries is only journaled: no row that nothing would
        # ever delete.
        # A journaled uplink's document is written once, in its journal row.
        db.executemany(
            _INSERT_UPLINK,
            [
                (*a.uplink[:4], _IN_JOURNAL) if a.route else a.uplink
                for a in batch.appends
                if a.deliveries
            ],
        )
        db.executemany(
            _INSERT_DELIVERY,
            [
                (d.id, a.uplink[0], d.connection_id, d.validity, None, None, None)
                for a in batch.appends
                for d in a.deliveries
            ],
        )
        journal = [(*a.uplink[:4], a.route, a.uplink[4]) for a in batch.appends if a.route]
        if journal:
            db.executemany(_INSERT_JOURNAL, journal)
        db.execute(_UPDATE_NEXT_ID, (next_id,))
    # After the inserts, so a complete can never precede its own row; before the drop,
    # so that the drop counts only live deliveries.
    if batch.completes:
        db.executemany(_DELETE_DELIVERY, [(i,) for i in batch.completes])
    letters: dict[str, int] = {}
    for final in batch.finals:
        change = _write_final(db, final)
        if change:
            cid = final.delivery.connection_id
            letters[cid] = letters.get(cid, 0) + change
    if commit:
        db.commit()
    return letters


def _write_end(db: sqlite3.Connection, next_id: int | None, drop: str | None, now: float) -> int:
    """After recovery's writes: the id counter they may have used, a connection's drop,
    and the commit (in the writer's thread). Returns the deliveries dropped."""
    if next_id is not None:
        # A write may have used ids reserved by `allocate`.
        db.execute(_UPDATE_NEXT_ID, (next_id,))
    dropped = 0
    if drop is not None:
        dropped = db.execute(_DROP_CONNECTION, (drop,)).rowcount
        db.execute(_DROP_LETTERS, (drop,))
        db.execute(_CANCEL_REPLAYS, (now, drop))
    db.commit()
    return dropped


def _write_final(db: sqlite3.Connection, final: _Final) -> int:
    """Delete a delivery, and write what its end means: its dead letter (new, or the one
    it re-sent, again), or the letter it re-sent gone; its replay's count. Returns the
    change in the connection's number of dead letters."""
    d = final.delivery
    cursor = db.execute(_DELETE_DELIVERY, (d.id,))
    if cursor.rowcount == 0:
        return 0  # dropped with its connection meanwhile: it ends nowhere
    letter = final.letter
    change = 0
    if final.outcome == "dropped":
        # Never sent (its connection has no worker): the letter may be re-sent again.
        if d.letter is not None:
            db.execute(_RELEASE_LETTER, (d.letter,))
    elif d.letter is not None and letter is None:
        cursor = db.execute(_DELETE_LETTER, (d.letter,))
        change = -cursor.rowcount
    elif letter is not None:
        updated = 0
        if d.letter is not None:
            cursor = db.execute(
                _UPDATE_LETTER,
                (
                    letter.outcome,
                    letter.reason,
                    letter.status,
                    letter.body,
                    d.attempts,
                    d.last_attempt,
                    letter.time,
                    d.letter,
                ),
            )
            updated = cursor.rowcount
        if not updated:  # a first failure, or its letter was purged while it was re-sent
            change = 1
            db.execute(
                _INSERT_LETTER,
                (
                    d.connection_id,
                    d.dev_eui,
                    d.uplink_time,
                    d.received_at,
                    d.document,
                    d.source,
                    d.validity,
                    letter.outcome,
                    letter.reason,
                    letter.status,
                    letter.body,
                    d.attempts,
                    d.first_attempt,
                    d.last_attempt,
                    letter.time,
                ),
            )
    if d.replay is not None:
        column = _COUNTERS.get(final.outcome, "failed")
        db.execute(f"UPDATE replays SET {column} = {column} + 1 WHERE id = ?", (d.replay,))
    return change


def _resolve(op: _Op, dropped: int) -> None:
    # A caller that was cancelled has cancelled its own future: skip it.
    if op.future.done():
        return
    if isinstance(op, _Append):
        op.future.set_result(op.deliveries)
    elif isinstance(op, _Write):
        op.future.set_result(op.result)
    elif isinstance(op, _Drop):
        op.future.set_result(dropped)
    else:
        op.future.set_result(None)


def _fail(op: _Op, cause: Exception) -> None:
    if op.future.done():
        return
    # One exception object per waiter: a shared one would collect every waiter's traceback.
    op.future.set_exception(_error(cause))


def _error(cause: Exception, message: str = "") -> SpoolUnavailableError:
    """The typed error for a failed transaction: full, or unavailable for another reason."""
    full = getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    kind = SpoolFullError if full else SpoolUnavailableError
    error = kind(message or f"spool write failed: {cause}")
    error.__cause__ = cause
    return error


async def _prepare(db: aiosqlite.Connection, path: Path, wal_limit: int) -> int:
    """Set the pragmas, create or check the schema; return the next id to allocate."""
    async with db.execute("PRAGMA journal_mode = WAL") as cursor:
        row = await cursor.fetchone()
    if row is None or str(row[0]).lower() != "wal":
        raise SpoolError(f"spool {path}: cannot use WAL mode (got {row})")
    await db.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
    await db.execute("PRAGMA busy_timeout = 5000")
    # SQLite's checkpoint after a commit (in the same call: no extra thread hop) once the
    # WAL holds `wal_limit` bytes of pages, not its default 1000 pages (~4 MB). The file is
    # truncated when the WAL starts over only past 4 x `wal_limit` (a huge batch): under
    # steady load it is reused at ~`wal_limit`, since truncating it at every restart and
    # growing it again cost ~35% of throughput flat out (bench_spool.py); an idle writer
    # empties it anyway.
    page_size = await _scalar(db, "PRAGMA page_size")
    await db.execute(f"PRAGMA wal_autocheckpoint = {max(wal_limit // page_size, 1)}")
    await db.execute(f"PRAGMA journal_size_limit = {4 * wal_limit}")
    version = await _scalar(db, "PRAGMA user_version")
    if version == 0:
        await db.executescript(_SCHEMA)
    elif version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool {path} has schema version {version}; this iotflow knows up to {SCHEMA_VERSION}"
        )
    if version == 1:
        await db.executescript(_UPGRADE_2)
        version = 2
    if version == 2:
        await db.executescript(_UPGRADE_3)
        version = 3
    if version == 3:
        await db.executescript(_UPGRADE_4)
    last = max(
        await _scalar(db, "SELECT coalesce(max(id), 0) FROM deliveries"),
        await _scalar(db, "SELECT coalesce(max(id), 0) FROM uplinks"),
    )
    stored = await _scalar(db, "SELECT value FROM meta WHERE key = 'next_id'")
    return max(last + 1, stored)


async def _scalar(db: aiosqlite.Connection, sql: str) -> int:
    async with db.execute(sql) as cursor:
        row = await cursor.fetchone()
    if row is None:
        raise SpoolError(f"spool schema is damaged: {sql!r} returned no row")
    return int(row[0])
