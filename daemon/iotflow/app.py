"""The daemon's lifecycle, in one place: start registry → events → alarms → directory →
downlinks → spool → workers → recovery (dead letters, replays) → API → source, stop in
reverse (an exit stack: what started last stops first, by construction). Signals set
events; tasks do the work."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import Counter

from iotflow.alarms.clock import Clock
from iotflow.alarms.evaluator import Alarms
from iotflow.api.listen import bind
from iotflow.api.server import create_app
from iotflow.config.load import Settings, load_settings
from iotflow.config.model import Config
from iotflow.connectors import CATALOG
from iotflow.delivery.manager import Deliveries, make_sink_factory
from iotflow.delivery.recovery import Recovery, route_of
from iotflow.delivery.worker import ConnectionWorker, background_share
from iotflow.downlinks.directory import DeviceDirectory
from iotflow.downlinks.service import Downlinks
from iotflow.drivers import AUTO, Drivers
from iotflow.errors import ConfigError, IotflowError, Rejection
from iotflow.events import EventLog
from iotflow.fleet import Fleet, default_api_url
from iotflow.formats import actility_document, decode
from iotflow.registry import ChangeFeed, Store, open_registry
from iotflow.routing import RoutingIndex
from iotflow.sources.mqtt import Incoming, MqttSource
from iotflow.spool import Delivery, Spool, SpoolUnavailableError
from iotflow.telemetry import logging as logs
from iotflow.telemetry.metrics import Metrics
from iotflow.telemetry.systemd import Notifier

log = logs.get_logger("iotflow.app")

_LOGGED_PAYLOAD = 200  # bytes of a rejected message shown in its log line
_REJECT_LINES = 100  # rejected messages logged per minute at most
# Journal-only writes (unbound uplinks) in the spool's queue past which an acknowledgement
# waits for its own: a bound on memory, far above what a group commit takes at once.
_JOURNAL_BACKLOG = 4096
# Allocations between two passes of the collector over the youngest objects (Python: 700).
YOUNG_GENERATION = 20_000


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # uplinks_received's child per format, looked up once rather than per uplink.
        self._received: dict[str, Counter] = {}
        self.notifier = Notifier()  # sd_notify; a no-op outside systemd
        self.store: Store | None = None
        self.spool: Spool | None = None
        self.deliveries: Deliveries | None = None
        self.recovery: Recovery | None = None  # dead letters, journal and replays
        self.index = RoutingIndex([], {})
        # Per device, the connections its last uplink was routed to, each with the driver of
        # the flow that routed it there (for downlinks: whose they are, how to encode them).
        self._routes: dict[str, dict[str, str | None]] = {}
        # Per device, the uplink whose commits are not queued yet (it is being decoded).
        self._queueing: dict[str, asyncio.Future[None]] = {}
        self.source: MqttSource | None = None
        self.events: EventLog | None = None
        self.alarms: Alarms | None = None
        self.directory: DeviceDirectory | None = None
        self.downlinks: Downlinks | None = None
        self.drivers: Drivers | None = None  # TS013 codecs; None: not started (no decoding)
        self.fleet: Fleet | None = None  # this instance among those sharing the registry
        self._runner: web.AppRunner | None = None
        self._api_sockets: list[socket.socket] = []
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        # What start opened, closed in reverse by shutdown; each close isolated (`_closing`).
        self._stack = contextlib.AsyncExitStack()
        self._failed: list[str] = []  # shutdown steps that failed
        self.closed: list[str] = []  # shutdown steps run, in order (what a test checks)
        self._tasks: list[asyncio.Task[Any]] = []  # of the daemon's life; the stack ends them
        self._transitions: set[asyncio.Task[None]] = set()
        self._refresh_lock = asyncio.Lock()
        self._reject_window = (0.0, 0)  # (minute start, lines logged in it)
        self._journal_backlog = 0  # journal-only writes not committed yet

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        config = self.settings.config
        logs.configure(config.log.level, config.log.format)
        loop = asyncio.get_running_loop()
        logs.install_loop_handler(loop)
        try:
            self._api_sockets = bind(config.api.host, config.api.port)
        except OSError as exc:
            # Expected (another process has the port): one line, exit 1, nothing started.
            log.error("Cannot listen for the API", listen=config.api.listen, error=_os_error(exc))
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        # From the event loop, for the whole life of the process (start and drain too).
        watchdog = asyncio.create_task(self.notifier.run_watchdog(), name="watchdog")
        code = 0
        try:
            # Start-up allocates what lives as long as the process (connections, workers,
            # the routing index: 200,000 objects the collector tracks with 1,000 connections
            # and 100,000 bindings) and next to no garbage (a few hundred objects in
            # cycles): the collector's passes over it were 0.3 s of the start-up's 2 s of
            # CPU (issue #16). Off until started; then what start-up allocated is kept out
            # of the full passes, which otherwise grow with every uplink in flight.
            gc.disable()
            try:
                await self.start()
            finally:
                gc.freeze()
                # A young generation of 20,000 objects instead of 700: an uplink allocates
                # a few dozen that die within milliseconds, and at 10,000 uplinks/s the
                # default made a pass every 3 ms over the uplinks in flight. 552 → 40 ms
                # of collection over a 60,000-uplink flood (docs/performance.md, round 6).
                gc.set_threshold(YOUNG_GENERATION, *gc.get_threshold()[1:])
                gc.enable()
            log.info(
                "iotflow running",
                config=self.settings.path,
                connectors=sorted(CATALOG),
                loop=type(loop).__module__.partition(".")[0],  # asyncio, or uvloop (speed)
            )
            await self._serve()
        except IotflowError as exc:
            # An expected failure (the registry refuses us, a bad registry URL): said in
            # one line; a bug still leaves with its traceback, in the line's `exception`.
            log.error("Cannot start", error=str(exc))
            code = 1
        finally:
            self.notifier.stopping()
            code = max(code, await self.shutdown())
            for sock in self._api_sockets:  # closed with the API, unless start failed first
                sock.close()
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            self.notifier.close()
        return code

    async def start(self) -> None:
        config = self.settings.config
        self.store = open_registry(config)
        self._closing("registry", self.store.close)
        version = await self.store.migrate()
        log.info("Registry ready", schema_version=version)
        self.events = EventLog(self.store)
        self.events.start()
        self._closing("events", self.events.close)
        await self._reconcile(self.settings)
        self.alarms = Alarms(
            self.store,
            self.metrics,
            self.record,
            notify=self._notify if config.alarms.notify_topic else None,
            clock=Clock.from_environment(),
        )
        self._closing("alarms", self.alarms.close)
        self.directory = DeviceDirectory(self.store)
        self.directory.start()
        self._closing("directory", self.directory.close)
        # Before the workers: their sinks hand the commands of their clouds to it.
        self.downlinks = Downlinks(
            store=self.store,
            directory=self.directory,
            publish=self._publish,
            record=self.record,
            metrics=self.metrics,
            settings=lambda: self.settings.config.downlinks,
            routes=lambda dev_eui: self._routes.get(dev_eui, {}),
            encode=self._encode,
        )
        # Loaded before the first uplink can be routed to one of them.
        self.drivers = Drivers(config.drivers)
        await self.drivers.start()
        self._closing("drivers", self.drivers.close)
        self.spool = await Spool.open(config.spool.path)
        # The API and the workers write through it: it closes after both (stack order).
        self._closing("spool", self.spool.close)
        spool = self.spool
        self.metrics.spool_writable.set_function(lambda: float(spool.writable))
        self.deliveries = Deliveries(
            spool=self.spool,
            metrics=self.metrics,
            settings=config.delivery,
            record=self.events,
            sink_factory=make_sink_factory(self.downlinks, config.mqtt.shared_group),
        )
        deliveries = self.deliveries
        # In-flight sends finish within the drain timeout of the moment (SIGTERM).
        self._closing(
            "deliveries",
            lambda: deliveries.stop(self.settings.config.delivery.drain_timeout.total_seconds()),
        )
        # Transitions started by the last refreshes (an API call, a registry change)
        # complete before the workers stop.
        self._closing("transitions", self.settle)
        # Before the workers start: those ending replayed deliveries tell it.
        self.recovery = Recovery(
            spool=self.spool,
            dispatch=deliveries.dispatch,
            index=lambda: self.index,
            metrics=self.metrics,
            record=self.record,
            journal=config.journal,
            letters=config.deadletters,
            # Queued at once: the share of the connection's sends its worker lets a replay
            # have (the worker holds it to that share, live uplinks first).
            window=lambda cid: background_share(deliveries.max_in_flight(cid)),
            render=self._render,
        )
        deliveries.replayed = self.recovery.replayed
        feed = self.store.changes()
        if feed.pending:
            # The feed observes every writer already: a change from here on fires it
            # again, so the refresh below stands for its first one (one index built at
            # start, not two: 100,000 bindings cost tens of MB a build, issue #16).
            await anext(feed)
        await self.refresh()
        await self.settle()  # workers running before the first uplink arrives
        # After the workers (resumed replays feed them), before the API and the source.
        await self.recovery.start()
        self._closing("recovery", self.recovery.close)
        await self.alarms.start()
        self._background(self._follow_changes(feed), "registry-changes")
        self.fleet = Fleet(
            self.store,
            instance_id=config.mqtt.client_id,
            api_url=config.api.url or default_api_url(config.api.host, config.api.port),
            schema_version=version,
            # Only a shared database has other instances; SQLite pays for none of this.
            shared=config.registry.url.startswith(("postgresql:", "postgres:")),
            heartbeat=config.registry.heartbeat.total_seconds(),
            statistics=self._statistics,
        )
        await self.fleet.start()
        self._closing("fleet", self.fleet.close)
        self._runner = web.AppRunner(create_app(self), access_log=None)
        await self._runner.setup()
        # The API writes through the spool (HTTP ingest, re-sends): it closes before it.
        self._closing("api", self._runner.cleanup)
        if not self._api_sockets:  # started without run()
            self._api_sockets = bind(config.api.host, config.api.port)
        for sock in self._api_sockets:
            await web.SockSite(self._runner, sock).start()
        log.info("API listening", listen=config.api.listen)
        if not config.api.tokens:
            log.warning(
                "No API token configured",
                effect="every management API call is refused (401)",
                fix='set [api] tokens, e.g. tokens = ["${IOTFLOW_API_TOKEN}"]',
            )
        self.source = MqttSource(
            config.mqtt, self.handle, self.metrics, pressure=self.deliveries.pressure
        )
        source = self._background(self.source.run(), "source", cancel=False)
        self._closing("source", lambda: self._stop_source(source))
        self._background(self._announce_ready(), "systemd-ready")

    def _closing(self, name: str, action: Callable[[], Awaitable[object]]) -> None:
        """Close `action` at shutdown, in reverse order of start. Isolated: one that fails
        is logged and the rest still close (an exit stack alone stops at the first)."""

        async def step() -> None:
            self.closed.append(name)
            try:
                await action()
            except Exception as exc:
                self._failed.append(name)
                log.error("Shutdown step failed", step=name, error=str(exc))

        self._stack.push_async_callback(step)

    def _background(
        self, work: Coroutine[Any, Any, None], name: str, *, cancel: bool = True
    ) -> asyncio.Task[None]:
        """A task for the daemon's life, cancelled at shutdown (unless told otherwise)
        before what was started before it closes."""
        task = asyncio.create_task(work, name=name)
        self._tasks.append(task)
        if cancel:
            self._closing(name, lambda: _cancel(task))
        return task

    async def _stop_source(self, task: asyncio.Task[None]) -> None:
        """No new uplinks: the source finishes acknowledging what it committed, then ends."""
        assert self.source is not None
        self.source.stop()
        await asyncio.gather(task, return_exceptions=True)

    async def _announce_ready(self) -> None:
        """READY=1 once the source has subscribed: systemd's start is complete then."""
        assert self.source is not None
        self.notifier.status("Waiting for the broker")
        await self.source.consuming.wait()
        self.notifier.ready()

    async def _serve(self) -> None:
        stop = asyncio.create_task(self._stop.wait())
        while not self._stop.is_set():
            reload = asyncio.create_task(self._reload.wait())
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            if self._reload.is_set():
                self._reload.clear()
                # RELOADING=1 … READY=1, also when the reload is refused.
                with self.notifier.reload_scope():
                    await self.reload()
            reload.cancel()

    async def shutdown(self) -> int:
        """Stop consuming, let in-flight sends finish, commit, close: what `start` opened,
        in reverse (source, API, workers, spool, ..., registry).

        Every step runs even when one before it failed (a full disk must not leave the
        registry open). Returns the exit code: 0, or 1 when a step failed, e.g. the spool
        could not commit; what it could not commit was not acknowledged, so nothing is lost.
        """
        log.info("Stopping")
        self._stop.set()  # commits waiting for the spool give up: not acknowledged
        await self._stack.aclose()
        if self._failed:
            log.error("Stopped with errors", failed=self._failed)
            return 1
        log.info("Stopped")
        return 0

    # -- what the API reads (iotflow.api.control.ControlPlane) ---------------------------

    @property
    def registry(self) -> Store:
        if self.store is None:
            raise RuntimeError("the registry is not open yet")
        return self.store

    @property
    def config(self) -> Config:
        return self.settings.config

    def worker(self, connection_id: str) -> ConnectionWorker | None:
        return self.deliveries.worker(connection_id) if self.deliveries is not None else None

    def alarm_states(self, connection_id: str) -> list[dict[str, Any]]:
        return self.alarms.states_of(connection_id) if self.alarms is not None else []

    def active_alarms(self) -> list[dict[str, Any]]:
        return self.alarms.active() if self.alarms is not None else []

    def _statistics(self) -> dict[str, dict[str, Any]]:
        """This instance's statistics of every connection it runs a worker for."""
        if self.deliveries is None:
            return {}
        return {cid: w.stats.document() for cid, w in self.deliveries.workers.items()}

    def record(self, connection_id: str, kind: str, data: dict[str, Any]) -> None:
        """Add to a connection's event log, in the background."""
        if self.events is not None:
            self.events(connection_id, kind, data)

    # -- registry and routing --------------------------------------------------------------

    async def _reconcile(self, settings: Settings) -> None:
        assert self.store is not None
        result = await self.store.reconcile_provisioned(list(settings.connections))
        for connection_id in result.added:
            self.record(connection_id, "connection_created", {"by": "config file"})
        for connection_id in result.changed:
            self.record(connection_id, "configuration_changed", {"by": "config file"})
        if result.added or result.changed or result.removed:
            log.info(
                "Provisioned connections reconciled",
                added=result.added,
                changed=result.changed,
                removed=result.removed,
            )
        # After the connections: a provisioned flow names provisioned connections.
        flows = await self.store.reconcile_flows(list(settings.flows))
        if flows:
            log.info(
                "Provisioned flows reconciled",
                added=flows.added,
                changed=flows.changed,
                removed=flows.removed,
                replaced=flows.replaced,
            )

    async def refresh(self) -> None:
        """Bring routing and workers in line with the registry.

        Returns once the new routing is in place (every routed connection has a worker);
        draining replaced workers goes on in the background, in order.
        """
        assert self.store is not None
        assert self.deliveries is not None
        assert self.spool is not None
        async with self._refresh_lock:
            connections = await self.store.list_connections()
            bindings = await self.store.bindings()
            flows = await self.store.list_flows()
            pending = await self.spool.pending_counts()
            # Per connection: one whose alarms cannot be watched is taken out of service by
            # `register`, never stops the refresh of the others (issue #10).
            faults = self.alarms.watch(connections) if self.alarms is not None else {}
            transition = self.deliveries.register(
                connections, self.settings.config.delivery, pending, faults
            )
            self.index = RoutingIndex(connections, bindings, flows)
        task = asyncio.create_task(self.deliveries.complete(transition), name="transition")
        self._transitions.add(task)
        task.add_done_callback(self._transitions.discard)

    async def settle(self) -> None:
        """Wait until every transition started so far is complete."""
        while self._transitions:
            await asyncio.gather(*self._transitions, return_exceptions=True)

    async def _follow_changes(self, feed: ChangeFeed) -> None:
        async for _ in feed:
            try:
                await self.refresh()
            except Exception as exc:
                log.exception("Routing refresh failed", error=str(exc))

    # -- reload ----------------------------------------------------------------------------

    async def reload(self) -> None:
        """Validate → diff → swap. A config that does not validate changes nothing."""
        try:
            settings = load_settings(self.settings.path)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("failure").inc()
            # Expected (a typo in the file): the problems are the message, no traceback.
            log.error(
                "Reload refused; keeping the running config",
                error=str(exc),
                problems=[str(p) for p in exc.problems],
            )
            return
        old = self.settings.config
        new = settings.config
        restart_needed = [
            name
            for name in ("mqtt", "registry", "spool", "api", "alarms", "events")
            if getattr(old, name) != getattr(new, name)
        ]
        if restart_needed:
            log.warning(
                "Changes that need a restart are ignored until then", sections=restart_needed
            )
            # Keep the running values of what cannot change live.
            new = new.model_copy(update={name: getattr(old, name) for name in restart_needed})
        self.settings = Settings(settings.path, new, settings.connections, settings.flows)
        if self.recovery is not None:  # bounds apply from the next pruning
            self.recovery.journal = new.journal
            self.recovery.letters_settings = new.deadletters
        logs.configure(new.log.level, new.log.format)
        try:
            await self._reconcile(settings)
            await self.refresh()
        except Exception as exc:
            self.metrics.config_reloads.labels("failure").inc()
            log.exception("Reload failed while applying", error=str(exc))
            return
        self.metrics.config_reloads.labels("success").inc()
        log.info("Config reloaded", config=settings.path)

    # -- ingest ----------------------------------------------------------------------------

    def handle(self, incoming: Incoming) -> Awaitable[None] | None:
        """One MQTT message: decode, route, and commit its deliveries to the spool.

        Returns None when the message can be acknowledged at once (rejected, unrouted),
        else the commit to wait for before acknowledging it.
        """
        subscription = incoming.subscription
        if subscription is None:
            self._reject(
                Rejection("no_subscription", "topic matches no subscription"),
                incoming.payload,
                topic=incoming.topic,
            )
            return None
        try:
            return self.accept(subscription.format, incoming.payload, topic=incoming.topic)
        except Rejection:
            return None

    def accept(
        self, fmt: str, payload: bytes, *, hold: bool = True, **origin: str
    ) -> Awaitable[None] | None:
        """One uplink of format `fmt`, from the MQTT source or the HTTP ingest: decode,
        route, count, and start committing its deliveries to the spool.

        `origin` names where it came from in log lines (`topic=`, `ingest=`). Returns None
        when there is nothing to commit (unrouted), else the commit; a message that is not
        an uplink raises Rejection, counted and logged already. With `hold`, a commit that
        finds the spool unavailable waits until it commits again (the MQTT source: the
        broker keeps what is not acknowledged); without, it fails at once (the HTTP ingest
        answers 503 and the sender retries).
        """
        received_at = time.time()
        received = self._received.get(fmt)
        if received is None:
            received = self._received[fmt] = self.metrics.uplinks_received.labels(fmt)
        received.inc()
        try:
            uplink = decode(fmt, payload)
        except Rejection as rejection:
            self._reject(rejection, payload, **origin)
            raise
        targets = self.index.targets(
            uplink.dev_eui, uplink.tags, uplink.application, uplink.application_name
        )
        journal: str | None = None
        if self.settings.config.journal.retention and self.recovery is not None:
            journal = route_of(uplink.tags, uplink.application, uplink.application_name)
        if not targets:
            self.metrics.uplinks_unrouted.inc()
            log.debug("Uplink of an unbound device", devEUI=uplink.dev_eui, **origin)
            if journal is not None:
                # Journaled for a connection made later; acknowledged without waiting: it
                # was promised to no connection (docs/deadletters.md). Unless too many
                # wait for the spool already: then the acknowledgement waits too, so that
                # a flood of unbound uplinks cannot grow the spool's queue without bound.
                document = memoryview(orjson.dumps(actility_document(uplink))).tobytes()
                times = (uplink.dev_eui, uplink.time.timestamp(), received_at)
                write = self._journal_only(document, times, journal)
                if self._journal_backlog > _JOURNAL_BACKLOG:
                    return write
            return None
        if self.alarms is not None:
            self.alarms.count(t.connection_id for t in targets)
        if self.directory is not None:
            # Where a downlink to this device must go. Only routed devices: a device that
            # no connection is bound to gets no downlink, and the broker may carry many.
            self.directory.remember(uplink.dev_eui, uplink.format, uplink.source)
        base = actility_document(uplink)
        self._routes[uplink.dev_eui] = {
            t.connection_id: _own_driver(t.driver_id, base) for t in targets
        }
        validity = {t.connection_id: t.validity for t in targets if t.validity is not None}
        groups: dict[str | None, list[str]] = {}
        for target in targets:
            driver = target.driver_id if self.drivers is not None else None
            groups.setdefault(driver, []).append(target.connection_id)
        times = (uplink.dev_eui, uplink.time.timestamp(), received_at)
        previous = self._queueing.get(uplink.dev_eui)
        if list(groups) == [None] and previous is None:
            # orjson's result keeps its whole working buffer (kilobytes); a right-sized copy
            # is what waits in the spool queue and in the workers' memory.
            document = memoryview(orjson.dumps(base)).tobytes()
            self._journaled(document, journal)
            # Queued now, not when the acknowledgement loop gets to it: commits of
            # consecutive uplinks must be in flight together for the spool to group them.
            commit = self._submit(document, times, tuple(groups[None]), validity, hold, journal)
        else:
            # Decoding takes its time: the device's next uplinks queue behind this one, so
            # that the spool (and so every connection) gets a device's uplinks in order.
            queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queueing[uplink.dev_eui] = queued
            commit = asyncio.ensure_future(
                self._commit_decoded(base, groups, times, validity, hold, previous, queued, journal)
            )
        commit.add_done_callback(_retrieved)
        return commit

    async def _commit_decoded(
        self,
        base: dict[str, Any],
        groups: dict[str | None, list[str]],
        times: tuple[str, float, float],
        validity: Mapping[str, float | None],
        hold: bool,
        previous: asyncio.Future[None] | None,
        queued: asyncio.Future[None],
        journal: str | None = None,
    ) -> None:
        """Decode once per driver, then commit each group with its own document; done when
        every group is committed (the acknowledgement waits for all of them).

        The commits are queued only once `previous` (the same device's uplink before this
        one) has queued its own, and `queued` says the same to the next: tasks run their
        first step in the order they were made, so the spool appends in arrival order.
        """
        dev_eui = times[0]
        commits: list[asyncio.Future[None]] = []
        try:
            documents = {}
            for driver_id in groups:
                if driver_id is None or self.drivers is None:
                    documents[driver_id] = base
                else:
                    documents[driver_id] = await self.drivers.decode(base, driver_id)
            if previous is not None:
                await previous
            raw: bytes | None = None  # `base` encoded, once for the journal and a group
            if journal is not None:
                # The journal keeps the uplink as received, before any driver: a replay
                # decodes it with the driver of the moment.
                raw = memoryview(orjson.dumps(base)).tobytes()
                self._journaled(raw, journal)
                commits.append(
                    asyncio.ensure_future(self._commit(raw, *times, (), {}, hold, journal))
                )
            for driver_id, connection_ids in groups.items():
                document = documents[driver_id]
                if document is base and raw is not None:
                    encoded = raw
                else:
                    encoded = memoryview(orjson.dumps(document)).tobytes()
                commits.append(
                    asyncio.ensure_future(
                        self._commit(encoded, *times, tuple(connection_ids), validity, hold)
                    )
                )
        finally:
            queued.set_result(None)
            if self._queueing.get(dev_eui) is queued:
                del self._queueing[dev_eui]
        await asyncio.gather(*commits)

    def _submit(
        self,
        document: bytes,
        times: tuple[str, float, float],
        targets: tuple[str, ...],
        validity: Mapping[str, float | None],
        hold: bool,
        journal: str | None,
    ) -> asyncio.Future[None]:
        """`_commit` without a task: the spool's future, then dispatch, by callbacks. This
        is the path of nearly every uplink (one document, the spool writable), where a task
        each was a cost of its own (issue #16). A commit the spool could not make is handed
        to `_commit`, which waits for it as before."""
        assert self.spool is not None
        dev_eui, uplink_time, received_at = times
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            appended = self.spool.submit(
                document,
                dev_eui=dev_eui,
                uplink_time=uplink_time,
                received_at=received_at,
                connection_ids=targets,
                validity=validity,
                journal=journal,
            )
        except Exception as exc:  # closed: as the awaited append would have raised
            done.set_exception(exc)
            return done

        def committed(appended: asyncio.Future[list[Delivery]]) -> None:
            if done.done():  # cancelled by its awaiter: so is the append, as with a task
                return
            if appended.cancelled():
                done.cancel()
                return
            error = appended.exception()
            if isinstance(error, SpoolUnavailableError) and hold:
                retry = asyncio.ensure_future(
                    self._commit(document, *times, targets, validity, hold, journal, error)
                )
                retry.add_done_callback(functools.partial(_settle, done))
                done.add_done_callback(lambda _: retry.cancel())
                return
            if error is not None:
                done.set_exception(error)
                return
            assert self.deliveries is not None
            try:
                self.deliveries.dispatch(appended.result())
            except Exception as exc:
                done.set_exception(exc)
                return
            done.set_result(None)

        def abandoned(done: asyncio.Future[None]) -> None:
            if done.cancelled():
                appended.cancel()

        appended.add_done_callback(committed)
        done.add_done_callback(abandoned)
        return done

    async def _commit(
        self,
        document: bytes,
        dev_eui: str,
        uplink_time: float,
        received_at: float,
        targets: tuple[str, ...],
        validity: Mapping[str, float | None],
        hold: bool,
        journal: str | None = None,
        failed: SpoolUnavailableError | None = None,
    ) -> None:
        """Commit an uplink's deliveries, waiting (with `hold`) while the spool cannot
        commit, then dispatch them. `failed`: the first attempt's error (`_submit`)."""
        assert self.spool is not None
        assert self.deliveries is not None
        if failed is not None and not await self._until_writable():
            raise failed
        while True:
            try:
                deliveries = await self.spool.append(
                    document,
                    dev_eui=dev_eui,
                    uplink_time=uplink_time,
                    received_at=received_at,
                    connection_ids=targets,
                    validity=validity,
                    journal=journal,
                )
                break
            except SpoolUnavailableError:
                # Wait for the spool (it retries by itself) rather than reconnect to the
                # broker for a redelivery that would fail the same way; unacknowledged
                # meanwhile, and the broker sends no more than our receive maximum.
                if not hold or not await self._until_writable():
                    raise
        self.deliveries.dispatch(deliveries)

    def _journaled(self, document: bytes, journal: str | None) -> None:
        if journal is not None and self.recovery is not None:
            self.recovery.journaled(len(document) + len(journal))

    def _journal_only(
        self, document: bytes, times: tuple[str, float, float], route: str
    ) -> asyncio.Future[Any]:
        """Journal an uplink that goes to no connection, in the next group commit."""
        assert self.spool is not None
        self._journal_backlog += 1
        self._journaled(document, route)
        dev_eui, uplink_time, received_at = times
        write = asyncio.ensure_future(
            self.spool.append(
                document,
                dev_eui=dev_eui,
                uplink_time=uplink_time,
                received_at=received_at,
                connection_ids=(),
                journal=route,
            )
        )
        write.add_done_callback(self._journal_written)
        return write

    def _journal_written(self, write: asyncio.Future[Any]) -> None:
        self._journal_backlog -= 1
        _seen(write)

    async def _render(self, document: bytes, driver_id: str | None) -> bytes:
        """A journaled uplink as a connection with `driver_id` gets it (replays)."""
        if driver_id is None or self.drivers is None:
            return document
        decoded = await self.drivers.decode(orjson.loads(document), driver_id)
        return memoryview(orjson.dumps(decoded)).tobytes()

    async def _encode(self, driver_id: str, data: Any, f_port: int) -> tuple[bytes, int | None]:
        if self.drivers is None:
            raise ConnectionError("the drivers are not loaded yet")
        return await self.drivers.encode(driver_id, data, f_port)

    async def _until_writable(self) -> bool:
        """Wait until the spool commits again (True) or the daemon stops (False)."""
        assert self.spool is not None
        if self._stop.is_set():
            return False
        writable = asyncio.ensure_future(self.spool.wait_writable())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({writable, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        writable.cancel()
        if self._stop.is_set() or not writable.done() or writable.cancelled():
            return False
        return writable.exception() is None  # SpoolClosedError: give up

    def _reject(self, rejection: Rejection, payload: bytes, **origin: str) -> None:
        self.metrics.uplinks_rejected.labels(rejection.reason).inc()
        if rejection.routine:
            # Join, status, downlink events...: normal traffic on a wildcard subscription.
            log.debug("Message is not an uplink", error=rejection.message, **origin)
            return
        # One line per message, but a flood of garbage must not drown the log: at most
        # _REJECT_LINES a minute, the rest only counted (iotflow_uplinks_rejected_total).
        now = time.monotonic()
        start, lines = self._reject_window
        if now - start >= 60:
            start, lines = now, 0
        self._reject_window = (start, lines + 1)
        if lines == _REJECT_LINES:
            log.warning("Too many rejected uplinks; logging paused for a minute")
        if lines >= _REJECT_LINES:
            return
        log.warning(
            "Uplink rejected",
            **origin,
            reason=rejection.reason,
            error=rejection.message,
            payload=payload[:_LOGGED_PAYLOAD].decode("utf-8", "replace"),
            size=len(payload),
        )

    async def _notify(self, message: dict[str, Any]) -> None:
        await self._publish(self.settings.config.alarms.notify_topic, orjson.dumps(message))

    async def _publish(self, topic: str, payload: bytes) -> None:
        """Publish on the source broker (QoS 1); ConnectionError while there is none."""
        if self.source is None:
            raise ConnectionError("no broker connection yet")
        await self.source.publish(topic, payload)

    # -- health ----------------------------------------------------------------------------

    async def readiness(self) -> dict[str, bool]:
        registry = False
        if self.store is not None:
            try:
                await self.store.ping()
                registry = True
            except Exception:
                registry = False
        broker = self.source is not None and self.source.connected.is_set()
        return {"broker": broker, "registry": registry}


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _settle(target: asyncio.Future[None], source: asyncio.Future[None]) -> None:
    """Give `target` the outcome of `source`, unless it has one already."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(None)


def _retrieved(commit: asyncio.Future[None]) -> None:
    """Mark a failed commit's exception as seen. The source awaits commits in order and
    stops at the first failure (it reconnects and the broker redelivers the rest): those
    behind it are abandoned, and their failure must not surface as "Task exception was
    never retrieved". An awaiter still gets the exception."""
    if not commit.cancelled():
        commit.exception()


def _seen(write: asyncio.Future[Any]) -> None:
    """A journal-only write nobody awaits: its failure is only logged (debug)."""
    if not write.cancelled() and write.exception() is not None:
        log.debug("Uplink not journaled", error=str(write.exception()))


def _os_error(exc: OSError) -> str:
    """`Address already in use`, `Name or service not known`: what the operator can act on."""
    return exc.strerror or str(exc)


async def run(settings: Settings) -> int:
    return await Daemon(settings).run()


def _own_driver(driver_id: str | None, document: dict[str, Any]) -> str | None:
    """The driver a flow names, `actility:auto:1` resolved to the uplink's `DriverCfg.id`."""
    if driver_id != AUTO:
        return driver_id
    cfg = document.get("DevEUI_uplink", {}).get("DriverCfg")
    own = cfg.get("id") if isinstance(cfg, dict) else None
    return own if isinstance(own, str) and own else None
