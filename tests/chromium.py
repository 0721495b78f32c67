"""A real headless Chromium for tests, driven over the Chrome DevTools Protocol (CDP).

Not a test module. Why not Playwright: its browsers come from its own download site, and tests
here reach nothing beyond loopback; Debian's `chromium` package is installed by .ci/run instead.
CDP is JSON over one websocket, which aiohttp's client speaks: this file is the few commands
the browser tests need and nothing else.

`browser()` starts `chromium --headless=new` with a throwaway profile and its DevTools port on
127.0.0.1, in a process group of its own, reads the websocket URL from the DevToolsActivePort
file the browser writes, and always closes it (Browser.close, then SIGTERM, SIGKILL) and waits
for its helper processes to be gone. Host names are mapped with --host-resolver-rules (the
caller's map; every other name fails to resolve, so the browser never leaves loopback), and
certificates are trusted by the SHA-256 of their public key (--ignore-certificate-errors-spki-list:
only the test's own key, not every certificate). `Tab` opens one page, navigates and waits for
its load, evaluates JavaScript, reads cookies, and records every event of its session, so a test
can see where navigations went (Network.requestWillBeSent) even when the destination does not
exist. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from processes import stop_process

EXECUTABLE = shutil.which("chromium") or shutil.which("chromium-browser")
START_TIMEOUT = 30.0  # seconds for the browser to write its DevTools port (a loaded CI machine)
STEP_TIMEOUT = 15.0  # seconds for one command, one navigation or one awaited event
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_close=STOP_GRACE)
BROWSER_PATH = re.compile(r"/devtools/browser/[0-9a-f-]{36}")  # complete: the file is not atomic
FLAGS = (
    "--headless=new", "--no-sandbox",  # CI runs as root, where the sandbox cannot start
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--password-store=basic", "--use-mock-keychain",
)

T = TypeVar("T")
Event = tuple[str, dict[str, Any]]
"""(method, params) of one CDP event."""


class CdpError(Exception):
    """The browser answered a command with an error."""


def spki_hash(certificate_pem: bytes) -> str:
    """The value --ignore-certificate-errors-spki-list takes: base64 SHA-256 of the public key."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    der = certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@dataclass
class Session:
    """The events of one CDP session (a tab), in order, with a signal for waiters."""

    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Browser:
    """One websocket to the browser: commands matched to answers by id, events by session."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._sessions: dict[str, Session] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                answer = self._answers.pop(data["id"], None)
                if answer is not None and not answer.done():
                    if "error" in data:
                        answer.set_exception(CdpError(data["error"]))
                    else:
                        answer.set_result(data.get("result", {}))
            elif (session := self._sessions.get(data.get("sessionId", ""))) is not None:
                session.events.append((data["method"], data.get("params", {})))
                session.changed.set()
        for answer in self._answers.values():  # the browser went away: nobody waits forever
            if not answer.done():
                answer.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, params: Mapping[str, Any] | None = None,
                   session: str | None = None) -> dict[str, Any]:
        """One command, its answer within STEP_TIMEOUT."""
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": dict(params or {})}
        if session is not None:
            message["sessionId"] = session
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[number] = answer
        await self._socket.send_str(json.dumps(message))
        async with asyncio.timeout(STEP_TIMEOUT):
            return await answer

    def session(self, session_id: str) -> Session:
        return self._sessions.setdefault(session_id, Session())

    async def new_tab(self) -> Tab:
        """A new page at about:blank, attached (flat session) with Page, Network, Runtime and
        Log events on."""
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        attached = await self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        tab = Tab(self, attached["sessionId"], target)
        self.session(tab.session_id)
        for domain in ("Page", "Network", "Runtime", "Log"):
            await tab.send(f"{domain}.enable")
        return tab

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@dataclass
class Tab:
    browser: Browser
    session_id: str
    target_id: str

    async def send(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session_id)

    @property
    def events(self) -> list[Event]:
        return self.browser.session(self.session_id).events

    async def wait_for(self, method: str,
                       matches: Callable[[dict[str, Any]], bool] = lambda _: True, *,
                       since: int = 0, within: float = STEP_TIMEOUT) -> dict[str, Any]:
        """The first `method` event at or after index `since` that `matches`; TimeoutError after
        `within` seconds."""

        def found() -> dict[str, Any] | None:
            return next((params for name, params in self.events[since:]
                         if name == method and matches(params)), None)

        return await self._until(found, f"no {method}", since, within)

    async def wait_loaded(self, url: str, *, since: int = 0, within: float = STEP_TIMEOUT) -> None:
        """Until the document at `url` has loaded (its response, then a load event), however
        the tab got there (a script's form submission, a redirect)."""

        def found() -> bool | None:
            received = False
            for name, params in self.events[since:]:
                if name == "Network.responseReceived" and params["response"]["url"] == url:
                    received = True
                elif name == "Page.loadEventFired" and received:
                    return True
            return None

        await self._until(found, f"{url} did not load", since, within)

    async def _until(self, found: Callable[[], T | None], failure: str, since: int,
                        within: float) -> T:
        session = self.browser.session(self.session_id)
        try:
            async with asyncio.timeout(within):
                while (result := found()) is None:
                    session.changed.clear()
                    await session.changed.wait()
                return result
        except TimeoutError:  # say what the browser said meanwhile: a CSP refusal, say
            raise TimeoutError(f"{failure} within {within} s; the browser's console: "
                               f"{self.messages(since)}") from None

    async def navigate(self, url: str) -> None:
        """Go to url and wait for its load event (an error page loads too)."""
        mark = len(self.events)
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("Page.loadEventFired", since=mark)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CdpError(result["exceptionDetails"])
        return result["result"].get("value")

    async def click_and_wait(self, selector: str) -> None:
        """Click the element and wait for the page it leads to to load."""
        mark = len(self.events)
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        await self.wait_for("Page.loadEventFired", since=mark)

    async def cookies(self) -> list[dict[str, Any]]:
        """Every cookie the browser holds (Network.getAllCookies: HttpOnly ones too)."""
        cookies: list[dict[str, Any]] = (await self.send("Network.getAllCookies"))["cookies"]
        return cookies

    def documents(self, since: int = 0) -> list[str]:
        """URLs of the documents this tab requested, in order: every navigation and every
        redirect it followed, including those to hosts that do not resolve."""
        return [params["request"]["url"] for name, params in self.events[since:]
                if name == "Network.requestWillBeSent" and params.get("type") == "Document"]

    def _urls(self, since: int) -> dict[str, str]:
        return {params["requestId"]: params["request"]["url"]
                for name, params in self.events[since:] if name == "Network.requestWillBeSent"}

    def failures(self, since: int = 0) -> list[tuple[str, str]]:
        """(url, error) of the documents this tab (or a frame in it) did not get: e.g.
        net::ERR_BLOCKED_BY_RESPONSE for a frame its response forbade."""
        urls = self._urls(since)
        return [(urls.get(params["requestId"], ""), params["errorText"])
                for name, params in self.events[since:]
                if name == "Network.loadingFailed" and params.get("type") == "Document"]

    def cookies_sent(self, url: str, since: int = 0) -> dict[str, list[str]]:
        """The cookies the browser had for its requests to `url`: name -> the reasons it
        withheld it (empty: sent). Network.requestWillBeSentExtraInfo reports them, one event
        per hop of a request (a redirect keeps the request's id), in the order of the hops."""
        hops: dict[str, list[str]] = {}
        extras: dict[str, list[dict[str, Any]]] = {}
        for name, params in self.events[since:]:
            if name == "Network.requestWillBeSent":
                hops.setdefault(params["requestId"], []).append(params["request"]["url"])
            elif name == "Network.requestWillBeSentExtraInfo":
                extras.setdefault(params["requestId"], []).append(params)
        found: dict[str, list[str]] = {}
        for request, urls in hops.items():
            for hop_url, extra in zip(urls, extras.get(request, []), strict=False):
                if hop_url == url:
                    for item in extra.get("associatedCookies", []):
                        found[item["cookie"]["name"]] = list(item["blockedReasons"])
        return found

    def responses(self, since: int = 0) -> list[tuple[str, int]]:
        """(url, status) of the documents this tab received."""
        return [(params["response"]["url"], params["response"]["status"])
                for name, params in self.events[since:]
                if name == "Network.responseReceived" and params.get("type") == "Document"]

    def messages(self, since: int = 0) -> list[str]:
        """The browser's console messages for this tab (Log domain): security refusals too."""
        return [params["entry"]["text"] for name, params in self.events[since:]
                if name == "Log.entryAdded"]


@asynccontextmanager
async def browser(*, hosts: Mapping[str, str] = {}, trusted_keys: tuple[str, ...] = ()
                  ) -> AsyncIterator[Browser]:
    """A headless Chromium. hosts: name -> "127.0.0.1:port" (every other name fails to
    resolve; IP literals are not names); trusted_keys: spki_hash() values of certificates to
    accept whatever their issuer."""
    if EXECUTABLE is None:
        raise FileNotFoundError("chromium is not installed")
    rules = [f"MAP {name} {address}" for name, address in hosts.items()]
    rules += ["MAP * ~NOTFOUND", "EXCLUDE 127.0.0.1"]  # the rules apply to IP literals too
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        log = Path(profile).parent / (Path(profile).name + ".log")
        args = [*FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1", f"--host-resolver-rules={', '.join(rules)}"]
        if trusted_keys:
            args.append(f"--ignore-certificate-errors-spki-list={','.join(trusted_keys)}")
        with log.open("wb") as stderr:  # its own process group: its helpers are ended with it
            process = await asyncio.create_subprocess_exec(
                EXECUTABLE, *args, "about:blank", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            url = await _devtools_url(Path(profile), process, log)
            async with aiohttp.ClientSession(trust_env=False) as http:
                async with asyncio.timeout(STEP_TIMEOUT):
                    socket = await http.ws_connect(url, max_msg_size=0, timeout=WS_TIMEOUT)
                async with socket:
                    connection = Browser(socket)
                    try:
                        yield connection
                    finally:
                        with contextlib.suppress(CdpError, TimeoutError, ConnectionError):
                            await connection.send("Browser.close")  # lets it shut down cleanly
                        await connection.close()
        finally:
            await stop_process(process, STOP_GRACE)
            await _end_group(process.pid)
            log.unlink(missing_ok=True)


async def _end_group(group: int) -> None:
    """Chromium's helper processes (renderers, GPU, zygote) leave after the browser does, and
    may still write to the profile: wait (bounded) for the group to be empty, then kill what is
    left of it and wait again, so the profile can be removed and nothing outlives the test."""
    if await _group_gone(group):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    await _group_gone(group)


async def _group_gone(group: int) -> bool:
    deadline = asyncio.get_running_loop().time() + STOP_GRACE
    while _group_alive(group):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


async def _devtools_url(profile: Path, process: asyncio.subprocess.Process, log: Path) -> str:
    """ws://127.0.0.1:PORT/devtools/browser/ID from the file Chromium writes once it listens."""
    async with asyncio.timeout(START_TIMEOUT):
        while (url := _written_url(profile / "DevToolsActivePort")) is None:
            if process.returncode is not None:
                raise RuntimeError(f"chromium exited with {process.returncode}: {_tail(log)}")
            await asyncio.sleep(0.05)
    return url


def _written_url(active: Path) -> str | None:
    """The file holds the port, then the path; None until both are there."""
    lines = active.read_text().splitlines() if active.exists() else []
    if len(lines) >= 2 and lines[0].isdigit() and BROWSER_PATH.fullmatch(lines[1]):
        return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
    return None


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]
