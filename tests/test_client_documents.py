"""signin/client_documents.py: client id URLs resolved to Client ID Metadata Documents.

Real fetches only, on loopback: an https server on 127.0.0.1 with a throwaway CA made here,
reached as client.example.test through an injected resolver. Every SSRF rule is shown to refuse
after resolution and before any connection: a socket factory records every connection attempt
(and refuses any off loopback, so no test can send a packet elsewhere), and the server counts
what it served. Cache lifetimes run on an injected clock, never on wall-clock time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from oauth_sidecar.config import ClientDocumentsConfig, ConfigError, load
from oauth_sidecar.signin.client_documents import (
    ADDRESS_NOT_ALLOWED,
    BAD_RESPONSE,
    DISABLED,
    HOST_NOT_ALLOWED,
    INVALID_CLIENT_ID,
    INVALID_DOCUMENT,
    UNREACHABLE,
    ClientDocument,
    ClientDocumentRefused,
    ClientDocuments,
    is_client_id_url,
    is_public_address,
    parse_client_id_url,
    validate_document,
)

NAME = "client.example.test"
WAIT = 10.0  # seconds: the bound on every wait in this file
PUBLIC_LOOKING = "93.184.216.34"  # never connected to: the socket factory refuses it


# --- A throwaway CA and a real https server ------------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server: ssl.SSLContext


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder().subject_name(_name(NAME)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("pki")
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return Pki(ca_file=ca_file, server=server)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class DocumentServer:
    """An https server on 127.0.0.1: each path's handler is set by the test; hits are counted."""

    port: int = 0
    handlers: dict[str, Handler] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"https://{NAME}:{self.port}{path}"

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    def serve(self, path: str, document: Any, **headers: str) -> str:
        """Serve document as JSON at path; its URL."""
        body = json.dumps(document).encode()

        async def handler(_: web.Request) -> web.StreamResponse:
            return web.Response(body=body, content_type="application/json",
                                headers={k.replace("_", "-"): v for k, v in headers.items()})
        self.handlers[path] = handler
        return self.url(path)

    def serve_client(self, path: str, **headers: str) -> str:
        """A valid document for the URL at path."""
        return self.serve(path, good_document(self.url(path)), **headers)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        handler = self.handlers.get(request.path)
        if handler is None:
            raise web.HTTPNotFound
        return await handler(request)


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[DocumentServer]:
    served = DocumentServer()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", served.dispatch)
    runner = web.AppRunner(app, shutdown_timeout=1.0, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki.server)
    await site.start()
    served.port = runner.addresses[0][1]
    try:
        yield served
    finally:
        await runner.cleanup()


def good_document(url: str, **changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "client_id": url,
        "client_name": "Example Client",
        "redirect_uris": ["https://client.example.test/callback", "http://127.0.0.1/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    document.update(changes)
    return {k: v for k, v in document.items() if v is not None}


# --- The injected resolver, connection recorder and clock -----------------------------------

class Resolver(AbstractResolver):
    """Answers from a table (a list of answers per lookup: the next one each time, the last
    one repeated), counting lookups."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        if host not in self.answers:
            raise OSError(f"test resolver: no such host {host}")
        series = self.answers[host]
        addresses = series[min(self.lookups.count(host), len(series)) - 1]
        return [{
            "hostname": host, "host": address, "port": port, "proto": 0,
            "flags": socket.AI_NUMERICHOST,
            "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
        } for address in addresses]

    async def close(self) -> None:
        return None


@dataclass
class Connections:
    """The connector's socket factory: records each attempt; refuses any off loopback."""

    attempts: list[str] = field(default_factory=list)

    def __call__(self, addr_info: Any) -> socket.socket:
        family, kind, proto, _, address = addr_info
        self.attempts.append(address[0])
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise OSError(f"test: no connection to {address[0]}")
        return socket.socket(family, kind, proto)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    documents: ClientDocuments
    resolver: Resolver
    connections: Connections
    clock: Clock


@pytest.fixture
def rig_factory(pki: Pki) -> Callable[..., Rig]:
    def make(answers: dict[str, list[list[str]]] | None = None, *, private: bool = True,
             **options: Any) -> Rig:
        config = ClientDocumentsConfig(allow_private_addresses=private, ca_file=str(pki.ca_file))
        config = replace(config, **options.pop("config", {}))
        resolver = Resolver({NAME: [["127.0.0.1"]]} if answers is None else answers)
        connections, clock = Connections(), Clock()
        documents = ClientDocuments(config, resolver=resolver, socket_factory=connections,
                                    clock=clock, **options)
        return Rig(documents, resolver, connections, clock)
    return make


async def refused(documents: ClientDocuments, url: str) -> ClientDocumentRefused:
    with pytest.raises(ClientDocumentRefused) as caught:
        await asyncio.wait_for(documents.resolve(url), WAIT)
    return caught.value


# --- The document itself -------------------------------------------------------------------

async def test_a_valid_document_is_fetched_over_https_and_validated(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.serve_client("/oauth/client.json")
    rig = rig_factory()
    async with rig.documents.running() as documents:
        document = await asyncio.wait_for(documents.resolve(url), WAIT)
    assert isinstance(document, ClientDocument)
    assert (document.client_id, document.client_name, document.host) == (
        url, "Example Client", NAME)
    assert document.redirect_uris == ("https://client.example.test/callback",
                                      "http://127.0.0.1/callback")
    assert document.allows_redirect("http://127.0.0.1/callback")
    assert not document.allows_redirect("https://client.example.test/callback/")
    assert not document.allows_redirect("https://client.example.test:8443/callback")
    # A loopback redirect on any port (RFC 8252 §7.3): the port is all that may differ.
    assert document.allows_redirect("http://127.0.0.1:8080/callback")
    for other in ("http://127.0.0.1:8080/callback/", "http://127.0.0.1:8080/other",
                  "http://127.0.0.1:8080/callback?x=1", "http://localhost:8080/callback",
                  "http://[::1]:8080/callback", "https://127.0.0.1:8080/callback",
                  "http://127.0.0.2:8080/callback", "http://user@127.0.0.1:8080/callback",
                  "http://127.0.0.1:8080/callback#x", None):
        assert not document.allows_redirect(other), other
    assert document.metadata["grant_types"] == ["authorization_code", "refresh_token"]
    assert rig.connections.attempts == ["127.0.0.1"]
    assert rig.resolver.lookups == [NAME]
    assert server.hits == {"/oauth/client.json": 1}


async def test_the_documents_own_host_may_be_restricted(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.serve_client("/c.json")
    allowed = rig_factory(config={"allowed_hosts": frozenset({NAME})})
    async with allowed.documents.running() as documents:
        assert (await asyncio.wait_for(documents.resolve(url), WAIT)).host == NAME
    other = rig_factory(config={"allowed_hosts": frozenset({"claude.ai"})})
    async with other.documents.running() as documents:
        failure = await refused(documents, url)
    assert failure.reason == HOST_NOT_ALLOWED
    assert NAME in failure.description
    assert other.resolver.lookups == []
    assert other.connections.attempts == []
    assert server.total == 1


async def test_trusted_hosts_are_told_apart(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.serve_client("/c.json")
    for trusted, expected in ((frozenset({NAME}), True), (frozenset({"claude.ai"}), False)):
        rig = rig_factory(config={"trusted_hosts": trusted})
        async with rig.documents.running() as documents:
            document = await asyncio.wait_for(documents.resolve(url), WAIT)
            assert documents.is_trusted(document) is expected


@pytest.mark.parametrize(("path", "document", "words"), [
    ("/mismatch", {"client_id": "https://client.example.test/other.json"}, "client_id"),
    ("/no-redirects", {"redirect_uris": None}, "redirect_uris"),
    ("/secret-method", {"token_endpoint_auth_method": "client_secret_basic"}, "shared-secret"),
])
async def test_a_document_breaking_the_rules_is_refused(
    server: DocumentServer, rig_factory: Callable[..., Rig], path: str,
    document: dict[str, Any], words: str
) -> None:
    url = server.serve(path, good_document(server.url(path), **document))
    rig = rig_factory()
    async with rig.documents.running() as documents:
        failure = await refused(documents, url)
    assert failure.reason == INVALID_DOCUMENT
    assert words in failure.description


URL = "https://client.example.test/c.json"


@pytest.mark.parametrize(("changes", "words"), [
    ({"client_id": "https://client.example.test/c.json/"}, "client_id"),
    ({"client_id": "https://CLIENT.example.test/c.json"}, "client_id"),  # never normalised
    ({"client_id": None}, "client_id"),
    ({"redirect_uris": []}, "non-empty"),
    ({"redirect_uris": "https://client.example.test/cb"}, "non-empty"),
    ({"redirect_uris": [7]}, "redirect_uris[0] is not a string"),
    ({"redirect_uris": ["javascript:alert(1)"]}, "redirect_uris[0]"),
    ({"redirect_uris": ["http://client.example.test/cb"]}, "must use https"),
    ({"redirect_uris": ["https://client.example.test/cb#x"]}, "redirect_uris[0]"),
    ({"redirect_uris": ["https://client.example.test/cb"] * 51}, "more than 50"),
    ({"token_endpoint_auth_method": "client_secret_post"}, "shared-secret"),
    ({"token_endpoint_auth_method": "client_secret_jwt"}, "shared-secret"),
    ({"token_endpoint_auth_method": "private_key_jwt"}, "public clients only"),
    ({"client_secret": "s3cret"}, "client_secret must not"),
    ({"client_secret_expires_at": 0}, "client_secret_expires_at"),
    ({"grant_types": ["client_credentials"]}, "authorization_code"),
    ({"grant_types": "authorization_code"}, "list of strings"),
    ({"response_types": ["token"]}, "code"),
    ({"client_name": 7}, "not a string"),
    ({"client_name": "x" * 201}, "longer than 200"),
    ({"client_name": "Good\u202eevil"}, "control or formatting"),
    ({"client_name": "Two\nlines"}, "control or formatting"),
    ({"client_name": "Lone\ud800"}, "control or formatting"),
    ({"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}, "private or symmetric"),
    ({"jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c"}]}},
     "private or symmetric"),
    ({"jwks": []}, "JSON Web Key Set"),
])
def test_each_rule_of_the_document_names_itself(changes: dict[str, Any], words: str) -> None:
    body = json.dumps(good_document(URL, **changes)).encode()
    with pytest.raises(ClientDocumentRefused) as caught:
        validate_document(URL, NAME, body)
    assert caught.value.reason == INVALID_DOCUMENT
    assert words in caught.value.description


@pytest.mark.parametrize(("body", "words"), [
    (b"[]", "not a JSON object"),
    (b"{", "not JSON"),
    (b'{"client_id": "a", "client_id": "' + URL.encode() + b'"}', "twice"),
    (b"\xff\xfe", "not JSON"),
])
def test_a_body_that_is_not_one_json_object_is_refused(body: bytes, words: str) -> None:
    with pytest.raises(ClientDocumentRefused) as caught:
        validate_document(URL, NAME, body)
    assert caught.value.reason == INVALID_DOCUMENT
    assert words in caught.value.description


def test_what_a_public_client_document_may_say() -> None:
    document = validate_document(URL, NAME, json.dumps(good_document(
        URL, token_endpoint_auth_method=None, grant_types=None, response_types=None,
        client_name="  ", jwks={"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}]},
        redirect_uris=["cursor://anysphere.cursor-mcp/oauth/callback", "http://[::1]:7/cb"],
    )).encode())
    assert document.client_name is None  # blank is no name
    assert document.redirect_uris == ("cursor://anysphere.cursor-mcp/oauth/callback",
                                      "http://[::1]:7/cb")
    extra = validate_document(URL, NAME, json.dumps(good_document(
        URL, grant_types=["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
    )).encode())  # a grant not offered here is not a reason to refuse the client
    assert extra.client_id == URL


# --- The URL -------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://client.example.test/c.json",
    "HTTPS://client.example.test/c.json",
    "https://client.example.test",
    "https://client.example.test/a/../c.json",
    "https://client.example.test/./c.json",
    "https://client.example.test/a/%2E%2e/c.json",
    "https://client.example.test/..",
    "https://user:pw@client.example.test/c.json",
    "https://user@client.example.test/c.json",
    "https://client.example.test/c.json#frag",
    "https://client.example.test/c.json#",
    "https://client.example.test/c json",
    "https://client.example.test/c\\json",
    "https://client.example.test/c\u00e9.json",
    "https://client.example.test/c.json\n",
    "https://client.example.test:99999/c.json",
    "https://client_example.test/c.json",
    "https://client.example.test./c.json",
    "https://127.1/c.json",
    "https://2130706433/c.json",
    "https:///c.json",
    "https://client.example.test/" + "a" * 2048,
])
def test_a_url_that_is_not_a_client_identifier_url_is_refused(url: str) -> None:
    with pytest.raises(ClientDocumentRefused) as caught:
        parse_client_id_url(url)
    assert caught.value.reason == INVALID_CLIENT_ID


@pytest.mark.parametrize("url", [
    "https://client.example.test/oauth/client.json",
    "https://client.example.test:8443/c?version=2",
    "https://client.example.test/",
    "https://Client.Example.test/c.json",
    "https://[2001:db8::1]/c.json",
    "https://203.0.113.9/c.json",
])
def test_client_identifier_urls(url: str) -> None:
    assert parse_client_id_url(url).path


def test_which_client_ids_are_meant_as_urls() -> None:
    assert is_client_id_url("https://vscode.dev/oauth/client-metadata.json")
    assert is_client_id_url("HTTPS://vscode.dev/x")  # then refused by resolve, not mistaken
    for value in ("my-static-client", "http://x/y", "", None, 7, "https:/x"):
        assert not is_client_id_url(value)


# --- SSRF: refused after resolution, before any connection ----------------------------------

NON_PUBLIC = [
    "10.0.0.1", "172.16.0.1", "192.168.1.1", "127.0.0.1", "127.255.0.9", "169.254.169.254",
    "100.64.0.1", "0.0.0.0", "0.1.2.3",  # noqa: S104 - an address refused, not bound
    "224.0.0.1", "239.255.255.250", "240.0.0.1",
    "255.255.255.255", "192.0.0.8", "192.0.2.1", "198.18.0.1", "198.51.100.1", "203.0.113.1",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:10.0.0.1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a00:1", "64:ff9b::7f00:1",
    "64:ff9b:1::1", "2002:a00:1::1", "2002:7f00:1::1", "::10.0.0.1", "2001:db8::1",
    "2001::1", "100::1",
]  # fmt: skip


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", [
    "93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::5db8:d822",
    "::ffff:93.184.216.34", "2002:5db8:d822::1",
])
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "127.0.0.1", "::1",
                                     "::ffff:10.0.0.1", "100.64.0.1", "64:ff9b::a00:1",
                                     "fe80::1", "0.0.0.0"])  # noqa: S104 - refused
async def test_a_name_resolving_to_a_non_public_address_is_refused_before_connecting(
    server: DocumentServer, rig_factory: Callable[..., Rig], address: str
) -> None:
    url = server.serve_client("/c.json")
    rig = rig_factory({NAME: [[address]]}, private=False)
    async with rig.documents.running() as documents:
        failure = await refused(documents, url)
    assert failure.reason == ADDRESS_NOT_ALLOWED
    assert address in failure.description
    assert rig.resolver.lookups == [NAME]  # resolved...
    assert rig.connections.attempts == []  # ...and refused before any connection
    assert server.total == 0


async def test_one_non_public_answer_among_public_ones_refuses_the_name(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.serve_client("/c.json")
    rig = rig_factory({NAME: [[PUBLIC_LOOKING, "127.0.0.1"]]}, private=False)
    async with rig.documents.running() as documents:
        assert (await refused(documents, url)).reason == ADDRESS_NOT_ALLOWED
    assert rig.connections.attempts == []
    assert server.total == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "169.254.169.254", "10.0.0.1",
                                  "[::ffff:127.0.0.1]"])
async def test_an_ip_address_as_host_is_refused_without_a_lookup(
    server: DocumentServer, rig_factory: Callable[..., Rig], host: str
) -> None:
    rig = rig_factory(private=False)
    async with rig.documents.running() as documents:
        failure = await refused(documents, f"https://{host}:{server.port}/c.json")
    assert failure.reason == ADDRESS_NOT_ALLOWED
    assert rig.resolver.lookups == []
    assert rig.connections.attempts == []
    assert server.total == 0


async def test_dns_rebinding_cannot_win_every_connection_is_checked(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    """The name answers a public-looking address first, then 127.0.0.1. There is no separate
    check lookup for a rebinding to slip behind: the one lookup of each connection is the one
    checked, so the first connection may only go to the first answer (the test's socket
    factory stops it there) and the second is refused before connecting."""
    url = server.serve_client("/c.json")
    rig = rig_factory({NAME: [[PUBLIC_LOOKING], ["127.0.0.1"]]}, private=False)
    async with rig.documents.running() as documents:
        first = await refused(documents, url)
        assert first.reason == UNREACHABLE
        assert rig.connections.attempts == [PUBLIC_LOOKING]
        rig.clock.now += 31  # past the negative cache
        second = await refused(documents, url)
    assert second.reason == ADDRESS_NOT_ALLOWED
    assert "127.0.0.1" in second.description
    assert rig.resolver.lookups == [NAME, NAME]  # one lookup per connection, no more
    assert rig.connections.attempts == [PUBLIC_LOOKING]
    assert server.total == 0


async def test_the_development_setting_allows_private_addresses_but_not_other_rules(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    """CIMD_ALLOW_PRIVATE_ADDRESSES=true opens addresses only: still https, still no
    redirect."""
    server.serve_client("/c.json")

    async def moved(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(server.url("/c.json"))
    server.handlers["/moved"] = moved
    rig = rig_factory(private=True)
    async with rig.documents.running() as documents:
        assert (await refused(documents, f"http://{NAME}:{server.port}/c.json")).reason == (
            INVALID_CLIENT_ID)
        failure = await refused(documents, server.url("/moved"))
    assert failure.reason == BAD_RESPONSE
    assert "redirect" in failure.description
    assert server.hits == {"/moved": 1}  # the target was never asked


# --- The answer: status, type, size, time, trust -------------------------------------------

def _raw(body: bytes, content_type: str = "application/json", status: int = 200,
         headers: dict[str, str] | None = None) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, headers={"Content-Type": content_type,
                                                               **(headers or {})})
    return handler


@pytest.mark.parametrize(("handler", "words"), [
    (_raw(b"{}", status=404), "HTTP 404"),
    (_raw(b"{}", status=500), "HTTP 500"),
    (_raw(b"{}", status=204), "HTTP 204"),
    (_raw(b"", status=304), "redirect"),
    (_raw(b"{}", status=307, headers={"Location": "/c.json"}), "redirect"),
    (_raw(b"{}", status=308, headers={"Location": "https://elsewhere.example/c.json"}),
     "redirect"),
    (_raw(b"{}", content_type="text/html"), "application/json"),
    (_raw(b"{}", content_type="text/plain"), "application/json"),
    (_raw(b"{}", headers={"Content-Encoding": "gzip"}), "compressed"),
])
async def test_an_answer_that_is_not_a_document_is_refused(
    server: DocumentServer, rig_factory: Callable[..., Rig], handler: Handler, words: str
) -> None:
    server.handlers["/c.json"] = handler
    rig = rig_factory()
    async with rig.documents.running() as documents:
        failure = await refused(documents, server.url("/c.json"))
    assert failure.reason == BAD_RESPONSE
    assert words in failure.description


async def test_an_ld_json_type_is_json(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.url("/c.json")
    server.handlers["/c.json"] = _raw(json.dumps(good_document(url)).encode(),
                                      content_type="application/ld+json; charset=utf-8")
    async with rig_factory().documents.running() as documents:
        assert (await asyncio.wait_for(documents.resolve(url), WAIT)).client_id == url


async def test_a_document_over_5_kib_is_refused_by_its_length_or_while_streaming(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    big = json.dumps(good_document(server.url("/long"), padding="x" * 5200)).encode()
    server.handlers["/long"] = _raw(big)
    streamed: list[int] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(64):  # 64 KiB offered; the reader stops after 5 KiB
            try:
                await response.write(b" " * 1024)
            except (ConnectionError, RuntimeError):
                break
            streamed.append(1)
        return response
    server.handlers["/stream"] = stream
    exactly = json.dumps(good_document(server.url("/exact"))).encode()
    server.handlers["/exact"] = _raw(exactly + b" " * (5 * 1024 - len(exactly)))
    rig = rig_factory()
    async with rig.documents.running() as documents:
        by_length = await refused(documents, server.url("/long"))
        by_stream = await refused(documents, server.url("/stream"))
        assert (await asyncio.wait_for(documents.resolve(server.url("/exact")), WAIT)).client_id
    for failure in (by_length, by_stream):
        assert failure.reason == BAD_RESPONSE
        assert "larger than 5120 bytes" in failure.description


async def test_a_slow_document_is_abandoned_at_the_timeout(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    never = asyncio.Event()

    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(never.wait(), WAIT)
        return web.Response(text="{}")
    server.handlers["/slow"] = slow
    rig = rig_factory(timeout=0.3)
    async with rig.documents.running() as documents:
        failure = await refused(documents, server.url("/slow"))
    assert failure.reason == UNREACHABLE
    assert "within 0.3 s" in failure.description
    assert server.hits == {"/slow": 1}


async def test_a_certificate_from_an_unknown_ca_is_refused(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    """Without CIMD_CA_FILE only the system's trust store counts: the test CA is not in it."""
    url = server.serve_client("/c.json")
    rig = rig_factory(config={"ca_file": ""})
    async with rig.documents.running() as documents:
        failure = await refused(documents, url)
    assert failure.reason == UNREACHABLE
    assert "certificate" in failure.description
    assert server.total == 0  # the handshake failed: no request was sent


async def test_an_injected_ssl_context_is_used(
    server: DocumentServer, rig_factory: Callable[..., Rig], pki: Pki
) -> None:
    url = server.serve_client("/c.json")
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    rig = rig_factory(config={"ca_file": ""}, ssl_context=context)
    async with rig.documents.running() as documents:
        assert (await asyncio.wait_for(documents.resolve(url), WAIT)).client_id == url


async def test_a_name_that_does_not_resolve_is_unreachable(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    rig = rig_factory({})
    async with rig.documents.running() as documents:
        failure = await refused(documents, server.url("/c.json"))
    assert failure.reason == UNREACHABLE
    assert rig.connections.attempts == []


# --- Cache and coalescing ------------------------------------------------------------------

async def test_a_document_is_fetched_once_and_kept_for_its_max_age(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.serve_client("/c.json", Cache_Control="public, max-age=300")
    rig = rig_factory()
    async with rig.documents.running() as documents:
        first = await asyncio.wait_for(documents.resolve(url), WAIT)
        rig.clock.now += 299
        assert await asyncio.wait_for(documents.resolve(url), WAIT) is first
        assert server.total == 1
        rig.clock.now += 2
        await asyncio.wait_for(documents.resolve(url), WAIT)
    assert server.total == 2
    assert rig.documents.fetches == 2


@pytest.mark.parametrize(("headers", "kept"), [
    ({"Cache-Control": "max-age=5"}, 60),  # raised to the least
    ({"Cache-Control": "no-store"}, 60),
    ({"Cache-Control": "no-cache, max-age=600"}, 60),
    ({"Cache-Control": "max-age=999999999"}, 86400),  # lowered to a day
    ({"Date": "Sun, 06 Dec 2026 10:00:00 GMT", "Expires": "Sun, 06 Dec 2026 10:20:00 GMT"}, 1200),
    ({"Expires": "0"}, 60),  # invalid: already expired
    ({}, 600),
])
async def test_the_lifetime_follows_the_caching_headers_within_bounds(
    server: DocumentServer, rig_factory: Callable[..., Rig], headers: dict[str, str], kept: int
) -> None:
    url = server.url("/c.json")
    server.handlers["/c.json"] = _raw(json.dumps(good_document(url)).encode(), headers=headers)
    rig = rig_factory()
    async with rig.documents.running() as documents:
        await asyncio.wait_for(documents.resolve(url), WAIT)
        rig.clock.now += kept - 1
        await asyncio.wait_for(documents.resolve(url), WAIT)
        assert server.total == 1
        rig.clock.now += 2
        await asyncio.wait_for(documents.resolve(url), WAIT)
    assert server.total == 2


async def test_a_refusal_is_remembered_briefly(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    rig = rig_factory()
    async with rig.documents.running() as documents:
        url = server.url("/missing")
        assert (await refused(documents, url)).reason == BAD_RESPONSE
        rig.clock.now += 29
        assert (await refused(documents, url)).description.endswith("HTTP 404, not 200")
        assert server.total == 1
        server.serve_client("/missing")
        rig.clock.now += 2
        assert (await asyncio.wait_for(documents.resolve(url), WAIT)).client_id == url
    assert server.total == 2


async def test_concurrent_resolves_of_one_url_share_one_fetch(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.url("/c.json")
    gate = asyncio.Event()
    body = json.dumps(good_document(url)).encode()

    arrived = asyncio.Event()

    async def held(_: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.wait_for(gate.wait(), WAIT)
        return web.Response(body=body, content_type="application/json")
    server.handlers["/c.json"] = held
    rig = rig_factory()
    async with rig.documents.running() as documents:
        waiters = [asyncio.create_task(documents.resolve(url)) for _ in range(20)]
        await asyncio.wait_for(arrived.wait(), WAIT)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
    assert {id(result) for result in results} == {id(results[0])}
    assert server.total == 1
    assert rig.documents.fetches == 1
    assert rig.resolver.lookups == [NAME]


async def test_a_cancelled_resolve_leaves_the_shared_fetch_running(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.url("/c.json")
    gate = asyncio.Event()
    body = json.dumps(good_document(url)).encode()

    arrived = asyncio.Event()

    async def held(_: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.wait_for(gate.wait(), WAIT)
        return web.Response(body=body, content_type="application/json")
    server.handlers["/c.json"] = held
    rig = rig_factory()
    async with rig.documents.running() as documents:
        first = asyncio.create_task(documents.resolve(url))
        second = asyncio.create_task(documents.resolve(url))
        await asyncio.wait_for(arrived.wait(), WAIT)
        first.cancel()
        gate.set()
        assert (await asyncio.wait_for(second, WAIT)).client_id == url
        assert (await asyncio.wait_for(documents.resolve(url), WAIT)).client_id == url
    assert first.cancelled()
    assert server.total == 1


async def test_the_cache_is_bounded_in_entries_and_bytes(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    urls = [server.serve_client(f"/c{n}.json") for n in range(4)]
    rig = rig_factory(max_entries=2)
    async with rig.documents.running() as documents:
        for url in urls:
            await asyncio.wait_for(documents.resolve(url), WAIT)
        await asyncio.wait_for(documents.resolve(urls[3]), WAIT)  # kept
        await asyncio.wait_for(documents.resolve(urls[0]), WAIT)  # evicted: fetched again
    assert server.hits == {"/c0.json": 2, "/c1.json": 1, "/c2.json": 1, "/c3.json": 1}
    small = rig_factory(max_cache_bytes=100)  # no document fits: each resolve fetches
    async with small.documents.running() as documents:
        for _ in range(2):
            await asyncio.wait_for(documents.resolve(urls[0]), WAIT)
    assert server.hits["/c0.json"] == 4


async def test_with_cimd_off_nothing_is_fetched(
    server: DocumentServer, rig_factory: Callable[..., Rig]
) -> None:
    url = server.serve_client("/c.json")
    rig = rig_factory(config={"enabled": False})
    async with rig.documents.running() as documents:
        assert (await refused(documents, url)).reason == DISABLED
    assert rig.resolver.lookups == []
    assert server.total == 0


async def test_resolve_outside_running_is_a_programming_error(
    rig_factory: Callable[..., Rig]
) -> None:
    with pytest.raises(RuntimeError):
        await rig_factory().documents.resolve(URL)


# --- Configuration -------------------------------------------------------------------------

BASE = {
    "OIDC_ISSUER_URL": "https://idp.example.test/realms/demo",
    "OIDC_AUDIENCE": "https://mcp.example.test/mcp",
    "RESOURCE_URL": "https://mcp.example.test/mcp",
    "MCP_UPSTREAM_URL": "http://127.0.0.1:9000",
    "ALLOW_SUBS": "user-1",
    "STATIC_CLIENT_ID": "sidecar",
    "STATE_SECRET": "x" * 32,
}


def test_cimd_defaults() -> None:
    config = load(BASE).auth_server.client_documents
    assert config == ClientDocumentsConfig(
        enabled=True, allowed_hosts=frozenset(),
        trusted_hosts=frozenset({"claude.ai", "claude.com", "vscode.dev", "chatgpt.com"}),
        allow_private_addresses=False, ca_file="")


def test_cimd_variables_are_read(pki: Pki) -> None:
    config = load({**BASE, "CIMD": "off", "CIMD_ALLOWED_HOSTS": "claude.ai, vscode.dev",
                   "CIMD_TRUSTED_HOSTS": "", "CIMD_CA_FILE": str(pki.ca_file)})
    documents = config.auth_server.client_documents
    assert not documents.enabled
    assert documents.allowed_hosts == frozenset({"claude.ai", "vscode.dev"})
    assert documents.trusted_hosts == frozenset({"claude.ai", "claude.com", "vscode.dev",
                                                 "chatgpt.com"})  # empty means the default
    assert documents.ca_file == str(pki.ca_file)
    assert config.warnings == ()
    none_trusted = load({**BASE, "CIMD_TRUSTED_HOSTS": "none"})
    assert none_trusted.auth_server.client_documents.trusted_hosts == frozenset()
    one = load({**BASE, "CIMD_TRUSTED_HOSTS": "client.example.com"})
    assert one.auth_server.client_documents.trusted_hosts == {"client.example.com"}


def test_the_development_setting_warns() -> None:
    config = load({**BASE, "CIMD_ALLOW_PRIVATE_ADDRESSES": "true"})
    assert config.auth_server.client_documents.allow_private_addresses
    assert any("CIMD_ALLOW_PRIVATE_ADDRESSES=true" in w for w in config.warnings)


def test_every_bad_cimd_value_is_a_problem(tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(ConfigError) as caught:
        load({**BASE, "CIMD": "maybe",
              "CIMD_ALLOWED_HOSTS": "https://claude.ai,Claude.com,*.example.com,10.0.0.1,a.b.",
              "CIMD_TRUSTED_HOSTS": "vscode.dev:443", "CIMD_ALLOW_PRIVATE_ADDRESSES": "perhaps",
              "CIMD_CA_FILE": str(not_pem)})
    problems = "\n".join(caught.value.problems)
    for expected in ("CIMD='maybe' is not on or off",
                     "'https://claude.ai' is not a bare host name",
                     "'Claude.com' must be lowercase (claude.com)",
                     "'*.example.com' is not a DNS host name",
                     "'10.0.0.1' is not a DNS host name",
                     "'a.b.' is not a DNS host name",
                     "CIMD_TRUSTED_HOSTS entry 'vscode.dev:443' is not a bare host name",
                     "CIMD_ALLOW_PRIVATE_ADDRESSES='perhaps'",
                     f"CIMD_CA_FILE {not_pem} holds no PEM certificate"):
        assert expected in problems
    with pytest.raises(ConfigError) as missing:
        load({**BASE, "CIMD_CA_FILE": str(tmp_path / "absent.pem")})
    assert "CIMD_CA_FILE" in missing.value.problems[0]
    assert "cannot be read" in (
        missing.value.problems[0])


def test_a_misspelled_cimd_variable_gets_a_hint() -> None:
    config = load({**BASE, "CIMD_ALLOWED_HOST": "claude.ai"})
    assert any("did you mean CIMD_ALLOWED_HOSTS" in w for w in config.warnings)
