"""A user at the development provider's sign-in page, for tests: open the page, pick a demo user
(submit its form), and stop at the redirect back to the client, which is never connected to.

Not a test module. `DevProviderSdkClient` is the official SDK's OAuth client (tests/oauth_flow.py)
with this user agent in place of the redirect-following one: the dev provider's page needs a
click (a POST with the page's single-use request value), as a person would give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urljoin, urlsplit

import aiohttp
from mcp.shared.auth import AuthorizationCodeResult
from oauth_flow import SdkOAuthClient

HTTP_TIMEOUT = 10.0
REQUEST_FIELD = re.compile(r'<input type="hidden" name="request" value="([^"]+)">')


@dataclass(frozen=True)
class SignIn:
    page_status: int
    page: str
    location: str | None
    """Where the form's answer redirected: the client's redirect_uri with the response."""
    params: dict[str, str]


async def sign_in(authorization_url: str, user: str | None = "alice", *,
                  deny: bool = False) -> SignIn:
    """GET the authorization URL; if it shows the sign-in page, submit it for `user` (or deny).

    An error page (no form) or a redirect straight back to the client (an error response) ends
    the walk there, with `location` and `params` telling which."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        async with session.get(authorization_url, allow_redirects=False) as response:
            page, status = await response.text(), response.status
            location = response.headers.get("Location")
        found = REQUEST_FIELD.search(page)
        if location is not None or found is None:
            return SignIn(status, page, location, _query(location))
        form = {"request": found.group(1)}
        form.update({"deny": "1"} if deny else {"user": user} if user else {})
        target = urljoin(authorization_url, "/authorize")
        async with session.post(target, data=form, allow_redirects=False) as answer:
            location = answer.headers.get("Location")
            if location is None:
                raise AssertionError(f"the form answered {answer.status} without a redirect: "
                                     f"{(await answer.text())[:500]}")
        return SignIn(status, page, location, _query(location))


def _query(location: str | None) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(location).query)) if location else {}


class DevProviderSdkClient(SdkOAuthClient):
    """The SDK's OAuth client, signing in at the dev provider as `user`."""

    def __init__(self, mcp_url: str, user: str = "alice") -> None:
        super().__init__(mcp_url)
        self.user = user
        self.sign_ins: list[SignIn] = []

    async def _redirect(self, authorization_url: str) -> None:
        observed = self._current
        assert observed is not None, "an authorization outside of session()"
        observed.authorization_urls.append(authorization_url)
        result = await sign_in(authorization_url, self.user)
        self.sign_ins.append(result)
        assert result.location is not None, result.page[:500]
        assert result.location.startswith(self.redirect_uri), result.location
        assert "code" in result.params, result.params
        self._pending = AuthorizationCodeResult(
            code=result.params["code"], state=result.params.get("state"),
            iss=result.params.get("iss"),
        )
