"""The alarm evaluator: trailing-hour uplink rates, raised and cleared during windows.

Semantics (docs/architecture.md "Alarms"):
- The rate of a connection is the number of uplinks routed to it in the trailing 60 minutes,
  counted in minute buckets. Buckets live in the registry, so that several instances sharing
  one database (and one MQTT share group) count every uplink once, whoever received it.
- At every minute boundary (plus a few seconds, so that every instance has written the
  minute just ended) each alarm whose window is open is evaluated, once 60 minutes of that
  window have been observed by this instance (a window that started before the daemon counts
  from the daemon's start). Below `uplinkRateMinPerHour`: raised. At or above it again, or
  when the window ends: cleared.
- Raise and clear are a compare-and-set on the alarm's state in the registry: of several
  instances, exactly one announces each change (event, log line, notify message); the
  state survives a restart, so a raised alarm is re-evaluated, never raised twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from iotflow.alarms.clock import Clock
from iotflow.alarms.model import Alarm
from iotflow.alarms.schedule import Schedule, Window
from iotflow.connectors.connection import Connection
from iotflow.registry import AlarmState, Store
from iotflow.telemetry.logging import get_logger
from iotflow.telemetry.metrics import Metrics

log = get_logger("iotflow.alarms")

HOUR = 3600.0
SETTLE = 5.0  # seconds after a minute boundary before evaluating it
PRUNE_EVERY = 30  # minutes between prunings of old buckets
Notify = Callable[[dict[str, Any]], Awaitable[None]]
Record = Callable[[str, str, dict[str, Any]], None]


def fingerprint(alarm: Alarm) -> str:
    """Identity of an alarm's definition: an edited alarm starts over, clear."""
    encoded = orjson.dumps(alarm.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(encoded).hexdigest()[:16]


def iso(epoch: float | datetime | None) -> str | None:
    if epoch is None:
        return None
    if isinstance(epoch, datetime):
        return epoch.astimezone(UTC).isoformat(timespec="seconds")
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class _Watched:
    connection_id: str
    index: int
    alarm: Alarm
    schedule: Schedule
    fingerprint: str


class Alarms:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        record: Record,
        *,
        notify: Notify | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._record = record
        self._notify = notify
        self.clock = clock or Clock()
        self._started = self.clock.now()
        self._counts: Counter[tuple[str, int]] = Counter()
        self._watched: dict[tuple[str, int], _Watched] = {}
        self._schedules: dict[str, Schedule] = {}  # by fingerprint: rebuilt only when edited
        self._states: dict[tuple[str, int], AlarmState] = {}
        self._last: dict[tuple[str, int], dict[str, Any]] = {}  # what the API shows
        self._task: asyncio.Task[None] | None = None
        self._ticks = 0
        self._failed: dict[tuple[str, int], str] = {}  # alarms whose window failed, by fingerprint

    # -- inputs ----------------------------------------------------------------------------

    def count(self, connection_ids: Iterable[str]) -> None:
        """Uplinks just routed to these connections (one each)."""
        minute = int(self.clock.now() // 60)
        for connection_id in connection_ids:
            self._counts[(connection_id, minute)] += 1

    def watch(self, connections: Sequence[Connection]) -> dict[str, str]:
        """The connections whose alarms are evaluated (active ones with alarms).

        Returns the connections whose alarms cannot be watched, with why: the daemon takes
        them out of service, and every other connection's alarms are watched as usual.
        """
        watched: dict[tuple[str, int], _Watched] = {}
        schedules: dict[str, Schedule] = {}
        faults: dict[str, str] = {}
        for connection in connections:
            if not connection.active or connection.fault is not None:
                continue
            mine: dict[tuple[str, int], _Watched] = {}
            for index, alarm in enumerate(connection.alarms):
                try:
                    fp = fingerprint(alarm)
                    schedule = self._schedules.get(fp) or Schedule(alarm)
                except Exception as exc:
                    faults[connection.id] = f"alarm {index} cannot be scheduled: {_describe(exc)}"
                    break
                schedules[fp] = schedule
                mine[(connection.id, index)] = _Watched(connection.id, index, alarm, schedule, fp)
            else:
                watched.update(mine)
        for key in set(self._watched) - set(watched):
            self._forget(key)
        self._watched = watched
        self._schedules = schedules
        return faults

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._load_states()
        self._task = asyncio.create_task(self._run(), name="alarms")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._flush()
        except Exception as exc:
            log.warning("Uplink counts not saved", error=str(exc))

    async def _run(self) -> None:
        while True:
            now = self.clock.now()
            await self.clock.sleep(60 - now % 60)
            try:
                await self._flush()
                await self.clock.sleep(SETTLE)
                await self.evaluate(int(self.clock.now() // 60))
            except Exception as exc:
                # The registry may be briefly unreachable: the next minute tries again.
                log.error("Alarm evaluation failed", error=str(exc))

    async def _flush(self) -> None:
        counts, self._counts = self._counts, Counter()
        if counts:
            try:
                await self._store.add_uplink_counts(counts)
            except Exception:
                self._counts.update(counts)  # kept for the next flush
                raise

    async def _load_states(self) -> None:
        self._states = {(s.connection_id, s.alarm): s for s in await self._store.alarm_states()}
        for key, watched in self._watched.items():
            state = self._states.get(key)
            active = state is not None and state.active and state.fingerprint == watched.fingerprint
            self._metrics.alarm_active.labels(key[0], str(key[1])).set(1 if active else 0)

    # -- evaluation ------------------------------------------------------------------------

    async def evaluate(self, minute: int) -> None:
        """Evaluate every watched alarm on the 60 full minutes before `minute`."""
        self._ticks += 1
        if self._ticks % PRUNE_EVERY == 0:
            await self._store.prune_uplink_counts(minute - 120)
        await self._load_states()  # other instances may have raised or cleared
        now = minute * 60.0
        moment = datetime.fromtimestamp(now, UTC)
        for key, watched in list(self._watched.items()):
            state = self._states.get(key)
            active = bool(state and state.active and state.fingerprint == watched.fingerprint)
            try:
                window = watched.schedule.active_window(moment)
            except Exception as exc:
                # Validation makes this unreachable; should it happen, this alarm alone waits.
                self._unschedulable(watched, exc)
                continue
            threshold = watched.alarm.uplinkRateMinPerHour
            if window is None:
                self._last[key] = {"state": "RAISED" if active else "OUTSIDE_WINDOW"}
                if active:
                    await self._change(
                        watched, False, state.rate if state else 0.0, None, "window ended"
                    )
                continue
            observed = now - max(window.start.timestamp(), self._started)
            if observed < HOUR:
                self._last[key] = {
                    "state": "RAISED" if active else "OBSERVING",
                    "window": _window(window),
                    "evaluatedFrom": iso(max(window.start.timestamp(), self._started) + HOUR),
                }
                continue
            rate = float(
                await self._store.uplink_count(watched.connection_id, minute - 60, minute - 1)
            )
            low = rate < threshold
            self._last[key] = {
                "state": "RAISED" if low else "CLEAR",
                "rate": rate,
                "window": _window(window),
                "evaluatedAt": iso(now),
            }
            log.debug(
                "Alarm evaluated",
                connection=watched.connection_id,
                alarm=watched.index,
                rate=rate,
                threshold=threshold,
                raised=active,
            )
            if low and not active:
                await self._change(watched, True, rate, window, "rate below threshold")
            elif not low and active:
                await self._change(watched, False, rate, window, "rate recovered")

    async def _change(
        self, watched: _Watched, raise_: bool, rate: float, window: Window | None, reason: str
    ) -> None:
        now = datetime.fromtimestamp(self.clock.now(), UTC)
        state = AlarmState(
            watched.connection_id,
            watched.index,
            watched.fingerprint,
            raise_,
            now,
            rate,
            window.start if window else None,
            window.end if window else None,
        )
        alarm = watched.alarm
        kind = "alarm_raised" if raise_ else "alarm_cleared"
        details: dict[str, Any] = {
            "alarm": watched.index,
            "rate": rate,
            "threshold": alarm.uplinkRateMinPerHour,
            "message": alarm.message,
            "reason": reason,
            "window": _window(window) if window else None,
        }
        announce = await self._store.set_alarm_state(
            state, expect_active=not raise_, event=(kind, details)
        )
        key = (watched.connection_id, watched.index)
        # Refused: another instance of the fleet got there first and announced it. The state
        # is the same either way (its details are read again at the next evaluation).
        self._states[key] = state
        self._metrics.alarm_active.labels(watched.connection_id, str(watched.index)).set(
            1 if raise_ else 0
        )
        if not announce:
            log.debug(
                "Alarm change announced by another instance",
                connection=watched.connection_id,
                alarm=watched.index,
                raised=raise_,
            )
            return
        (log.warning if raise_ else log.info)(
            "Alarm raised" if raise_ else "Alarm cleared",
            connection=watched.connection_id,
            alarm=watched.index,
            rate=rate,
            threshold=alarm.uplinkRateMinPerHour,
            reason=reason,
            message=alarm.message,
        )
        if self._notify is not None:
            message = {
                "type": kind,
                "connection": watched.connection_id,
                "time": iso(now),
                **details,
            }
            try:
                await self._notify(message)
            except Exception as exc:
                log.warning("Alarm notification not published", error=str(exc))

    def _unschedulable(self, watched: _Watched, exc: Exception) -> None:
        key = (watched.connection_id, watched.index)
        if self._failed.get(key) == watched.fingerprint:
            return  # said once per definition, not every minute
        self._failed[key] = watched.fingerprint
        error = _describe(exc)
        log.error(
            "Alarm not evaluated",
            connection=watched.connection_id,
            alarm=watched.index,
            error=error,
        )
        self._record(
            watched.connection_id, "alarm_failed", {"alarm": watched.index, "error": error}
        )

    def _forget(self, key: tuple[str, int]) -> None:
        self._failed.pop(key, None)
        self._last.pop(key, None)
        with contextlib.suppress(KeyError):
            self._metrics.alarm_active.remove(key[0], str(key[1]))

    # -- what the API shows ----------------------------------------------------------------

    def states_of(self, connection_id: str) -> list[dict[str, Any]]:
        """Each alarm of a connection and where it stands."""
        result = []
        for (cid, index), watched in sorted(self._watched.items()):
            if cid != connection_id:
                continue
            state = self._states.get((cid, index))
            active = bool(state and state.active and state.fingerprint == watched.fingerprint)
            entry: dict[str, Any] = {"alarm": index, "state": "PENDING"}
            entry.update(self._last.get((cid, index), {}))
            if active and state is not None:
                entry.update(state="RAISED", since=iso(state.since), raisedRate=state.rate)
            result.append(entry)
        return result

    def active(self) -> list[dict[str, Any]]:
        """Every raised alarm, across connections."""
        result = []
        for key, watched in sorted(self._watched.items()):
            state = self._states.get(key)
            if state is None or not state.active or state.fingerprint != watched.fingerprint:
                continue
            result.append(
                {
                    "connectionId": key[0],
                    "alarm": key[1],
                    "message": watched.alarm.message,
                    "threshold": watched.alarm.uplinkRateMinPerHour,
                    "rate": state.rate,
                    "since": iso(state.since),
                    "window": {"start": iso(state.window_start), "end": iso(state.window_end)},
                }
            )
        return result


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _window(window: Window) -> dict[str, str | None]:
    return {"start": iso(window.start), "end": iso(window.end)}
