"""The web console in a real browser (Debian's Chromium driven by Playwright) against a real
`iotflow run`, a real Mosquitto and a local Datacake-like cloud (docs/console.md).

Screenshots of the main pages are taken on the way; with IOTFLOW_UPDATE_SCREENSHOTS=1 they
replace the ones under docs/images/ that the README shows.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import aiomqtt
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Request, async_playwright, expect

from support.clouds import FakeCloud, datacake
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import uplink

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OWNER = "console-owner-token"
READER = "console-reader-token"
TOKENS = f'["{OWNER}", {{name = "grafana", token = "{READER}", role = "reader"}}]'
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
# Safety net for what the page shows after a poll (the console polls every 2 s).
WAIT_MS = 30_000
expect.set_options(timeout=WAIT_MS)


@dataclass
class Watch:
    """What the page did that a test must see: console errors, other hosts, its requests."""

    origin: str
    errors: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    # (status, path pattern) of the answers the test provokes on purpose.
    expected: list[tuple[int, str]] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        # The browser reports each non-2xx answer as an error of the console; the ones the
        # test provokes on purpose (a wrong token, a bad URL, an unbound device looked up
        # before binding it) are allowed, nothing else.
        where = urlsplit(message.location.get("url", "")).path
        if message.text.startswith("Failed to load resource") and any(
            f"status of {status}" in message.text and re.fullmatch(pattern, where)
            for status, pattern in self.expected
        ):
            return
        self.errors.append(f"{message.text} ({where})")

    def request(self, request: Request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("data", "blob"):
            return
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.elsewhere.append(request.url)


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; its absence fails the test, it is never skipped (CI installs it)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the console's browser tests need Debian's chromium "
            "(apt-get install chromium; .ci/run installs it)"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def daemon(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "console", broker_url=mosquitto.url, tokens=TOKENS)
    await process.start()
    yield process
    await process.close()


async def open_page(
    browser: Browser, daemon: DaemonProcess, **context: object
) -> tuple[Page, Watch]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900}, **context)  # type: ignore[arg-type]
    page = await ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    watch = Watch(daemon.api)
    page.on("console", watch.console)
    page.on("pageerror", lambda exc: watch.errors.append(f"page error: {exc}"))
    page.on("request", watch.request)
    return page, watch


async def sign_in(page: Page, daemon: DaemonProcess, token: str) -> None:
    await page.goto(f"{daemon.api}/")
    await expect(page).to_have_url(re.compile(r"/console/"))
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def shot(page: Page, name: str, tmp_path: Path, *, full_page: bool = True) -> None:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get("IOTFLOW_UPDATE_SCREENSHOTS") == "1":
        IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, IMAGES / path.name)


async def publish(broker: Mosquitto, dev_eui: str, fcnt: int) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        topic, payload = uplink("actility", dev_eui, fcnt)
        await client.publish(topic, payload, qos=1)


async def test_console_files_are_served_under_a_strict_policy(daemon: DaemonProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{daemon.api}/", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/console/"
        for name, kind in (
            ("", "text/html"),
            ("app.js", "text/javascript"),
            ("style.css", "text/css"),
        ):
            async with session.get(f"{daemon.api}/console/{name}") as r:
                assert r.status == 200  # no token needed to load the console
                assert r.content_type == kind
                policy = r.headers["Content-Security-Policy"]
                assert "script-src 'self'" in policy
                assert "connect-src 'self'" in policy
                assert "frame-ancestors 'none'" in policy
                assert "unsafe-inline" not in policy
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                text = await r.text()
                assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
                assert "https://" not in text
        for hostile in (
            "../auth.py",
            "..%2F__init__.py",
            "%2e%2e/server.py",
            "nothing.js",
            "app.js%00",
        ):
            async with session.get(f"{daemon.api}/console/{hostile}") as r:
                assert r.status == 404, hostile
        # Every call the console makes still needs a token.
        async with session.get(f"{daemon.api}/iot-flow/v1/whoami") as r:
            assert r.status == 401


async def test_operator_creates_binds_sees_deliveries_and_edits(
    browser: Browser,
    daemon: DaemonProcess,
    cloud: FakeCloud,
    mosquitto: Mosquitto,
    tmp_path: Path,
) -> None:
    cloud.require(datacake("abc123"))
    page, watch = await open_page(browser, daemon)
    watch.expected = [
        (401, "/iot-flow/v1/whoami"),
        (422, "/iot-flow/v1/connections"),
        (404, "/iot-flow/v1/devices/[^/]+"),
    ]

    # A wrong token says so, and stays off the URL.
    await sign_in(page, daemon, "\u00e9t\u00e9")  # no request: it cannot be a token
    await expect(page.get_by_role("alert")).to_contain_text("not valid")
    await page.get_by_label("API token").fill("not-the-token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("the daemon refused it")
    await shot(page, "console-sign-in", tmp_path)
    # By keyboard: the token, then Enter.
    await page.get_by_label("API token").fill(OWNER)
    await page.get_by_label("API token").press("Enter")
    await expect(page.get_by_role("heading", name="Connections")).to_be_visible()
    await expect(page.locator("#who")).to_have_text("token-1 (owner)")

    # Create a Datacake connection through the form: connector, then brand.
    await page.get_by_role("link", name="Create a connection").click()
    await page.locator("select[name='connectorId']").select_option("actility-http-iot")
    await page.locator("select[name='brand']").select_option("DATACAKE")
    token_field = page.locator("[name='configuration.headers.Authorization']")
    await expect(token_field).to_have_attribute("type", "password")
    await expect(page.get_by_label("Authorization (header) *")).to_be_visible()
    await expect(page.locator(".brand-url")).to_contain_text(
        "https://api.datacake.co/integrations/lorawan/actility"
    )
    await page.locator("[name='name']").fill("Datacake")
    await page.locator("[name='id']").fill("datacake")
    await token_field.fill("Token abc123")
    # A bad URL: the API's error appears next to the field.
    url = page.locator("[name='configuration.destinationURL']")
    await url.fill("not a url")
    await page.get_by_role("button", name="Create").click()
    await expect(url).to_have_attribute("aria-invalid", "true")
    error = page.locator(".field:has([name='configuration.destinationURL']) + .field-error")
    await expect(error).to_contain_text("absolute http")
    await shot(page, "console-field-error", tmp_path)
    await url.fill(cloud.url("/dc"))
    await page.get_by_role("button", name="Create").click()
    await expect(page.locator("#toasts")).to_contain_text("Connection Datacake created")
    await expect(page).to_have_url(re.compile(r"#/connections/datacake$"))

    # Bind a device in another spelling; it is shown normalised.
    await page.get_by_label("DevEUI to bind").fill("0018b200-0000-4001")
    await page.get_by_role("button", name="Bind").click()
    await expect(page.locator("#toasts")).to_contain_text("Device 0018B20000004001 bound")
    await expect(page.get_by_role("cell", name="0018B20000004001", exact=True)).to_be_visible()

    # An uplink: the cloud gets it and the statistics move on the page.
    await publish(mosquitto, "0018B20000004001", 1)
    (first,) = await cloud.wait_for(1, path="/dc")
    assert first.headers["Authorization"] == "Token abc123"
    delivered = page.locator("section [data-stat='delivered'] dd")
    await expect(delivered).to_have_text("1")
    await expect(page.locator(".state").first).to_have_text("OPENED")
    await shot(page, "console-connection", tmp_path)

    # Edit a field; the secret shows as ***** and is kept.
    await page.get_by_role("link", name="Edit").click()
    await expect(page.locator("[name='configuration.headers.Authorization']")).to_have_value(
        "*****"
    )
    await page.locator("[name='name']").fill("Datacake renamed")
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("heading", name="Datacake renamed")).to_be_visible()
    await publish(mosquitto, "0018B20000004001", 2)
    second = (await cloud.wait_for(2, path="/dc"))[1]
    assert second.headers["Authorization"] == "Token abc123"
    await expect(page.locator("section [data-stat='delivered'] dd")).to_have_text("2")
    events = page.locator("section:has(#evt-title)")
    await expect(events).to_contain_text("configuration_changed")
    await expect(events).to_contain_text('"by":"token-1"')

    # The list: state, statistics and the chart of the deliveries.
    await page.get_by_role("link", name="Connections").click()
    item = page.locator("[data-connection='datacake']")
    await expect(item.locator(".state")).to_have_text("OPENED")
    await expect(item.locator("[data-stat='delivered'] dd")).to_have_text("2")
    await expect(item.locator("svg.chart")).to_be_visible()
    await shot(page, "console-connections", tmp_path)

    # Flows, drivers, alarms.
    await page.get_by_role("link", name="Flows").click()
    await page.get_by_role("link", name="Create a flow").click()
    await page.locator("[name='name']").fill("Paris")
    await page.locator("[name='matchers[0].type']").select_option("thing")
    await page.locator("[name='matchers[0].tags']").fill("site=Paris, Temperature")
    await page.get_by_label("Datacake renamed (datacake)").check()
    await page.get_by_role("button", name="Create").click()
    await expect(page.locator("#toasts")).to_contain_text("Flow created")
    await page.get_by_role("link", name="Flows").click()
    await expect(page.get_by_role("cell", name="tags site=paris, temperature")).to_be_visible()
    await shot(page, "console-flows", tmp_path)
    await page.get_by_role("link", name="Drivers").click()
    await expect(page.get_by_role("heading", name="Try a driver")).to_be_visible()
    await page.get_by_role("link", name="Alarms").click()
    await expect(page.get_by_text("No alarm raised.")).to_be_visible()

    # Deactivate, then delete with confirmation (after the flow that names it).
    await page.goto(f"{daemon.api}/console/#/connections/datacake")
    await page.get_by_role("button", name="Deactivate").click()
    await expect(page.locator("#toasts")).to_contain_text("Connection deactivated")
    await expect(page.locator("section .state").first).to_have_text("DEACTIVATED")
    await page.get_by_role("button", name="Activate").click()
    await expect(page.locator("#toasts")).to_contain_text("Connection activated")

    # Phone-sized: the list is still readable.
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.get_by_role("link", name="Connections").click()
    await expect(page.locator("[data-connection='datacake']")).to_be_visible()
    await shot(page, "console-phone", tmp_path)

    # Delete, each after its confirmation: the flow, then the connection it names.
    await page.set_viewport_size({"width": 1280, "height": 900})
    await page.get_by_role("link", name="Flows").click()
    await page.get_by_role("link", name="Paris").click()
    await page.get_by_role("button", name="Delete").click()
    await page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    await expect(page.locator("#toasts")).to_contain_text("Flow deleted")
    await page.goto(f"{daemon.api}/console/#/connections/datacake")
    await page.get_by_role("button", name="Delete").click()
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_contain_text("Delete the connection Datacake renamed?")
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(page.get_by_role("heading", name="Datacake renamed")).to_be_visible()
    await page.get_by_role("button", name="Delete").click()
    await page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    await expect(page.locator("#toasts")).to_contain_text("Connection Datacake renamed deleted")
    await expect(page.get_by_text("No connection yet.")).to_be_visible()

    # The token lives in the tab's sessionStorage, never in a URL.
    assert OWNER not in page.url
    assert watch.elsewhere == []
    assert watch.errors == []


async def test_the_form_follows_each_connectors_schema(
    browser: Browser, daemon: DaemonProcess, tmp_path: Path
) -> None:
    page, watch = await open_page(browser, daemon)
    watch.expected = [(422, "/iot-flow/v1/connections")]
    await sign_in(page, daemon, OWNER)
    await page.get_by_role("link", name="Create a connection").click()
    await page.locator("select[name='connectorId']").select_option("actility-mqtt-iot")
    await expect(page.get_by_label("hostName *")).to_be_visible()  # required: marked
    await expect(page.locator("[name='configuration.password']")).to_have_attribute(
        "type", "password"
    )
    key = page.locator("[name='configuration.privateKey']")  # PEM: many lines
    await expect(key).to_have_js_property("tagName", "TEXTAREA")
    await expect(page.locator("select[name='configuration.protocol'] option")).to_have_text(
        ["TCP", "SSL", "WSS"]
    )
    await expect(page.locator("select[name='configuration.qos']")).to_be_visible()
    await expect(page.locator("[name='brand']")).to_have_count(0)  # no brands: no menu
    # Every control has a visible label and a key path as its name (the JSON fields once
    # their section is open).
    await page.get_by_text("Alarms and processors (JSON)").click()
    for control in await page.locator("form [name]").all():
        name = await control.get_attribute("name")
        assert name
        assert re.fullmatch(r"[A-Za-z]+(\.[A-Za-z]+)*", name), name
        label_id = await control.get_attribute("id")
        assert await page.locator(f"label[for='{label_id}']").is_visible(), name
    await page.locator("[name='name']").fill("broker")
    await page.get_by_role("button", name="Create").click()
    host = page.locator("[name='configuration.hostName']")
    await expect(host).to_have_attribute("aria-invalid", "true")
    await expect(
        page.locator(".field:has([name='configuration.hostName']) + .field-error")
    ).to_have_text("Field required")
    assert watch.elsewhere == []
    assert watch.errors == []


async def test_reader_sees_but_is_offered_no_change(
    browser: Browser, daemon: DaemonProcess, cloud: FakeCloud
) -> None:
    async with aiohttp.ClientSession() as session:
        body = {
            "id": "seen",
            "name": "Seen",
            "connectorId": "actility-http-iot",
            "brand": "DATACAKE",
            "configuration": {
                "destinationURL": cloud.url("/dc"),
                "headers": {"Authorization": "Token hidden-from-readers"},
            },
        }
        async with session.post(
            f"{daemon.api}/iot-flow/v1/connections",
            json=body,
            headers={"Authorization": f"Bearer {OWNER}"},
        ) as r:
            assert r.status == 201
    page, watch = await open_page(browser, daemon)
    await sign_in(page, daemon, READER)
    await expect(page.locator("#who")).to_have_text("grafana (reader)")
    await expect(page.locator("[data-connection='seen']")).to_be_visible()
    await expect(page.get_by_role("link", name="Create a connection")).to_have_count(0)
    await page.get_by_role("link", name="Seen").click()
    await expect(page.get_by_role("heading", name="Seen")).to_be_visible()
    await expect(page.get_by_role("link", name="Edit")).to_have_count(0)
    await expect(page.get_by_role("button", name="Delete")).to_have_count(0)
    await expect(page.get_by_role("button", name="Bind")).to_have_count(0)
    await expect(page.get_by_role("button", name="Start replay")).to_have_count(0)
    await expect(page.locator("section:has(#cfg-title)")).to_contain_text("*****")
    assert "hidden-from-readers" not in await page.content()

    # Signed out on 401: the token is refused from now on (as after a restart with others).
    await page.evaluate("sessionStorage.setItem('iotflow.token', 'revoked')")
    watch.expected = [(401, "/iot-flow/v1/.*")]
    await page.get_by_role("link", name="Connections").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await expect(page.get_by_role("alert")).to_contain_text("Signed out")
    assert await page.evaluate("sessionStorage.getItem('iotflow.token')") is None
    assert watch.elsewhere == []
    assert watch.errors == []


async def test_operator_resends_a_dead_letter_and_starts_a_replay(
    browser: Browser,
    daemon: DaemonProcess,
    cloud: FakeCloud,
    mosquitto: Mosquitto,
    tmp_path: Path,
) -> None:
    dev = "0018B20000004002"
    cloud.require(datacake("abc123"))
    # Datacake refuses the first uplink once (as it does for a device it does not know).
    cloud.respond(400, path="/dl", times=1, body={"error": "unknown device"})
    owner = {"Authorization": f"Bearer {OWNER}"}
    api = f"{daemon.api}/iot-flow/v1"
    async with aiohttp.ClientSession(headers=owner) as session:
        body = {
            "id": "dl",
            "name": "Datacake",
            "connectorId": "actility-http-iot",
            "brand": "DATACAKE",
            "configuration": {
                "destinationURL": cloud.url("/dl"),
                "headers": {"Authorization": "Token abc123"},
            },
        }
        async with session.post(f"{api}/connections", json=body) as r:
            assert r.status == 201
        async with session.put(f"{api}/devices/{dev}", json={"connections": ["dl"]}) as r:
            assert r.status == 200
        await publish(mosquitto, dev, 7)
        (refused,) = await cloud.wait_for_requests(1, path="/dl")
        assert refused.status == 400

    page, watch = await open_page(browser, daemon)
    await sign_in(page, daemon, OWNER)
    await page.goto(f"{daemon.api}/console/#/connections/dl")
    letters = page.locator("section:has(#dl-title)")
    # The letter is kept once the worker has written it; the page's refresh shows it.
    row = letters.locator("tbody tr")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("unknown device")
    await expect(row).to_contain_text("HTTP 400")
    await row.get_by_role("button", name=re.compile("Show dead letter")).click()
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_contain_text('"FCntUp": 7')
    await shot(page, "console-dead-letter", tmp_path, full_page=False)  # the dialog
    await dialog.get_by_role("button", name="Close").click()

    await row.get_by_role("button", name=re.compile("Re-send dead letter")).click()
    await expect(page.locator("#toasts")).to_contain_text("1 dead letter(s) re-sent")
    accepted = await cloud.wait_for(1, path="/dl")
    assert accepted[0].json["DevEUI_uplink"]["FCntUp"] == 7
    await expect(letters).to_contain_text("No dead letter.")

    # A replay of the last hour sends the journal's uplink once more, followed to its end.
    replays = page.locator("section:has(#rp-title)")
    await replays.get_by_role("button", name="Start replay").click()
    await expect(page.locator("#toasts")).to_contain_text("Replay started: 1 uplink(s)")
    await expect(replays.locator("[data-replay] .state")).to_have_text("done")
    await expect(replays.locator("[data-replay]")).to_contain_text("1 delivered")
    again = await cloud.wait_for(2, path="/dl")
    assert again[1].json["DevEUI_uplink"]["FCntUp"] == 7
    await shot(page, "console-replay", tmp_path)
    events = page.locator("section:has(#evt-title)")
    await page.reload()
    await expect(events).to_contain_text("dead_letters_resent")
    await expect(events).to_contain_text("replay_started")
    assert watch.elsewhere == []
    assert watch.errors == []
