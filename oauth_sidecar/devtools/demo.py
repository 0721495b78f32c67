"""`oauth-sidecar demo`: the whole picture on one machine, with nothing else installed.

Why: a newcomer's first command. It starts a development OpenID provider (dev_provider.py), an
example MCP server (example_mcp.py) and, in front of that server, the production sidecar: the
environment is built here, then `config.load` and `create_app` run exactly as for `serve`, so
the sidecar fetches the provider's discovery document and keys over HTTP and validates its
tokens like any IdP's. No validation shortcut exists for the demo; the printed token is minted by
the provider's own token builder. Then it prints what to paste (curl, Claude Code, MCP Inspector)
and the sidecar's log follows.

Everything listens on loopback only, in this one process and event loop: the provider signs
anyone in without a password, so a non-loopback --host is refused (exit 2) with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import shlex
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web

from oauth_sidecar.app import IDP, create_app
from oauth_sidecar.config import Config, ConfigError, is_loopback_host, load
from oauth_sidecar.devtools.dev_provider import DEMO_USERS, DemoUser, DevProvider
from oauth_sidecar.devtools.example_mcp import LATEST, MCP_PATH, ExampleMcpServer
from oauth_sidecar.listener import make_runner
from oauth_sidecar.log import configure_logging

log = structlog.get_logger("oauth_sidecar.demo")

EXIT_USAGE = 2
EXIT_FAILED = 1
TOKEN_LIFETIME = 3600  # seconds the printed token works: long enough to try every client
READY_TIMEOUT = 15.0  # seconds for the sidecar to load the provider's keys
ALLOWED_GROUP = "mcp-users"  # alice is in it, bob is not (he shows the sidecar's 403)
SERVER_NAME = "oauth-sidecar-demo"
# The MCP Inspector's web UI origins, besides the sidecar's defaults (Claude).
# What the printout shows of the sidecar's environment: the variables a real deployment sets too.
SHOWN_VARIABLES = ("OIDC_ISSUER_URL", "OIDC_AUDIENCE", "RESOURCE_URL", "MCP_UPSTREAM_URL",
                   "ALLOW_GROUPS", "FORWARD_IDENTITY")
CORS_ORIGINS = "https://claude.ai,https://claude.com,http://localhost:6274,http://127.0.0.1:6274"


class DemoError(Exception):
    """A reason the demo cannot start, printed as one line (exit 2)."""


@dataclass
class Listener:
    """A bound loopback socket and the origin clients use to reach it."""

    sock: socket.socket
    origin: str


def _listen(host: str, port: int, option: str) -> Listener:
    address = "127.0.0.1" if host == "localhost" else host
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's TCPSite does
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DemoError(f"port {port} on {host} is already in use: choose another with "
                            f"{option} (e.g. {option} {port + 1 if port < 65535 else 0})"
                            ) from None
        raise DemoError(f"cannot listen on {host} port {port}: {exc.strerror}") from None
    shown = f"[{host}]" if ":" in host else host
    return Listener(sock, f"http://{shown}:{sock.getsockname()[1]}")


def sidecar_environment(resource: str, issuer: str, upstream: str, port: int) -> dict[str, str]:
    """What an operator would put in the environment for this setup: nothing demo-specific."""
    return {
        "OIDC_ISSUER_URL": issuer,
        "OIDC_AUDIENCE": resource,
        "RESOURCE_URL": resource,
        "MCP_UPSTREAM_URL": upstream,
        "PORT": str(port),
        "AUTH_SERVER_MODE": "direct",  # clients sign in at the provider itself
        "ALLOW_GROUPS": ALLOWED_GROUP,
        "FORWARD_IDENTITY": "true",  # so `whoami` can show what the sidecar verified
        "CORS_ALLOW_ORIGINS": CORS_ORIGINS,
        "LOG_FORMAT": "auto",  # console on a terminal, JSON lines when piped
        "EVENT_LOOP": "asyncio",
        "SHUTDOWN_TIMEOUT_SECONDS": "2",
    }


def run(args: argparse.Namespace) -> int:
    """Start the three servers, print how to use them, serve until SIGINT/SIGTERM."""
    listeners: list[Listener] = []
    try:
        if not is_loopback_host(args.host):
            raise DemoError(
                f"refusing to listen on {args.host}: the demo's development OpenID provider "
                "signs anyone in as a demo user without a password, so the demo listens on "
                "loopback only (127.0.0.1, ::1 or localhost). To protect a real MCP server, "
                "run `oauth-sidecar serve` with your identity provider."
            )
        sidecar = _listen(args.host, args.port, "--port")
        listeners.append(sidecar)
        idp = _listen("127.0.0.1", args.idp_port, "--idp-port")
        listeners.append(idp)
        mcp = _listen("127.0.0.1", args.mcp_port, "--mcp-port")
        listeners.append(mcp)
        resource = sidecar.origin + MCP_PATH
        env = sidecar_environment(resource, idp.origin, mcp.origin + MCP_PATH,
                                  sidecar.sock.getsockname()[1])
        try:
            config = load(env)
        except ConfigError as exc:  # a bug, not a user error: say what the sidecar said
            raise DemoError("the sidecar refused the demo's configuration: "
                            + "; ".join(exc.problems)) from None
        provider = DevProvider(idp.origin, resource)
        configure_logging(config.log_level, config.log_format)
        return asyncio.run(_serve(config, env, provider, ExampleMcpServer(), sidecar=sidecar,
                                  idp=idp, mcp=mcp))
    except DemoError as exc:
        print(f"oauth-sidecar demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for listener in listeners:
            listener.sock.close()


async def _serve(
    config: Config, env: Mapping[str, str], provider: DevProvider, example: ExampleMcpServer,
    *,
    sidecar: Listener, idp: Listener, mcp: Listener,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = create_app(config)
    runners: list[web.AppRunner] = []
    try:
        for runner, listener in (
            (web.AppRunner(provider.app(), access_log=None,
                           shutdown_timeout=config.shutdown_timeout), idp),
            (web.AppRunner(example.app(), access_log=None,
                           shutdown_timeout=config.shutdown_timeout), mcp),
            (make_runner(app, config), sidecar),  # bounded as `serve` runs it
        ):
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, listener.sock).start()
        for warning in config.warnings:
            log.warning("config_warning", message=warning)
        deadline = time.monotonic() + READY_TIMEOUT
        while not app[IDP].ready:  # the printed token must work the moment it is printed
            if stop.is_set():
                return 0
            if time.monotonic() > deadline:
                print(f"oauth-sidecar demo: the sidecar could not load the provider's keys: "
                      f"{app[IDP].last_error}", file=sys.stderr)
                return EXIT_FAILED
            await asyncio.sleep(0.02)
        alice = DEMO_USERS[0]
        token = provider.mint_access_token(alice, client_id=SERVER_NAME,
                                           scope=("openid", "email", "profile"),
                                           lifetime=TOKEN_LIFETIME)
        print(instructions(config.resource_url, token, env, alice), flush=True)
        await stop.wait()
    finally:
        for runner in reversed(runners):  # the sidecar first: no request finds its peers gone
            await runner.cleanup()
    log.info("stopped")
    return 0


def _command(*words: str) -> str:
    return shlex.join(words)


def initialize_body() -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": LATEST, "capabilities": {},
        "clientInfo": {"name": "curl", "version": "1.0"}}}, separators=(",", ":"))


def instructions(url: str, token: str, env: Mapping[str, str], user: DemoUser) -> str:
    """The text printed once everything answers; every command in it works as printed."""
    issuer, users = env["OIDC_ISSUER_URL"], DEMO_USERS
    bearer = f"Authorization: Bearer {token}"
    until = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + TOKEN_LIFETIME))
    mcp_headers = ("-H", "Content-Type: application/json",
                   "-H", "Accept: application/json, text/event-stream")
    lines = [
        "oauth-sidecar demo: an example MCP server behind the sidecar, with a development "
        "OpenID provider.",
        "Everything listens on this machine only. For trying things out, never for production.",
        "",
        "MCP server URL (the sidecar in front of the example MCP server):",
        f"  {url}",
        "",
        f"Development OpenID provider, the sidecar's OIDC_ISSUER_URL (demo users "
        f"{' and '.join(u.email for u in users)}; no passwords):",
        f"  {issuer}",
        "",
        f"Bearer token for {user.email}, valid for {TOKEN_LIFETIME // 60} minutes "
        f"(until {until}):",
        f"  {token}",
        "",
        "Without a token the sidecar answers 401; its WWW-Authenticate header says where to "
        "sign in:",
        f"  {_command('curl', '-i', url)}",
        "",
        "With the token, the example MCP server answers initialize through the sidecar:",
        f"  {_command('curl', '-i', '-X', 'POST', url, '-H', bearer, *mcp_headers, '-d', initialize_body())}",  # noqa: E501
        "",
        "Claude Code:",
        f"  {_command('claude', 'mcp', 'add', '--transport', 'http', SERVER_NAME, url, '--header', bearer)}",  # noqa: E501
        "  Without --header, Claude Code signs in itself: run /mcp in Claude Code, choose",
        "  Authenticate, and pick a demo user on the provider's page in your browser.",
        "  Tokens and the provider's keys end with this process: after a restart, run",
        f"  `claude mcp remove {SERVER_NAME}` and add it again.",
        "",
        "MCP Inspector (Node.js 22.19 or later), from the command line:",
        f"  {_command('npx', '@modelcontextprotocol/inspector', '--cli', url, '--transport', 'http', '--header', bearer, '--method', 'tools/call', '--tool-name', 'echo', '--tool-arg', 'text=hello')}",  # noqa: E501
        "  or in its web UI (npx @modelcontextprotocol/inspector): transport Streamable HTTP,",
        f"  URL {url}, and the header Authorization: Bearer <the token above>.",
        "",
        "The sidecar is the production one, configured as for `oauth-sidecar serve` with:",
        *(f"  {name}={shlex.quote(value)}" for name, value in env.items()
          if name in SHOWN_VARIABLES),
        "",
        "Stop with Ctrl-C. The sidecar's log follows: one line per request.",
        "",
    ]
    return "\n".join(lines)
