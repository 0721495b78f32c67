"""The status a request ended with, the same for the access log and the metrics.

Why: a handler ends with a response, an HTTPException, or cancellation when its client leaves
(aiohttp's handler_cancellation); each must be recorded exactly once with one status, and two
places deciding that separately would drift apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

from aiohttp import web

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Record = Callable[[int], None]


class Recording:
    """`with Recording(records) as outcome:` ... `outcome.status = response.status`: each record
    is called with the status however the block ends (500 for an error nothing answered).
    A context manager rather than a wrapping coroutine: it runs on every request."""

    __slots__ = ("_records", "status")

    def __init__(self, records: Sequence[Record]) -> None:
        self._records = records
        self.status = 500

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 _: TracebackType | None) -> None:
        if isinstance(error, web.HTTPException):
            self.status = error.status
        elif isinstance(error, asyncio.CancelledError):
            self.status = CLIENT_CLOSED_REQUEST
        elif error is not None:
            self.status = 500
        for record in self._records:
            record(self.status)


async def handle_and_record(
    request: web.Request, handler: Handler, record: Record
) -> web.StreamResponse:
    """Run handler; call record(status) however it ends."""
    with Recording((record,)) as outcome:
        response = await handler(request)
        outcome.status = response.status
        return response
