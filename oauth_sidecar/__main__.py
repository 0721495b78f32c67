"""Command line: `oauth-sidecar [serve]` loads the configuration (every problem printed, exit 2),
sets up logging and serves; other subcommands are thin entry points into their own modules."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from functools import partial

import structlog

from oauth_sidecar import __version__, descriptors, listener
from oauth_sidecar.app import CHILD, create_app
from oauth_sidecar.config import LOG_LEVELS, VARIABLES, Config, ConfigError, load
from oauth_sidecar.config_summary import summary
from oauth_sidecar.log import configure_logging
from oauth_sidecar.metrics import MetricsListenError
from oauth_sidecar.process_privacy import forbid_inspection
from oauth_sidecar.secret_mask import SecretMask
from oauth_sidecar.upstream.child import ChildStartError
from oauth_sidecar.upstream.credential import read_token

EXIT_CONFIG = 2
EXIT_CHILD_FAILED = 1


def _variables_help() -> str:
    width = max(map(len, VARIABLES))
    lines = ["environment variables:"]
    for name, (default, meaning) in VARIABLES.items():
        shown = f" [default: {default}]" if default else ""
        lines.append(f"  {name:<{width}}  {meaning}{shown}")
    return "\n".join(lines)


def _new_event_loop(config: Config) -> asyncio.AbstractEventLoop:
    if config.event_loop == "uvloop":
        import uvloop  # noqa: PLC0415 - an optional extra, present when config chose it

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oauth-sidecar",
        description="OAuth 2.1 resource-server sidecar for one MCP server. "
        "Configured entirely by environment variables. Without a command it serves.",
        epilog=_variables_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"oauth-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve (the default): protect the configured MCP server")
    _demo_arguments(commands.add_parser(
        "demo", help="try it: a development OpenID provider, an example MCP server and the "
        "sidecar in front of it, on this machine only"))
    check = commands.add_parser(
        "check", help="diagnose the configuration, IdP and upstream (exit 0 pass, 1 fail)",
        description="Load the configuration, fetch the IdP's metadata and keys, reach the "
        "upstream (or spawn the child and stop it), print what an MCP client will see and every "
        "known pitfall with its fix. Exit 0: pass; 1: an error (or a refused --token); 2: the "
        "configuration does not load.",
    )
    token = check.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="TOKEN", help="explain, claim by claim, whether this "
                       "access token would be accepted; '-' reads it from stdin (a token on the "
                       "command line lands in your shell history)")
    token.add_argument("--token-file", metavar="PATH", help="read the token from this file")
    check.add_argument("--strict", action="store_true", help="warnings fail the check too")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("-v", "--verbose", action="store_true",
                       help="log at LOG_LEVEL to stderr (e.g. the spawned child's output); "
                       "default: warnings only")
    return parser


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="loopback address for the sidecar: 127.0.0.1 (default), ::1 or "
                             "localhost; anything else is refused")
    parser.add_argument("--port", type=_port, default=8080,
                        help="port of the sidecar, the MCP URL you connect to (default 8080; "
                             "0 picks a free one)")
    parser.add_argument("--idp-port", type=_port, default=0,
                        help="port of the development OpenID provider (default: a free one)")
    parser.add_argument("--mcp-port", type=_port, default=0,
                        help="port of the example MCP server (default: a free one)")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def load_or_report(env: Mapping[str, str], heading: str) -> Config | None:
    """The configuration, or None after printing every problem to stderr."""
    try:
        return load(env)
    except ConfigError as exc:
        print(heading, file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None


def secret_mask(config: Config) -> SecretMask:
    """Every secret the sidecar holds, for the log: the configuration's and the upstream
    credential as it is now (create_app adds it again after each rotation)."""
    mask = SecretMask(config.secrets)
    if config.upstream_bearer_file:
        with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):  # create_app says why
            mask.add(read_token(config.upstream_bearer_file))
    return mask


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from oauth_sidecar.devtools import demo  # noqa: PLC0415  development only: never on the serving path

        return demo.run(args)
    # Before the secrets are read and the child exists: same-uid processes never see them.
    unprotected = forbid_inspection()
    config = load_or_report(os.environ, (
        "oauth-sidecar check: FAIL, the sidecar would not start; the configuration has problems:"
        if args.command == "check" else
        "oauth-sidecar: cannot start, the configuration has problems:"))
    if config is None:
        return EXIT_CONFIG
    mask = secret_mask(config)
    if args.command == "check":
        return check(config, args, mask, unprotected)
    return serve(config, mask, unprotected)


def _log_unprotected(reason: str | None) -> None:
    if reason is not None:
        structlog.get_logger("oauth_sidecar").warning(
            "process_inspectable", reason=reason,
            consequence="processes of the same user, the spawned child included, may read "
                        "this process's environment and memory")


def check(config: Config, args: argparse.Namespace, mask: SecretMask | None = None,
          unprotected: str | None = None) -> int:
    """`check`: the report on stdout, logs (warnings, or LOG_LEVEL with -v) on stderr."""
    level = config.log_level if args.verbose else max(
        config.log_level, "warning", key=LOG_LEVELS.index)
    configure_logging(level, config.log_format, sys.stderr, mask)
    _log_unprotected(unprotected)
    try:
        from oauth_sidecar import doctor  # noqa: PLC0415  `check` only: never on the serving path

        token = doctor.read_token(args.token, args.token_file, sys.stdin)
    except ValueError as exc:
        print(f"oauth-sidecar check: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return doctor.run(config, token, strict=args.strict, as_json=args.json)


def _fit_to_descriptors(config: Config) -> Config:
    """Raise the descriptor limit and fit the connection caps to it; one log line with the
    figures (a warning when a configured cap had to be lowered)."""
    log = structlog.get_logger("oauth_sidecar")
    limit = descriptors.raise_limit()
    fitted = descriptors.fit(config, limit.soft)
    lowered = [name for name, before, after in (
        ("MAX_CONNECTIONS", config.listener.max_connections, fitted.listener.max_connections),
        ("MAX_STREAMS_PER_SUBJECT", config.upstream.max_streams_per_subject,
         fitted.upstream.max_streams_per_subject),
    ) if after != before]
    (log.warning if lowered else log.info)(
        "file_descriptors", soft=limit.soft, hard=limit.hard, raised_from=limit.raised_from,
        max_connections=fitted.listener.max_connections,
        max_streams_per_subject=fitted.upstream.max_streams_per_subject, lowered=lowered)
    return fitted


def serve(config: Config, mask: SecretMask | None = None, unprotected: str | None = None) -> int:
    """Run the sidecar until SIGTERM/SIGINT; the exit code says why it stopped."""
    configure_logging(config.log_level, config.log_format, mask=mask)
    log = structlog.get_logger("oauth_sidecar")
    log.info("starting", version=__version__, **summary(config))
    _log_unprotected(unprotected)
    for warning in config.warnings:
        log.warning("config_warning", message=warning)
    config = _fit_to_descriptors(config)

    def shut_down() -> None:  # MCP_SPAWN_RESTART=never: the child died, so do we (non-zero)
        os.kill(os.getpid(), signal.SIGTERM)

    # Only MCP_SPAWN_RESTART=never ends the sidecar; a crash loop otherwise stays up, reported
    # by /readyz, for an operator to see.
    never = config.spawn is not None and not config.spawn.restart
    app = create_app(config, on_child_give_up=shut_down if never else None,
                     on_upstream_token=mask.add if mask is not None else None)
    try:
        with asyncio.Runner(loop_factory=partial(_new_event_loop, config)) as runner:
            runner.run(listener.serve(app, config))
    except MetricsListenError as exc:  # METRICS_PORT is taken, or METRICS_HOST is not ours
        log.error("listen_failed", listener="metrics", host=exc.host, port=exc.port,
                  error=exc.error)
        return EXIT_CONFIG
    except OSError as exc:  # the port is taken, or the address does not exist here
        log.error("listen_failed", host=config.host, port=config.port, error=str(exc))
        return EXIT_CONFIG
    except ChildStartError as exc:  # e.g. MCP_SPAWN_PORT already taken by another process
        log.error("child_start_failed", reason=exc.reason)
        return EXIT_CONFIG
    child = app.get(CHILD)
    if child is not None and child.gave_up:
        log.error("stopped", reason="the MCP child process was given up")
        return EXIT_CHILD_FAILED
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
