"""Official-SDK (mcp 2.x) MCP server in stdio mode, for the stdio bridge's tests (issue 18).

Run as ``python tests/mcp_stdio_server.py``: newline-delimited JSON-RPC on stdin/stdout, one
client per process, as every stdio MCP server expects. Tools:

* ``echo(text)`` returns ``text`` unchanged.
* ``whoami()`` returns a JSON object ``{pid, user_sub, user_email, user_issuer, cwd}``: the
  process id and the ``MCP_USER_*`` variables the bridge puts in the child's environment with
  ``FORWARD_IDENTITY``, so a test proves which process (and which subject's) served a call.
* ``slow(steps, delay)`` sleeps ``steps`` times ``delay`` seconds, reporting a progress
  notification after each step; a ``notifications/cancelled`` for its request stops it. It writes
  ``slow step N`` after each step and ``slow cancelled`` when cancelled to stderr (the bridge logs
  the child's stderr as ``child_output``), so a test sees from outside that the work stopped.
* ``ask(question)`` elicits ``{answer: str}`` from the client and returns ``"accept: <answer>"``
  (a declined or cancelled elicitation fails the call).
* ``sample(prompt)`` asks the client's model for a completion and returns its text.

``ask`` and ``sample`` use the SDK's resolvers (``Resolve``, ``Elicit``, ``Sample``), so they speak
whichever protocol the client negotiated: up to 2025-11-25 a server-to-client request
(``elicitation/create``, ``sampling/createMessage``) in the middle of the call; from 2026-07-28 an
``InputRequiredResult`` that the client answers by retrying the call with ``inputResponses``
(the 2026-07-28 protocol has no server-to-client requests). The SDK's stdio client negotiates
2026-07-28 with this server in ``mode="auto"``.
* ``crash()`` ends the process at once (status 3), without an answer.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import anyio
import mcp_types as types
from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve, Sample
from pydantic import BaseModel

TOOLS = ["echo", "whoami", "slow", "ask", "sample", "crash"]
CRASH_STATUS = 3


class Answer(BaseModel):
    """The one field ``ask`` elicits."""

    answer: str


# The resolvers live at module level: the SDK evaluates the tools' (string) annotations there.
def ask_the_client(question: str) -> Elicit[Answer]:
    """``ask``'s question, put to the client (elicitation)."""
    return Elicit(question, Answer)


def ask_the_model(prompt: str) -> Sample:
    """``sample``'s prompt, put to the client's model (sampling)."""
    text = types.TextContent(type="text", text=prompt)
    return Sample([types.SamplingMessage(role="user", content=text)], max_tokens=64)


def _stderr(line: str) -> None:
    # stdout is the JSON-RPC wire; anything else goes to stderr, one line at a time.
    print(line, file=sys.stderr, flush=True)


def build_server() -> MCPServer:
    server: MCPServer = MCPServer("mcp-stdio-server", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Return the given text unchanged."""
        return text

    @server.tool()
    def whoami() -> str:
        """Return this process's id, forwarded identity and working directory, as JSON."""
        env = os.environ  # noqa: TID251 - reporting what the bridge forwarded is the point
        return json.dumps(
            {
                "pid": os.getpid(),
                "user_sub": env.get("MCP_USER_SUB"),
                "user_email": env.get("MCP_USER_EMAIL"),
                "user_issuer": env.get("MCP_USER_ISSUER"),
                "cwd": os.getcwd(),
            },
            sort_keys=True,
        )

    @server.tool()
    async def slow(steps: int, delay: float, ctx: Context) -> str:
        """Sleep ``steps`` times ``delay`` seconds, reporting progress after each step."""
        done = 0
        try:
            for step in range(1, steps + 1):
                await anyio.sleep(delay)
                done = step
                _stderr(f"slow step {step}")
                await ctx.report_progress(step, steps, f"step {step} of {steps}")
        except anyio.get_cancelled_exc_class():
            _stderr(f"slow cancelled after {done}")
            raise
        return f"slow done: {steps} steps"

    @server.tool()
    def ask(question: str, answer: Annotated[Answer, Resolve(ask_the_client)]) -> str:
        """Ask the client for an answer (an elicitation round trip)."""
        return f"accept: {answer.answer}"

    @server.tool()
    def sample(
        prompt: str, reply: Annotated[types.CreateMessageResult, Resolve(ask_the_model)]
    ) -> str:
        """Ask the client's model for a completion (a sampling round trip)."""
        content = reply.content
        return content.text if isinstance(content, types.TextContent) else repr(content)

    @server.tool()
    def crash() -> str:
        """End the process at once, without an answer."""
        _stderr("crashing")
        os._exit(CRASH_STATUS)

    return server


def main() -> None:
    build_server().run("stdio")


if __name__ == "__main__":
    main()
