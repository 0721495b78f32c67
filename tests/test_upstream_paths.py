"""upstream_paths: the path map both ways, and the rewriting of the URLs an upstream names."""

from __future__ import annotations

import itertools

import pytest

from oauth_sidecar.upstream.paths import LocationRewriter, PathMap

# (RESOURCE_URL's path, MCP_UPSTREAM_PATH) as config.load leaves them.
LAYOUTS = [("/mcp", ""), ("/mcp", "/inner"), ("", "/mcp"), ("", ""), ("/mcp", "/mcp"),
           ("/a/b", "/c")]
PATHS = ["/", "/mcp", "/mcp/", "/mcp/x", "/mcpx", "/inner", "/inner/x/y", "/innerx", "/other",
         "/a/b", "/a/b/x", "/a/bc", "/c", "/c/x", "/cx", "//mcp", "/x/mcp"]


@pytest.mark.parametrize(("resource", "prefix"), LAYOUTS)
def test_public_path_is_the_inverse_of_the_upstream_map(resource: str, prefix: str) -> None:
    """Going up from the public path given back reaches the same upstream path; no public path
    reaches an upstream path given back as None."""
    paths = PathMap(resource, prefix)
    upstream_paths = {paths.upstream(q) for q in PATHS} | set(PATHS)
    for path in upstream_paths:
        public = paths.public(path)
        if public is None:
            assert all(paths.upstream(q) != path for q in PATHS), (path, resource, prefix)
        else:
            assert paths.upstream(public) == path, (path, public, resource, prefix)


UPSTREAM = "http://127.0.0.1:3000"
PUBLIC = "https://mcp.example.test"


def rewriter(resource: str = "/mcp", prefix: str = "/inner",
             upstream: str = UPSTREAM) -> LocationRewriter:
    return LocationRewriter(PathMap(resource, prefix), upstream, PUBLIC)


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param(f"{UPSTREAM}/inner/x?y=1#f", f"{PUBLIC}/mcp/x?y=1#f", id="upstream_url_mapped"),
    pytest.param(f"{UPSTREAM}/inner", f"{PUBLIC}/mcp", id="upstream_path_itself"),
    pytest.param(UPSTREAM, f"{PUBLIC}/", id="origin_alone"),
    pytest.param(f"{UPSTREAM}?q=1", f"{PUBLIC}/?q=1", id="origin_with_query"),
    pytest.param(f"{UPSTREAM}/other", f"{PUBLIC}/other", id="path_outside_both"),
    pytest.param(f"{UPSTREAM}/mcp/x", None, id="no_public_path_reaches_it"),
    pytest.param("/inner/x?y=1", "/mcp/x?y=1", id="absolute_path_mapped"),
    pytest.param("/mcp/x", None, id="absolute_path_without_public_form"),
    pytest.param("/other#top", "/other#top", id="absolute_path_outside_both"),
    pytest.param("x/y", "x/y", id="relative_path"),
    pytest.param("../x", "../x", id="dot_dot_relative_path"),
    pytest.param("?page=2", "?page=2", id="query_only"),
    pytest.param("https://elsewhere.example/inner/x", "https://elsewhere.example/inner/x",
                 id="another_origin"),
    pytest.param("HTTP://127.0.0.1:3000/inner/x", f"{PUBLIC}/mcp/x", id="scheme_case"),
    pytest.param("//127.0.0.1:3000/inner/x", f"{PUBLIC}/mcp/x", id="network_path_reference"),
    pytest.param("http://user:pw@127.0.0.1:3000/inner", f"{PUBLIC}/mcp", id="userinfo_dropped"),
    pytest.param("http://localhost:3000/inner/x", f"{PUBLIC}/mcp/x", id="loopback_alias"),
    pytest.param("http://[::1]:3000/inner/x", f"{PUBLIC}/mcp/x", id="ipv6_loopback_alias"),
    pytest.param("http://127.0.0.1:3001/inner/x", "http://127.0.0.1:3001/inner/x",
                 id="another_port_is_another_origin"),
    pytest.param("https://127.0.0.1:3000/inner/x", "https://127.0.0.1:3000/inner/x",
                 id="another_scheme_is_another_origin"),
    pytest.param("http://127.0.0.1:3000@evil.example/inner", "http://127.0.0.1:3000@evil.example/inner",
                 id="userinfo_naming_the_upstream_is_another_origin"),
    pytest.param("http://[::1/x", "http://[::1/x", id="unparseable_passes"),
    pytest.param("urn:example:x", "urn:example:x", id="no_authority"),
])
def test_locations_are_given_back_under_the_public_origin(value: str, expected: str | None) -> None:
    assert rewriter().rewrite(value) == expected


def test_without_a_path_prefix_only_the_origin_changes() -> None:
    plain = rewriter(prefix="")
    assert plain.rewrite(f"{UPSTREAM}/mcp/x?y") == f"{PUBLIC}/mcp/x?y"
    assert plain.rewrite("/anything") == "/anything"


def test_origin_only_resource_maps_the_upstream_path_to_the_root() -> None:
    root = rewriter(resource="", prefix="/mcp")
    assert root.rewrite(f"{UPSTREAM}/mcp") == f"{PUBLIC}/"
    assert root.rewrite(f"{UPSTREAM}/mcp/x") == f"{PUBLIC}/x"
    assert root.rewrite("/mcp/x") == "/x"
    assert root.rewrite(f"{UPSTREAM}/other") is None  # every public path goes under /mcp


@pytest.mark.parametrize(("upstream", "value", "rewritten"), [
    ("http://mcp-server:8000", "http://MCP-SERVER:8000/inner", True),
    ("http://mcp-server:8000", "http://mcp-server/inner", False),  # port 80: another origin
    ("http://mcp-server", "http://mcp-server:80/inner", True),
    ("https://mcp-server", "https://mcp-server:443/inner", True),
    ("http://mcp-server:8000", "http://localhost:8000/inner", False),  # not a loopback upstream
    ("http://[::1]:9000", "http://127.0.0.1:9000/inner", True),
    ("http://127.0.0.2:9000", "http://127.0.0.2:9000/inner", True),
    ("http://127.0.0.2:9000", "http://localhost:9000/inner", True),
])
def test_the_upstream_origin_is_compared_by_scheme_host_and_port(
    upstream: str, value: str, rewritten: bool
) -> None:
    result = rewriter(upstream=upstream).rewrite(value)
    assert (result == f"{PUBLIC}/mcp") is rewritten, result


def test_rewriting_never_yields_an_upstream_address() -> None:
    """Whatever the upstream says about itself, the answer names the public origin or nothing."""
    pieces = ["", "/", "/inner", "/inner/", "/mcp", "/mcp/x", "/other", "?q", "#f"]
    for layout, origin, path, tail in itertools.product(
            [("/mcp", "/inner"), ("", "/inner"), ("/mcp", "")],
            [UPSTREAM, "http://localhost:3000", "//127.0.0.1:3000", "HTTP://127.0.0.1:3000"],
            pieces, ["", "?a=1", "#x"]):
        result = rewriter(*layout).rewrite(origin + path + tail)
        assert result is None or result.startswith(PUBLIC), (layout, origin + path + tail, result)
