"""Schema-driven fuzzing of the REST API: thousands of generated requests, no 500, and no
answer that the OpenAPI document does not describe.

What runs, against a real daemon with one provisioned (read-only) connection:

1. Every operation of the daemon's own `/iot-flow/v1/openapi.json`, loaded by schemathesis
   and turned into hypothesis strategies (`operation.as_strategy(mode)`), in positive mode
   (data the document allows) and negative mode (data it forbids: wrong types, missing or
   unknown fields, out-of-range query values, malformed path parameters). Positive cases
   are also aimed at the ids that exist (the provisioned connection, one made through the
   API, their devices): random ids only ever meet a 404.
2. Schemathesis' state machine, which chains the operations through the links it infers
   (POST a connection, then GET, PUT, DELETE it, list its events, bind devices to it).
3. Requests outside any schema, straight from hypothesis: any method, any content type,
   arbitrary bytes as the body, odd paths and queries.

Every response of 1 and 2 goes through schemathesis' checks (config below): no 5xx, the
status code, content type, headers and body as documented, a schema-valid request never
refused as malformed (400), a resource created is readable and a deleted one gone, the
bearer token enforced. Not checked: `negative_data_rejection`, because the API accepts
more than the document promises on purpose (pydantic's lax mode reads `0` as `false`, the
read-only output fields of a connection are ignored when a client sends them back). 3 only
asserts no 5xx and the error shape.

Why not `@schema.parametrize()`: the daemon is a real process whose log pipe is drained by
a task on the session event loop. A synchronous test would stall that loop, the pipe would
fill up and the daemon would block on its next log line. So the test is async: it starts
the daemon, then runs schemathesis and hypothesis (synchronous, over `requests`) in a worker
thread with `asyncio.to_thread`, and the loop keeps reading the log meanwhile.

Determinism and time: hypothesis runs derandomized (a fixed seed per test function, no
example database), with no deadline and no health checks (a slow CI machine trips them),
and `EXAMPLES` cases per operation and mode, `SCENARIOS` workflows and `RAW_EXAMPLES` bound
the run (about 3000 requests). Parts 1 and 3 send the same requests on every run; the
workflows follow the server's answers (generated ids, connection states that depend on
timing), so their count may vary a little between runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky, Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import Case, GenerationMode, Response
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.schemas import APIOperation, BaseSchema

from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto

pytestmark = pytest.mark.slow

Operation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[Any]

BASE = "/iot-flow/v1"
AUTH = {"Authorization": "Bearer test-token"}

EXAMPLES = 100  # per operation and generation mode
SCENARIOS = 60  # state machine runs
STEPS = 10  # calls per state machine run, at most
RAW_EXAMPLES = 300  # requests outside the schema
MIN_REQUESTS = 2000

PROVISIONED = "from-file"
PROVISIONED_DEVICE = "0018B20000001001"
CREATED = "fuzz-target"
CREATED_DEVICE = "0018b200-0000-2001"
FLOW = "fuzz-flow"  # provisioned: read-only
CREATED_FLOW = "fuzz-api-flow"

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Schemathesis' checks, configured as its schemathesis.toml would be.
CONFIG: dict[str, Any] = {
    "headers": AUTH,
    "checks": {
        # A schema-valid request may be refused for what the schema cannot say (422: a brand's
        # required header; 409: a duplicate id, a read-only connection; 404: an unknown id),
        # never as malformed (400).
        "positive_data_acceptance": {"expected-statuses": ["2XX", "404", "409", "422"]},
        "negative_data_rejection": {"enabled": False},
    },
    "operations": [
        {
            # Signed with a connection's downlink key (AS_ID, Time, Token), which no
            # generator can compute: a schema-valid downlink meets a 401 as well.
            "include-path": f"{BASE}/downlinkMessages/{{id}}",
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2XX", "401", "404", "409", "422"]
                }
            },
        },
        {
            # No [[ingest]] entry is configured here: every ingest id is unknown, and an
            # unknown id is answered as bad credentials are (401).
            "include-path": f"{BASE}/ingest/{{ingestId}}",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2XX", "401"]}},
        },
        # The web console's entry points redirect to it (docs/console.md).
        *(
            {
                "include-path": path,
                "checks": {"positive_data_acceptance": {"expected-statuses": ["302"]}},
            }
            for path in ("/", "/console")
        ),
    ],
}


class Tally:
    """Every request sent on the session, by status code and by part of the run."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.parts: dict[str, int] = {}

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.statuses[response.status_code] += 1

    @property
    def total(self) -> int:
        return self.statuses.total()

    def part(self, name: str) -> None:
        self.parts[name] = self.total - sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {count}" for name, count in self.parts.items())
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(self.statuses.items()))
        return f"{parts}; by status {statuses}"


@pytest.fixture
async def daemon(tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud) -> AsyncIterator[str]:
    daemon = DaemonProcess(
        tmp_path / "fuzz",
        broker_url=mosquitto.url,
        extra=(
            f'[[flows]]\nid = "{FLOW}"\nname = "f"\n'
            'matchers = [{type = "thing", tags = ["a"]}]\n'
            f'connectors = [{{connectionId = "{PROVISIONED}"}}]\n'
        ),
        connections=[
            {
                "id": PROVISIONED,
                "name": "provisioned",
                "connectorId": "actility-http-iot",
                "brand": "CAYENNE",
                "devices": [PROVISIONED_DEVICE],
                "configuration": {"destinationURL": cloud.url("/file")},
            }
        ],
    )
    await daemon.start()
    try:
        async with aiohttp.ClientSession(base_url=daemon.api, headers=AUTH) as api:
            body = {
                "id": CREATED,
                "name": "made through the API",
                "connectorId": "actility-http-iot",
                "configuration": {"destinationURL": cloud.url("/api")},
            }
            async with api.post(f"{BASE}/connections", json=body) as r:
                assert r.status == 201, await r.text()
            async with api.put(
                f"{BASE}/devices/{CREATED_DEVICE}", json={"connections": [CREATED]}
            ) as r:
                assert r.status == 200, await r.text()
            flow = {
                "id": CREATED_FLOW,
                "name": "made through the API",
                "matchers": [{"type": "range", "from": "0" * 16, "to": "F" * 16}],
                "connectors": [{"connectionId": CREATED, "uplinkTimeValidity": "1h"}],
            }
            async with api.post(f"{BASE}/flows", json=flow) as r:
                assert r.status == 201, await r.text()
        yield daemon.api
        failed = [e for e in daemon.logs if e.get("event") == "API request failed"]
        assert not failed, f"the API logged unhandled errors:\n{daemon.tail()}"
    finally:
        await daemon.close()


async def test_generated_requests_find_no_server_error_and_no_schema_break(daemon: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon}{BASE}/openapi.json", headers=AUTH) as r,
    ):
        document = await r.json()
    config = schemathesis.Config.from_dict({**CONFIG, "base-url": daemon})
    schema = schemathesis.openapi.from_dict(document, config=config)

    started = time.monotonic()
    tally, failures = await asyncio.to_thread(fuzz, schema, daemon)
    elapsed = time.monotonic() - started

    print(f"\n{tally.total} requests in {elapsed:.1f}s ({tally.describe()})")
    assert not failures, "\n\n".join(failures)
    assert tally.total >= MIN_REQUESTS
    assert not [status for status in tally.statuses if status >= 500]


def fuzz(schema: BaseSchema, base_url: str) -> tuple[Tally, list[str]]:
    """The three runs on one session; what each found, as schemathesis and hypothesis say it."""
    tally = Tally()
    failures: list[str] = []
    with requests.Session() as session:
        session.hooks["response"].append(tally)
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):
                failures.append(f"unusable operation: {result.err()}")
                continue
            operation = result.ok()
            for mode in GenerationMode:
                label = f"{operation.label} ({mode})"
                failures += failed(label, fuzz_operation, operation, mode, session)
        tally.part("operations")
        failures += fuzz_workflows(schema, session, base_url)
        tally.part("workflows")
        failures += failed("outside the schema", fuzz_raw_requests, session, base_url)
        tally.part("raw")
    return tally, failures


def failed(label: str, run: Callable[..., None], *args: Any) -> list[str]:
    """Run one hypothesis test; its (shrunk) failure as text."""
    try:
        run(*args)
    except (Exception, BaseExceptionGroup) as exc:  # FailureGroup is a BaseExceptionGroup
        return [f"{label}: {type(exc).__name__}: {exc}"]
    return []


def fuzz_operation(operation: Operation, mode: GenerationMode, session: requests.Session) -> None:
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        strategy = st.one_of(strategy, *aimed_at_known_resources(operation))

    @FUZZ
    @given(case=strategy)
    def run(case: AnyCase) -> None:
        case.call_and_validate(session=session)

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # Nothing in the operation can be made invalid (GET /connectors takes no input).


def aimed_at_known_resources(operation: Operation) -> list[SearchStrategy[AnyCase]]:
    """Valid cases on the resources that exist: random ids only ever meet a 404."""
    names = {parameter.name for parameter in operation.path_parameters}
    if "id" in names and operation.path.startswith(f"{BASE}/connections/"):
        known = [{"id": PROVISIONED}, {"id": CREATED}]
    elif "id" in names and operation.path.startswith(f"{BASE}/flows/"):
        known = [{"id": FLOW}, {"id": CREATED_FLOW}]
    elif "devEUI" in names:
        known = [{"devEUI": PROVISIONED_DEVICE}, {"devEUI": CREATED_DEVICE}]
    else:
        known = []
    return [operation.as_strategy(path_parameters=values) for values in known]


def fuzz_workflows(schema: BaseSchema, session: requests.Session, base_url: str) -> list[str]:
    """Schemathesis' state machine; the failures its checks saw.

    A scenario replayed by hypothesis meets a server whose state has moved on, so a replay
    may draw differently (hypothesis' `Flaky`): as in schemathesis' own runner, what the
    checks saw is the verdict, not whether the replay reproduced it.
    """
    seen: list[str] = []
    created: list[str] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: AnyCase) -> dict[str, Any]:
            return {"session": session}

        def after_call(self, response: Response, case: AnyCase) -> None:
            super().after_call(response, case)
            if case.method == "POST" and response.status_code == 201:
                created.append(response.json()["id"])

        def validate_response(self, response: Response, case: AnyCase, **kwargs: Any) -> None:
            try:
                super().validate_response(response, case, **kwargs)
            except FailureGroup as exc:
                seen.append(f"{case.operation.label}: {exc}")
                raise

        def teardown(self) -> None:
            # Each scenario starts from the same state: what one created, it deletes.
            while created:
                url = f"{base_url}{BASE}/connections/{created.pop()}"
                requests.delete(url, headers=AUTH, timeout=30)
            super().teardown()

    workflow_settings = settings(FUZZ, max_examples=SCENARIOS, stateful_step_count=STEPS)
    try:
        Workflow.run(settings=workflow_settings)
    except (Flaky, FailureGroup):
        pass
    except Exception as exc:
        return [f"workflows: {type(exc).__name__}: {exc}"]
    return [f"workflows: {failure}" for failure in dict.fromkeys(seen)]


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]
# Refused by aiohttp's HTTP parser (400, text/plain) before the application sees it.
NOT_HTTP = ["BREW"]
PATHS = [
    f"{BASE}/connectors",
    f"{BASE}/connectors/actility-http-iot",
    f"{BASE}/connections",
    f"{BASE}/connections/{PROVISIONED}",
    f"{BASE}/connections/{CREATED}",
    f"{BASE}/connections/{CREATED}/events",
    f"{BASE}/connections/%00",
    f"{BASE}/connections/..%2F..",
    f"{BASE}/flows",
    f"{BASE}/flows/{FLOW}",
    f"{BASE}/flows/{CREATED_FLOW}",
    f"{BASE}/flows/..%2Fconnections",
    f"{BASE}/devices",
    f"{BASE}/devices/{PROVISIONED_DEVICE}",
    f"{BASE}/devices/{CREATED_DEVICE}",
    f"{BASE}/devices/%ZZ",
    f"{BASE}/openapi.json",
    f"{BASE}/downlinkMessages/{PROVISIONED}",
    f"{BASE}/downlinkMessages/..%2Fconnections",
    f"{BASE}/ingest/nothing",
    f"{BASE}/ingest/..%2Fconnections",
    f"{BASE}/",
    f"{BASE}/nothing/here",
]
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "multipart/form-data",
    "application/x-www-form-urlencoded",
    "*/*",
    ";;",
]


def _containers(inner: SearchStrategy[Any]) -> SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    _containers,
    max_leaves=12,
)


def fuzz_raw_requests(session: requests.Session, base_url: str) -> None:
    """Any method, path, query, content type and body: never a 5xx, always the error shape."""
    bodies = st.one_of(
        st.none(),
        st.binary(max_size=512),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    )
    queries = st.dictionaries(
        st.sampled_from(["page", "perPage", "connectionId", "x", "AS_ID", "Time", "Token"]),
        st.text(max_size=12),
        max_size=3,
    )

    @settings(FUZZ, max_examples=RAW_EXAMPLES)
    @given(
        method=st.sampled_from(METHODS + NOT_HTTP),
        path=st.sampled_from(PATHS),
        query=queries,
        content_type=st.sampled_from(CONTENT_TYPES),
        body=bodies,
        token=st.sampled_from([AUTH["Authorization"], "Bearer nope", "", "Basic dGVzdA=="]),
    )
    def run(
        method: str,
        path: str,
        query: dict[str, str],
        content_type: str | None,
        body: bytes | None,
        token: str,
    ) -> None:
        headers = {"Authorization": token}
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = session.request(
            method, f"{base_url}{path}", params=query, data=body, headers=headers, timeout=30
        )
        answer = f"{method} {response.url} -> {response.status_code} {response.text[:300]!r}"
        assert response.status_code < 500, answer
        if response.status_code >= 400 and method not in ("HEAD", *NOT_HTTP):
            assert response.headers.get("Content-Type", "").startswith("application/json"), answer
            assert set(response.json()) == {"code", "message", "details"}, answer

    run()
