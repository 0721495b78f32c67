"""Client ID Metadata Documents: a client id that is an https URL, resolved to the document it
names (draft-ietf-oauth-client-id-metadata-document-02), for the facade's /authorize.

Why so strict: the URL comes from anyone on the Internet, and we fetch it. Each fetch is a
server-side request an attacker aims, so it goes only to https on public addresses, checked on the
addresses each connection actually uses (the one lookup per connection is the one we check, so a
name that answers differently a second time, DNS rebinding, gains nothing), with no redirect
followed, a short timeout and a 5 KiB body (draft §8.6, §8.7). The document then speaks for a
client the operator never registered, so only a public client's metadata is accepted (no secret,
no shared-secret method, no private key), and its redirect URIs are the only places a sign-in
may go (§8.1; a loopback one on any port, RFC 8252 §7.3). Results are cached within bounds
(§5.2) and concurrent resolves of one URL share one fetch, so a burst of sign-ins costs the
client's host one request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
import time
import unicodedata
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, urlsplit

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult

from oauth_sidecar.config import ClientDocumentsConfig
from oauth_sidecar.config.redirect_uris import (
    RedirectUriRefused,
    is_loopback_redirect,
    parse_redirect_uri,
)
from oauth_sidecar.config.urls import is_dns_name
from oauth_sidecar.response_body import ResponseTooLarge, read_capped

log = structlog.get_logger("oauth_sidecar.client_documents")

MAX_URL = 2048  # characters of a client id URL; real ones are under 100
MAX_DOCUMENT_BYTES = 5 * 1024  # draft §8.7: 5 KiB is the suggested limit
FETCH_TIMEOUT = 5.0  # seconds for the whole fetch: a sign-in waits on it
MIN_LIFETIME = 60.0  # seconds a document is kept at least (no-store included): one sign-in's span
MAX_LIFETIME = 86400.0  # at most a day, whatever the headers say
DEFAULT_LIFETIME = 600.0  # without caching headers
NEGATIVE_LIFETIME = 30.0  # a refusal is remembered briefly: a retry storm costs one fetch
MAX_ENTRIES = 1000  # documents cached at most
MAX_CACHE_BYTES = 2 << 20  # and their bytes at most (bodies plus URLs)
MAX_CLIENT_NAME = 200  # characters: shown on the consent page
MAX_REDIRECT_URIS = 50  # a document listing more is not a real client's
SHARED_SECRET_METHODS = frozenset(
    {"client_secret_basic", "client_secret_post", "client_secret_jwt"}
)
SECRET_MEMBERS = ("client_secret", "client_secret_expires_at")  # draft §4: MUST NOT be present
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})  # RFC 7518 §6
JSON_TYPE = re.compile(r"application/(?:[a-z0-9.+-]+\+)?json")
MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
NO_STORE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:,|$|=)", re.IGNORECASE)
DOT_SEGMENTS = frozenset({".", "..", "%2e", "%2e%2e", ".%2e", "%2e."})
# Addresses refused although some Python versions call them global (3.11: multicast is "global").
NEVER_PUBLIC_V4 = tuple(ipaddress.IPv4Network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
))  # fmt: skip
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
NAT64_V6 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: a public IPv4 address inside

# ClientDocumentRefused.reason values.
DISABLED = "disabled"
"""CIMD=off: client id URLs are not accepted at all."""
INVALID_CLIENT_ID = "invalid_client_id"
"""The client id is not a valid client identifier URL (draft §3)."""
HOST_NOT_ALLOWED = "host_not_allowed"
"""Its host is not in CIMD_ALLOWED_HOSTS."""
ADDRESS_NOT_ALLOWED = "address_not_allowed"
"""Its host is (or resolves to) a loopback, private or otherwise non-public address."""
UNREACHABLE = "unreachable"
"""No answer: the name does not resolve, the connection or TLS failed, or the time ran out."""
BAD_RESPONSE = "bad_response"
"""An answer that is not a document: a redirect, not 200, not JSON, too large."""
INVALID_DOCUMENT = "invalid_document"
"""A document that is not a valid public client's metadata for this URL (draft §4)."""


class ClientDocumentRefused(Exception):
    """A client id URL that cannot be used: `reason` is one of the constants above, for code and
    logs; `description` is a sentence for the OAuth error_description and the operator."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description


class AddressRefused(OSError):
    """A host's address is not one we fetch from; raised inside the connector."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, not a public address")
        self.host = host
        self.address = address


@dataclass(frozen=True, slots=True)
class ClientDocument:
    """A validated client document, as the sign-in and the consent page use it."""

    client_id: str
    """The URL, exactly as the client sent it and the document repeats it."""
    client_name: str | None
    """Its client_name: bounded, without control or formatting characters; None if absent."""
    host: str
    """The URL's host, lowercase: the part of a consent page a client cannot choose freely."""
    redirect_uris: tuple[str, ...]
    """Where a sign-in of this client may go, exactly (each passed parse_redirect_uri)."""
    metadata: Mapping[str, Any]
    """The whole validated document, read-only at its top level."""

    def allows_redirect(self, uri: object) -> bool:
        """uri is one of the document's redirect URIs: exactly (draft §4.2), or for a loopback
        one with any port (RFC 8252 §7.3, RFC 9700 §2.1). A native app listens on a port the
        system gives it at sign-in, which the document it published long before cannot name:
        Claude Code's lists http://127.0.0.1/callback and calls back on :51763. Only the port
        varies: scheme, host (as written: localhost is not 127.0.0.1), path and query match."""
        if not isinstance(uri, str):
            return False
        if uri in self.redirect_uris:
            return True
        asked = _loopback_without_port(uri)
        return asked is not None and any(
            _loopback_without_port(listed) == asked for listed in self.redirect_uris)


def _loopback_without_port(uri: str) -> tuple[str, str, str] | None:
    """(host, path, query) of an http redirect URI on a loopback host, an empty path read as
    `/` (RFC 9110 §4.2.3); None for any other URI."""
    try:
        parts = parse_redirect_uri(uri)
    except RedirectUriRefused:
        return None
    if not is_loopback_redirect(parts):
        return None
    return parts.hostname or "", parts.path or "/", parts.query


def is_client_id_url(value: object) -> bool:
    """Whether a client_id is meant as a client id URL (then resolve() decides if it is one):
    any https URL, in any letter case, so that `HTTPS://...` is refused rather than taken for a
    registered client's id."""
    return isinstance(value, str) and value[:8].lower() == "https://"


def is_public_address(address: str) -> bool:
    """An address a fetch may go to: global unicast only. Loopback, private, link-local
    (169.254.169.254, the cloud metadata service), CGNAT, documentation, benchmarking,
    multicast, reserved and unspecified addresses are refused, and so are IPv6 forms that carry
    one of them: IPv4-mapped (::ffff:10.0.0.1), NAT64 (64:ff9b::a00:1), 6to4 (2002:a00:1::)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return is_public_address(str(embedded))
        if ip in NAT64_V6:
            return is_public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        return ip in GLOBAL_UNICAST_V6 and ip.is_global and not ip.teredo
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
        or ip.is_unspecified or ip.is_private or any(ip in net for net in NEVER_PUBLIC_V4)
    )


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_client_id_url(value: str) -> SplitResult:
    """The URL's parts if it is a client identifier URL (draft §3): https, a host, a path, no
    fragment, no user-info, no dot segments; printable ASCII of bounded length. The URL is never
    normalised: the document must repeat it exactly."""
    def refused(description: str) -> ClientDocumentRefused:
        return ClientDocumentRefused(INVALID_CLIENT_ID, description)

    if len(value) > MAX_URL:
        raise refused(f"The client_id URL is longer than {MAX_URL} characters")
    if not value.isascii() or not value.isprintable() or " " in value or "\\" in value:
        raise refused("The client_id URL has characters outside printable ASCII (or a space "
                      "or backslash)")
    if not value.startswith("https://"):
        raise refused("The client_id URL must start with https:// (lowercase)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise refused("The client_id URL has no valid host and port") from None
    if "@" in parts.netloc:
        raise refused("The client_id URL must not contain user-info (user@ or user:password@)")
    if "#" in value:
        raise refused("The client_id URL must not contain a fragment")
    host = parts.hostname or ""
    if not (is_dns_name(host) or _is_ip_literal(host)):
        raise refused("The client_id URL's host is not a DNS name or an IP address")
    if not parts.path:
        raise refused("The client_id URL must have a path (e.g. /oauth/client.json)")
    if any(segment.lower() in DOT_SEGMENTS for segment in parts.path.split("/")):
        raise refused("The client_id URL must not contain . or .. path segments")
    return parts


class PublicAddressResolver(AbstractResolver):
    """A resolver that answers only with public addresses, or refuses the host.

    The connector asks it once for every connection it opens (no DNS cache, no kept-alive
    connections), and connects only to what it answered: the addresses checked are the
    addresses used. A name with any non-public address is refused as a whole: a document's host
    has no reason to publish one.
    """

    def __init__(self, inner: AbstractResolver, allow_private: bool) -> None:
        self._inner = inner
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for answer in answers:
                if not is_public_address(answer["host"]):
                    raise AddressRefused(host, answer["host"])
        return answers

    async def close(self) -> None:
        await self._inner.close()


def _lifetime(headers: Mapping[str, str], minimum: float, maximum: float) -> float:
    """Seconds to keep a document (draft §5.2): Cache-Control max-age, else Expires (against
    Date), else DEFAULT_LIFETIME; no-store and no-cache mean the least; clamped to the bounds."""
    control = headers.get("Cache-Control", "")
    seconds = DEFAULT_LIFETIME
    if NO_STORE.search(control):
        seconds = minimum
    elif max_age := MAX_AGE.search(control):
        seconds = float(max_age.group(1))
    elif expires := headers.get("Expires"):
        try:
            end = parsedate_to_datetime(expires).timestamp()
            start = parsedate_to_datetime(headers["Date"]).timestamp() if "Date" in headers \
                else time.time()
            seconds = end - start
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = minimum  # an invalid Expires means already expired (RFC 9111 §5.3)
    return min(max(seconds, minimum), maximum)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object members, refusing a repeated name (parsers differ on which one wins)."""
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise ValueError(f"member {name!r} appears twice")
        members[name] = value
    return members


def _invalid(description: str) -> ClientDocumentRefused:
    return ClientDocumentRefused(INVALID_DOCUMENT, description)


def _client_name(document: Mapping[str, Any]) -> str | None:
    name = document.get("client_name")
    if name is None:
        return None
    if not isinstance(name, str):
        raise _invalid("client_name is not a string")
    if len(name) > MAX_CLIENT_NAME:
        raise _invalid(f"client_name is longer than {MAX_CLIENT_NAME} characters")
    # Cc: control characters; Cf: formatting ones such as U+202E, which reverses what follows
    # on the consent page; Zl, Zp: line and paragraph separators; Cs: a lone surrogate (JSON's
    # "\ud800"), which the consent page could not encode as UTF-8.
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") for c in name):
        raise _invalid("client_name has control or formatting characters (or a lone surrogate)")
    return name.strip() or None


def _redirect_uris(document: Mapping[str, Any]) -> tuple[str, ...]:
    uris = document.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise _invalid("redirect_uris must be a non-empty list of redirect URIs")
    if len(uris) > MAX_REDIRECT_URIS:
        raise _invalid(f"redirect_uris lists more than {MAX_REDIRECT_URIS} URIs")
    for index, uri in enumerate(uris):
        try:
            parse_redirect_uri(uri)
        except RedirectUriRefused as refused:
            raise _invalid(f"redirect_uris[{index}] {refused.reason}") from None
    return tuple(dict.fromkeys(uris))


def _check_list_member(document: Mapping[str, Any], name: str, needed: str) -> None:
    """grant_types and response_types, when present, must be lists of strings naming `needed`
    (other values are not refused: they are simply never granted here)."""
    values = document.get(name)
    if values is None:
        return
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _invalid(f"{name} is not a list of strings")
    if needed not in values:
        raise _invalid(f"{name} does not include {needed}, the only flow this server offers")


def _check_public_client(document: Mapping[str, Any]) -> None:
    """A document anyone may publish can only describe a public client (draft §4)."""
    present = [name for name in SECRET_MEMBERS if name in document]
    if present:
        raise _invalid(f"{present[0]} must not appear in a client ID metadata document")
    method = document.get("token_endpoint_auth_method", "none")
    if method in SHARED_SECRET_METHODS:
        raise _invalid(f"token_endpoint_auth_method {method} is a shared-secret method, which a "
                       "client ID metadata document must not use")
    if method != "none":
        raise _invalid("token_endpoint_auth_method must be none (or absent): this server "
                       "accepts client ID metadata documents for public clients only")
    jwks = document.get("jwks")
    if jwks is None:
        return
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
        raise _invalid("jwks is not a JSON Web Key Set (an object with a keys list)")
    if any(PRIVATE_JWK_MEMBERS & key.keys() for key in keys):
        raise _invalid("jwks holds private or symmetric key material")


def validate_document(url: str, host: str, body: bytes) -> ClientDocument:
    """The document at url as a ClientDocument, or ClientDocumentRefused(INVALID_DOCUMENT)
    saying which rule it breaks."""
    try:
        document = json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _invalid(f"The document is not JSON ({exc})"[:200]) from None
    if not isinstance(document, dict):
        raise _invalid("The document is not a JSON object")
    if document.get("client_id") != url:
        raise _invalid("The document's client_id is not the URL it was fetched from, exactly")
    _check_public_client(document)
    _check_list_member(document, "grant_types", "authorization_code")
    _check_list_member(document, "response_types", "code")
    return ClientDocument(
        client_id=url, client_name=_client_name(document), host=host,
        redirect_uris=_redirect_uris(document), metadata=MappingProxyType(document),
    )


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    size: int
    document: ClientDocument | None = None
    refused: ClientDocumentRefused | None = None

    def result(self) -> ClientDocument:
        if self.document is None:
            assert self.refused is not None  # noqa: S101 - one of the two is always set
            raise ClientDocumentRefused(self.refused.reason, self.refused.description)
        return self.document


SocketFactory = Callable[[Any], socket.socket]


class ClientDocuments:
    """Resolves client id URLs to validated documents: fetched under the SSRF rules, cached,
    one fetch per URL at a time. Build it once; use it inside running()."""

    def __init__(
        self,
        config: ClientDocumentsConfig,
        *,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        socket_factory: SocketFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = FETCH_TIMEOUT,
        max_document_bytes: int = MAX_DOCUMENT_BYTES,
        lifetimes: tuple[float, float] = (MIN_LIFETIME, MAX_LIFETIME),
        negative_lifetime: float = NEGATIVE_LIFETIME,
        max_entries: int = MAX_ENTRIES,
        max_cache_bytes: int = MAX_CACHE_BYTES,
    ) -> None:
        self._config = config
        self._inner_resolver = resolver
        self._ssl = ssl_context
        self._socket_factory = socket_factory
        self._clock = clock
        self._timeout = timeout
        self._max_bytes = max_document_bytes
        self._lifetimes = lifetimes
        self._negative_lifetime = negative_lifetime
        self._max_entries = max_entries
        self._max_cache_bytes = max_cache_bytes
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cache_bytes = 0
        self._flights: dict[str, asyncio.Task[_Entry]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0
        """Fetches started, for tests and metrics."""

    @property
    def config(self) -> ClientDocumentsConfig:
        return self._config

    def is_trusted(self, document: ClientDocument) -> bool:
        """The operator named the document's host in CIMD_TRUSTED_HOSTS (no consent page)."""
        return document.host in self._config.trusted_hosts

    def _ssl_context(self) -> ssl.SSLContext:
        """The system's trust store, plus CIMD_CA_FILE's certificates when set."""
        context = ssl.create_default_context()
        if self._config.ca_file:
            context.load_verify_locations(cafile=self._config.ca_file)
        return context

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ClientDocuments]:
        """Own the fetching session for the app's lifetime."""
        inner = self._inner_resolver or aiohttp.DefaultResolver()
        connector = aiohttp.TCPConnector(
            resolver=PublicAddressResolver(inner, self._config.allow_private_addresses),
            use_dns_cache=False,  # every connection resolves, and so is checked, again
            force_close=True,  # no kept-alive connection outlives the check that opened it
            ssl=self._ssl or self._ssl_context(),
            limit=32,
            socket_factory=self._socket_factory,
        )
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            headers={"Accept": "application/json", "Accept-Encoding": "identity"},
        ) as session:
            self._session = session
            try:
                yield self
            finally:
                for flight in list(self._flights.values()):
                    flight.cancel()
                    with suppress(asyncio.CancelledError):
                        await flight
                self._session = None

    async def resolve(self, client_id: str) -> ClientDocument:
        """The validated document client_id names; ClientDocumentRefused for every failure."""
        if self._session is None:
            raise RuntimeError("ClientDocuments.resolve() outside running()")
        if not self._config.enabled:
            raise ClientDocumentRefused(
                DISABLED, "This server does not accept client ID metadata documents")
        parts = parse_client_id_url(client_id)
        host = parts.hostname or ""
        allowed = self._config.allowed_hosts
        if allowed and host not in allowed:
            raise ClientDocumentRefused(
                HOST_NOT_ALLOWED, f"Client documents from {host} are not accepted here")
        if _is_ip_literal(host) and not (
            self._config.allow_private_addresses or is_public_address(host)
        ):
            raise ClientDocumentRefused(
                ADDRESS_NOT_ALLOWED, f"{host} is not a public address")
        entry = self._cache.get(client_id)
        if entry is not None and self._clock() < entry.expires:
            self._cache.move_to_end(client_id)
            return entry.result()
        flight = self._flights.get(client_id)
        if flight is None:
            flight = asyncio.create_task(self._fetch(client_id, host), name="client-document")
            self._flights[client_id] = flight
            flight.add_done_callback(lambda done: self._landed(client_id, done))
        return (await asyncio.shield(flight)).result()

    def _landed(self, url: str, flight: asyncio.Task[_Entry]) -> None:
        """A fetch ended: cache its outcome (unless it was cancelled) and let the next begin."""
        if self._flights.get(url) is flight:
            del self._flights[url]
        if flight.cancelled() or flight.exception() is not None:
            return
        self._store(url, flight.result())

    def _store(self, url: str, entry: _Entry) -> None:
        old = self._cache.pop(url, None)
        if old is not None:
            self._cache_bytes -= old.size
        if entry.size > self._max_cache_bytes:
            return
        self._cache[url] = entry
        self._cache_bytes += entry.size
        while len(self._cache) > self._max_entries or self._cache_bytes > self._max_cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.size

    async def _fetch(self, url: str, host: str) -> _Entry:
        """One fetch and validation, its outcome as a cache entry (a refusal too)."""
        try:
            body, lifetime = await self._get(url)
            document = validate_document(url, host, body)
        except ClientDocumentRefused as refused:
            log.info("client_document_refused", client_id=url[:200], reason=refused.reason,
                     description=refused.description)
            return _Entry(self._clock() + self._negative_lifetime,
                          len(url) + len(refused.description) + 100, refused=refused)
        log.info("client_document_fetched", client_id=url[:200], lifetime=lifetime)
        return _Entry(self._clock() + lifetime, len(url) + len(body) + 200, document=document)

    async def _get(self, url: str) -> tuple[bytes, float]:
        """The body of a 200 JSON answer at url, and how long to keep it."""
        session = self._session
        assert session is not None  # noqa: S101 - resolve() checked it
        self.fetches += 1
        seconds = f"{self._timeout:g} s"
        try:
            async with session.get(url, allow_redirects=False) as response:
                status = response.status
                if 300 <= status < 400:  # the redirect class
                    raise ClientDocumentRefused(
                        BAD_RESPONSE, f"The client document URL answered with a redirect (HTTP "
                        f"{status}), which is not followed")
                if status != 200:
                    raise ClientDocumentRefused(
                        BAD_RESPONSE, f"The client document URL answered HTTP {status}, not 200")
                if not JSON_TYPE.fullmatch(response.content_type.lower()):
                    raise ClientDocumentRefused(
                        BAD_RESPONSE, "The client document is not served as application/json")
                if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                    raise ClientDocumentRefused(
                        BAD_RESPONSE, "The client document is served compressed")
                body = await read_capped(response, self._max_bytes)
                lifetime = _lifetime(response.headers, *self._lifetimes)
        except ResponseTooLarge:
            raise ClientDocumentRefused(
                BAD_RESPONSE, f"The client document is larger than {self._max_bytes} bytes"
            ) from None
        except TimeoutError:
            raise ClientDocumentRefused(
                UNREACHABLE, f"The client document was not fetched within {seconds}") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                raise ClientDocumentRefused(
                    ADDRESS_NOT_ALLOWED, f"{exc.os_error.host} resolves to "
                    f"{exc.os_error.address}, not a public address") from None
            if isinstance(exc, aiohttp.ClientConnectorCertificateError):
                raise ClientDocumentRefused(
                    UNREACHABLE, "The client document host's TLS certificate is not trusted"
                ) from None
            raise ClientDocumentRefused(
                UNREACHABLE, f"The client document host cannot be reached "
                f"({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise ClientDocumentRefused(
                UNREACHABLE, f"The client document fetch failed ({type(exc).__name__})"
            ) from None
        return body, lifetime
