"""The deployment examples stay deployable: Dockerfile, Kubernetes manifests, compose file.

Why: examples rot silently. A misspelt field is dropped by some tools and rejected by others; a
variable the sidecar renamed makes a copied manifest start with the wrong setting, or not at all.
So every file is checked twice. First against the real schemas, offline: the Kubernetes objects
with kubernetes-validate's bundled JSON schemas in strict mode (unknown fields are errors), the
compose file with the compose-spec schema vendored by check-jsonschema. (`kubectl --dry-run=client`
cannot do this here: it downloads the schema from a cluster's API server.) Then against what a
schema cannot know, by checkers that return the problems they find: every variable is one the
sidecar knows, the sidecar's environment passes its own configuration check (with every
ALLOW_*_FILE holding what the pod would see there: the mounted ConfigMap key, or the bind-mounted
file; a spawned server's program standing in for the image's and MCP_SPAWN_WORKDIR_ROOT for the
pod's volume), probes hit /healthz and /readyz on the sidecar's port, only the sidecar's `http`
port is exposed, the upstream is on the pod's loopback (or stdio children of the sidecar's own),
the grace period covers the drain and the children's stop, the metrics port is reachable by
Prometheus but by no Service, Ingress or published port, secrets come from the Secret, every
container runs as non-root with nothing to escalate.
Each checker, and each validator, is shown to reject a deliberately broken copy, so none of these
tests can pass by checking nothing. The image's HEALTHCHECK command itself is run against a real
sidecar.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shlex
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from conftest import FakeIdp, FakeUpstream, sidecar_env
from kubernetes_validate.utils import ValidationError, latest_version, validate
from processes import PROCESS_TIMEOUT, REPO, free_port, sidecar_process, stop_process, wait_ready

from oauth_sidecar.config import (
    ALLOW_LISTS,
    VARIABLES,
    Config,
    ConfigError,
    is_loopback_host,
    load,
)

Doc = dict[str, Any]

EXAMPLES = REPO / "examples"
MANIFESTS = sorted((EXAMPLES / "kubernetes").glob("*.yaml"))
COMPOSE = EXAMPLES / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
# The oldest Kubernetes the manifests are for (the preStop `sleep` action is 1.30) and the newest
# whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", latest_version())
SIDECAR = "oauth-sidecar"  # the sidecar's container (Kubernetes) and service (compose) name
# Variables of the other containers in the examples. The MCP server is a placeholder: what it
# reads is its own business, but the examples must not hand it anything of the sidecar's.
OTHER_CONTAINERS_ENV = {"mcp-server": frozenset({"HOST", "PORT"}), "redis": frozenset()}
# Never in a ConfigMap, an inline value or a compose `environment`: from a Secret or .env only.
SECRET_VARIABLES = frozenset({"STATIC_CLIENT_SECRET", "STATE_SECRET"})
PLACEHOLDER = "REPLACE_ME"  # the example Secrets' values
SUBSTITUTE = "0123456789abcdef" * 4  # what a user puts there (openssl rand -hex 32)
CONTEXT_SOURCES = frozenset({"pyproject.toml", "README.md", "oauth_sidecar"})
RUNTIME_ENV = frozenset({"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"})
ALLOW_FILE_VARIABLES = {f"{name}_FILE": kind for kind, name in ALLOW_LISTS.items()}
SIDECAR_CONFIG_MAP = "mcp-oauth-sidecar"  # the Kubernetes examples' settings (envFrom)
# The scrape-by-annotation convention (not Kubernetes API, so no schema checks these).
# Where the metrics listener must bind for Prometheus to reach it from outside the pod.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a bind address compared, not bound here
SCRAPE_ANNOTATIONS = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")


def load_yaml(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def inside(path: str, directory: str) -> str | None:
    """path relative to directory ("." for the directory itself), or None if not inside it."""
    p, d = PurePosixPath(path), PurePosixPath(directory)
    return p.relative_to(d).as_posix() if p.is_relative_to(d) else None


def allow_file_entries(text: str) -> set[str]:
    """The entries of an allow-list file, parsed here independently of oauth_sidecar (emails)."""
    entries = (e.strip().lower() for line in text.splitlines()
               for e in line.partition("#")[0].split(","))
    return {e for e in entries if e}


def with_allow_files(env: dict[str, str], contents: dict[str, str], into: Path) -> dict[str, str]:
    """env with each ALLOW_*_FILE in contents pointing at a file under `into` holding its text."""
    env = dict(env)
    for name, text in contents.items():
        path = into / f"{name.lower()}.txt"
        path.write_text(text, encoding="utf-8")
        env[name] = str(path)
    return env


def metrics_problems(config: Config) -> list[str]:
    if config.metrics is None:
        return ["METRICS_PORT is not set: the examples show the metrics listener"]
    if config.metrics.host != ALL_INTERFACES:
        return [f"METRICS_HOST={config.metrics.host}: Prometheus outside the sidecar's network "
                "namespace cannot reach it (use 0.0.0.0)"]
    return []


# -- the Dockerfile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage (stage 0: the ARGs before the first FROM)."""
    stages: list[list[Instruction]] = [[]]
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments, also inside a continued instruction, are dropped
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, value = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), value.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return stages


def healthcheck_argv(stage: list[Instruction]) -> list[str]:
    found = [i.value for i in stage if i.keyword == "HEALTHCHECK"]
    assert len(found) == 1, "one HEALTHCHECK in the final stage"
    _, cmd, argv = found[0].partition(" CMD ")
    assert cmd, "HEALTHCHECK ... CMD [...] (not NONE)"
    parsed = json.loads(argv)
    assert isinstance(parsed, list)
    return [str(arg) for arg in parsed]


def dockerfile_problems(text: str) -> list[str]:  # noqa: PLR0912 (one check per Dockerfile rule)
    problems: list[str] = []
    stages = parse_dockerfile(text)
    if len(stages) < 3:
        return ["not a multi-stage build (a build stage and a runtime stage)"]
    final = stages[-1]

    def last(keyword: str) -> str | None:
        values = [i.value for i in final if i.keyword == keyword]
        return values[-1] if values else None

    user = last("USER")
    uid, _, gid = (user or "").partition(":")
    if not uid.isdigit() or int(uid) == 0 or (gid and (not gid.isdigit() or int(gid) == 0)):
        problems.append(f"USER of the final stage is {user!r}: use a numeric non-root uid:gid")
    entrypoint = json.loads(last("ENTRYPOINT") or "null")
    if entrypoint != ["tini", "--", SIDECAR]:
        problems.append(f"ENTRYPOINT is {entrypoint!r}: run the sidecar under tini (exec form)")
    if not any(i.keyword == "RUN" and re.search(r"apt-get install .*\btini\b", i.value)
               for i in final):
        problems.append("the final stage does not install tini")
    try:
        argv = healthcheck_argv(final)
        if not any("/healthz" in arg for arg in argv):
            problems.append("HEALTHCHECK does not ask /healthz")
    except (AssertionError, ValueError) as exc:
        problems.append(f"HEALTHCHECK: {exc}")
    if last("STOPSIGNAL") != "SIGTERM":
        problems.append("STOPSIGNAL is not SIGTERM")
    if last("EXPOSE") != VARIABLES["PORT"][0]:
        problems.append(f"EXPOSE is not the default PORT {VARIABLES['PORT'][0]}")
    for stage in stages:
        for instruction in stage:
            if instruction.keyword == "ENV":
                for item in shlex.split(instruction.value):
                    name = item.partition("=")[0]
                    if name in VARIABLES or (
                        name not in RUNTIME_ENV and not name.startswith("PYTHON")
                    ):
                        problems.append(f"ENV {name}: configuration comes from the environment "
                                        "at run time, never from the image")
            if instruction.keyword in ("COPY", "ADD"):
                words = shlex.split(instruction.value)
                flags = [w for w in words if w.startswith("--")]
                sources = [w for w in words if not w.startswith("--")][:-1]
                if instruction.keyword == "ADD":
                    problems.append("ADD: use COPY")
                elif stage is final and flags != ["--from=build"]:
                    problems.append(f"the final stage copies {sources} from the build context: "
                                    "only the build stage's result belongs there")
                elif not flags and not set(sources) <= CONTEXT_SOURCES:
                    problems.append(f"COPY {sources}: only {sorted(CONTEXT_SOURCES)} are needed")
    if not any(i.keyword == "RUN" and "[uvloop]" in i.value for i in stages[-2]):
        problems.append("the build stage does not install the uvloop extra")
    return problems


def test_dockerfile_is_small_non_root_init_reaped_and_configuration_free() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


DOCKERFILE_BREAKAGES = {
    "root user": ("USER 10001:10001", "USER root", "USER"),
    "uid 0": ("USER 10001:10001", "USER 0:0", "USER"),
    "no init": ('["tini", "--", "oauth-sidecar"]', '["oauth-sidecar"]', "ENTRYPOINT"),
    "config baked in": ("ENV PATH=", "ENV OIDC_AUDIENCE=mcp PATH=", "ENV OIDC_AUDIENCE"),
    "a secret baked in": ("ENV PATH=", "ENV STATE_SECRET=x PATH=", "ENV STATE_SECRET"),
    "whole context": ("COPY oauth_sidecar ./oauth_sidecar", "COPY . .", "COPY ['.']"),
    "sources in the image": ("COPY --from=build /opt/venv /opt/venv", "COPY . /app",
                             "final stage copies"),
    "no healthcheck": ("HEALTHCHECK --interval", "# HEALTHCHECK --interval", "HEALTHCHECK"),
    "wrong stop signal": ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL", "STOPSIGNAL"),
    "no uvloop": ("[uvloop]", "", "uvloop"),
}


@pytest.mark.parametrize("breakage", sorted(DOCKERFILE_BREAKAGES))
def test_dockerfile_check_rejects_a_broken_copy(breakage: str) -> None:
    old, new, expected = DOCKERFILE_BREAKAGES[breakage]
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new))
    assert any(expected in problem for problem in problems), problems


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    for line in patterns:
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex = "".join(
            ".*" if token == "**" else "[^/]*" if token == "*" else "[^/]" if token == "?"
            else re.escape(token)
            for token in re.split(r"(\*\*|\*|\?)", pattern) if token
        )
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in (REPO / ".dockerignore").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_keeps_secrets_and_bulk_out_and_what_the_build_needs_in() -> None:
    patterns = dockerignore_patterns()
    for path in (".env", ".git/HEAD", ".venv/bin/python", "tests/test_app.py", "bench/run.py",
                 "tests/oidc/node_modules/oidc-provider/package.json",
                 "oauth_sidecar/__pycache__/app.cpython-311.pyc"):
        assert dockerignore_excludes(patterns, path), path
    package = [p.relative_to(REPO).as_posix() for p in (REPO / "oauth_sidecar").glob("*.py")]
    assert len(package) > 10
    for path in ["pyproject.toml", "README.md", *package]:
        assert not dockerignore_excludes(patterns, path), path
    # The matcher itself: a re-included file, and a pattern for a directory's contents.
    assert not dockerignore_excludes(["*", "!a/b"], "a/b/c")
    assert dockerignore_excludes(["**/node_modules"], "x/y/node_modules/z")


def test_the_build_context_holds_what_pyproject_builds_from() -> None:
    """pyproject.toml's readme and packages are exactly the Dockerfile's COPY sources."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed == CONTEXT_SOURCES
    assert "license-files" not in project["project"]  # it would be another file to COPY


async def run_healthcheck(argv: list[str], port: int) -> int:
    """The image's HEALTHCHECK command with this interpreter as its `python`."""
    assert argv[0] == "python"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv[1:], env={"PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        return await asyncio.wait_for(proc.wait(), PROCESS_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
async def test_healthcheck_command_passes_on_a_running_sidecar_and_fails_without_one(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    argv = healthcheck_argv(parse_dockerfile(DOCKERFILE.read_text())[-1])
    port = free_port()
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port))
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT, sock_connect=1)
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, f"http://127.0.0.1:{port}", proc)
        assert await run_healthcheck(argv, port) == 0
        await stop_process(proc)
    assert await run_healthcheck(argv, port) != 0  # nothing listens there any more


# -- Kubernetes ----------------------------------------------------------------------------------


def check_kubernetes_schema(doc: Doc, version: str) -> None:
    """Raises ValidationError (or SchemaNotFoundError for a kind it has no schema for)."""
    validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = load_yaml(path)
    assert len(docs) >= 4
    for doc in docs:
        check_kubernetes_schema(doc, version)


def _sidecar_deployment(docs: list[Doc]) -> Doc:
    return next(d for d in docs if d["kind"] == "Deployment" and any(
        c["name"] == SIDECAR for c in d["spec"]["template"]["spec"]["containers"]))


def _sidecar_container(docs: list[Doc]) -> Doc:
    pod = _sidecar_deployment(docs)["spec"]["template"]["spec"]
    container: Doc = next(c for c in pod["containers"] if c["name"] == SIDECAR)
    return container


def _break_probe_field(docs: list[Doc]) -> None:
    container = _sidecar_container(docs)
    container["livenessProbes"] = container.pop("livenessProbe")


def _break_replicas(docs: list[Doc]) -> None:
    _sidecar_deployment(docs)["spec"]["replicas"] = "three"


def _break_selector(docs: list[Doc]) -> None:
    del _sidecar_deployment(docs)["spec"]["selector"]


def _break_port(docs: list[Doc]) -> None:
    _sidecar_container(docs)["ports"][0]["containerPort"] = "http"


SCHEMA_BREAKAGES: dict[str, Callable[[list[Doc]], object]] = {
    "misspelt field": _break_probe_field, "wrong type": _break_replicas,
    "missing required field": _break_selector, "port as a name": _break_port,
}


@pytest.mark.parametrize("breakage", sorted(SCHEMA_BREAKAGES))
def test_kubernetes_schema_check_rejects_a_broken_copy(breakage: str) -> None:
    docs = load_yaml(EXAMPLES / "kubernetes" / "deployment.yaml")
    SCHEMA_BREAKAGES[breakage](docs)
    with pytest.raises(ValidationError):
        check_kubernetes_schema(_sidecar_deployment(docs), KUBERNETES_VERSIONS[-1])


def _named(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def kubernetes_sidecar_env(
    docs: list[Doc], *, substitute: bool
) -> tuple[dict[str, str], list[str]]:
    """The sidecar container's environment as Kubernetes would build it, and its problems."""
    problems: list[str] = []
    env: dict[str, str] = {}
    container = _sidecar_container(docs)

    def secret_value(ref: Doc, name: str) -> str:
        secret = _named(docs, "Secret", ref["name"])
        data = (secret or {}).get("stringData", {})
        if ref["key"] not in data:
            problems.append(f"{name}: Secret {ref['name']} has no key {ref['key']}")
            return ""
        value = str(data[ref["key"]])
        return SUBSTITUTE if substitute and value == PLACEHOLDER else value

    for source in container.get("envFrom", []):
        config_map = _named(docs, "ConfigMap", source["configMapRef"]["name"])
        if config_map is None:
            problems.append(f"envFrom: no ConfigMap {source['configMapRef']['name']}")
            continue
        for name, value in config_map.get("data", {}).items():
            if name in SECRET_VARIABLES:
                problems.append(f"{name} is in ConfigMap {source['configMapRef']['name']}: "
                                "secrets come from a Secret")
            env[name] = str(value)
    for item in container.get("env", []):
        name = item["name"]
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            env[name] = secret_value(ref, name)
        else:
            if name in SECRET_VARIABLES:
                problems.append(f"{name} has an inline value: use a secretKeyRef")
            env[name] = str(item.get("value", ""))
    for name in sorted(set(env) - set(VARIABLES)):
        problems.append(f"{name} is not a variable oauth_sidecar knows")
    return env, problems


def kubernetes_allow_files(docs: list[Doc], env: dict[str, str]) -> tuple[dict[str, str],
                                                                          list[str]]:
    """What each ALLOW_*_FILE holds in the pod (the ConfigMap key mounted there), and problems."""
    problems: list[str] = []
    contents: dict[str, str] = {}
    pod = _sidecar_deployment(docs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = _sidecar_container(docs).get("volumeMounts", [])
    for name in ALLOW_FILE_VARIABLES:
        path = env.get(name)
        if not path:
            continue
        found = [(m, rel) for m in mounts if (rel := inside(path, m["mountPath"])) is not None]
        if not found:
            problems.append(f"{name}={path} is not in a volume mounted into the sidecar")
            continue
        mount, relative = max(found, key=lambda f: len(f[0]["mountPath"]))
        volume_name = mount["name"]
        if "subPath" in mount or "subPathExpr" in mount:
            problems.append(f"{name}: volume {volume_name} is mounted with subPath, which never "
                            "sees ConfigMap updates: mount the directory")
            relative = mount.get("subPath", relative)
        if mount.get("readOnly") is not True:
            problems.append(f"{name}: volume {volume_name} is not mounted readOnly")
        source = volumes.get(volume_name, {}).get("configMap")
        if source is None:
            problems.append(f"{name}: volume {volume_name} is not a configMap volume")
            continue
        config_map = _named(docs, "ConfigMap", source["name"])
        if config_map is None:
            problems.append(f"{name}: no ConfigMap {source['name']}")
            continue
        data = config_map.get("data", {})
        keys = ({item["path"]: item["key"] for item in source["items"]} if "items" in source
                else {key: key for key in data})
        key = keys.get(relative)
        if key not in data:
            problems.append(f"{name}={path}: ConfigMap {source['name']} has no key {relative}")
            continue
        if not allow_file_entries(data[key]):
            problems.append(f"{name}: ConfigMap {source['name']} key {key} has no entry: show "
                            "the format")
        contents[name] = str(data[key])
    return contents, problems


def kubernetes_spawn_env(docs: list[Doc], env: dict[str, str], into: Path) -> tuple[
        dict[str, str], list[str]]:
    """env with what a spawned MCP server needs from the image and the pod standing in here: its
    program (a bare name: an executable of that name under `into`, the only PATH), and
    MCP_SPAWN_WORKDIR_ROOT (a directory under `into`), which must be a writable volume mounted
    into the sidecar, as the root file system is read-only; and the problems."""
    env, problems = dict(env), []
    command = env.get("MCP_SPAWN_CMD", "")
    try:
        argv = json.loads(command) if command.startswith("[") else shlex.split(command)
    except ValueError:
        argv = []  # load() says why
    if argv and isinstance(argv[0], str) and "/" not in argv[0]:
        program = into / "image-bin" / argv[0]
        program.parent.mkdir(exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
        env["PATH"] = str(program.parent)
    root = env.get("MCP_SPAWN_WORKDIR_ROOT")
    if root:
        mounts = [m for m in _sidecar_container(docs).get("volumeMounts", [])
                  if inside(root, m["mountPath"]) is not None]
        if not mounts:
            problems.append(f"MCP_SPAWN_WORKDIR_ROOT={root} is not in a volume mounted into the "
                            "sidecar (the root file system is read-only)")
        elif max(mounts, key=lambda m: len(m["mountPath"])).get("readOnly") is True:
            problems.append(f"MCP_SPAWN_WORKDIR_ROOT={root} is on a volume mounted readOnly")
        (into / "workdir-root").mkdir(exist_ok=True)
        env["MCP_SPAWN_WORKDIR_ROOT"] = str(into / "workdir-root")
    return env, problems


def kubernetes_config_env(
    docs: list[Doc], into: Path, *, substitute: bool
) -> tuple[dict[str, str], list[str]]:
    """kubernetes_sidecar_env with each ALLOW_*_FILE's ConfigMap data copied to a file in into,
    and a spawned server's program and working directories (kubernetes_spawn_env) there."""
    env, problems = kubernetes_sidecar_env(docs, substitute=substitute)
    contents, file_problems = kubernetes_allow_files(docs, env)
    env, spawn_problems = kubernetes_spawn_env(docs, with_allow_files(env, contents, into), into)
    return env, problems + file_problems + spawn_problems


def _kubernetes_metrics_problems(docs: list[Doc], config: Config) -> list[str]:
    problems = metrics_problems(config)
    if config.metrics is None:
        return problems
    port = config.metrics.port
    sidecar = _sidecar_container(docs)
    if [p["containerPort"] for p in sidecar.get("ports", [])
            if p.get("name") == "metrics"] != [port]:
        problems.append(f"the sidecar's port `metrics` is not its METRICS_PORT {port}")
    annotations = _sidecar_deployment(docs)["spec"]["template"]["metadata"].get(
        "annotations", {})
    expected = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                "prometheus.io/path": "/metrics"}
    for key in SCRAPE_ANNOTATIONS:
        if annotations.get(key) != expected[key]:
            problems.append(f"pod annotation {key} is {annotations.get(key)!r}, "
                            f"not {expected[key]!r}")
    return problems


def _exposure_problems(docs: list[Doc], config: Config) -> list[str]:
    """Services and Ingresses reach the sidecar's `http` port only."""
    problems = []
    labels = _sidecar_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    public = {"http", config.port}
    metrics = {"metrics", config.metrics.port} if config.metrics else set()
    for service in (d for d in docs if d["kind"] == "Service"):
        if service["spec"]["selector"].items() <= labels.items():
            for service_port in service["spec"]["ports"]:
                target = service_port["targetPort"]
                if target in metrics:
                    problems.append(f"Service {service['metadata']['name']} exposes the metrics "
                                    f"port ({target}): Prometheus scrapes the pods")
                elif target not in public:
                    problems.append(f"Service {service['metadata']['name']} exposes "
                                    f"{target}, not the sidecar's port")
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        backends = [path["backend"] for rule in ingress["spec"].get("rules", [])
                    for path in rule.get("http", {}).get("paths", [])]
        if "defaultBackend" in ingress["spec"]:
            backends.append(ingress["spec"]["defaultBackend"])
        for backend in backends:
            ref = backend["service"]
            target_service = _named(docs, "Service", ref["name"])
            ports = target_service["spec"]["ports"] if target_service else []
            targets = [p["targetPort"] for p in ports
                       if ref["port"] in ({"name": p.get("name")}, {"number": p["port"]})]
            if targets not in (["http"], [config.port]):
                shown = ref["port"].get("name", ref["port"].get("number"))
                problems.append(f"Ingress {ingress['metadata']['name']} routes to "
                                f"{ref['name']}:{shown}, not to the sidecar's `http` port")
    return problems


def _security_problems(where: str, pod: Doc, container: Doc) -> list[str]:
    problems = []
    pod_context, context = pod.get("securityContext", {}), container.get("securityContext", {})

    def effective(key: str) -> Any:
        return context.get(key, pod_context.get(key))

    if effective("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot is not true")
    if effective("runAsUser") == 0:
        problems.append(f"{where}: runAsUser is 0")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem is not true")
    if "ALL" not in context.get("capabilities", {}).get("drop", []):
        problems.append(f"{where}: capabilities do not drop ALL")
    if effective("seccompProfile") != {"type": "RuntimeDefault"}:
        problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    resources = container.get("resources", {})
    if not {"cpu", "memory"} <= set(resources.get("requests", {})) or (
        "memory" not in resources.get("limits", {})
    ):
        problems.append(f"{where}: resources need cpu and memory requests and a memory limit")
    return problems


def _probe_problems(container: Doc, port: int) -> list[str]:
    problems = []
    port_names = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = container.get(probe, {}).get("httpGet")
        if get is None:
            if probe != "startupProbe":
                problems.append(f"{probe}: the sidecar needs an httpGet probe on {path}")
            continue
        target = port_names.get(get["port"], get["port"])
        if get["path"] != path or target != port:
            problems.append(f"{probe} asks {get['path']} on {get['port']}: use {path} on {port}")
    return problems


def _grace_problems(pod: Doc, container: Doc, config: Config) -> list[str]:
    """Kubernetes' SIGKILL comes after the preStop sleep, the drain and the child's stop."""
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get(
        "seconds", 0)
    child_stop = config.spawn.stop_timeout if config.spawn is not None else 0.0
    needed = pre_stop + config.shutdown_timeout + child_stop
    grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
    if grace <= needed:
        return [f"terminationGracePeriodSeconds {grace} leaves no margin after the preStop sleep "
                f"({pre_stop} s), SHUTDOWN_TIMEOUT_SECONDS ({config.shutdown_timeout:g} s) and "
                f"MCP_SPAWN_STOP_TIMEOUT_SECONDS ({child_stop:g} s)"]
    return []


def _redis_problems(docs: list[Doc], uri: str) -> list[str]:
    parts = urlsplit(uri)
    service = _named(docs, "Service", parts.hostname or "")
    if service is None or parts.port not in [p["port"] for p in service["spec"]["ports"]]:
        return [f"RATE_LIMIT_STORAGE_URI names {parts.hostname}:{parts.port}, no Service here"]
    server = next((d for d in docs if d["kind"] == "Deployment" and d["spec"]["selector"][
        "matchLabels"].items() <= service["spec"]["selector"].items()), None)
    if server is None:
        return [f"Service {parts.hostname} selects no Deployment here"]
    problems = []
    for container in server["spec"]["template"]["spec"]["containers"]:
        for probe in ("livenessProbe", "readinessProbe"):
            if probe not in container:
                problems.append(f"{container['name']} has no {probe}")
    return problems


def kubernetes_problems(docs: list[Doc]) -> list[str]:  # noqa: PLR0912 (one check per manifest rule)
    """What the schemas cannot know about a sidecar deployment."""
    deployment = _sidecar_deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    sidecar = _sidecar_container(docs)
    with tempfile.TemporaryDirectory() as files:
        env, problems = kubernetes_config_env(docs, Path(files), substitute=True)
        try:
            config = load(env)  # reads the ALLOW_*_FILE copies
            problems += [f"config warning: {warning}" for warning in config.warnings]
        except ConfigError as exc:
            return [*problems, *(f"config: {problem}" for problem in exc.problems)]
    port = config.port
    if [p["containerPort"] for p in sidecar.get("ports", []) if p.get("name") == "http"] != [port]:
        problems.append(f"the sidecar's port `http` is not its PORT {port}")
    problems += _probe_problems(sidecar, port)
    stdio = config.spawn is not None and config.spawn.stdio  # children on pipes: no upstream URL
    if not stdio and not is_loopback_host(urlsplit(config.upstream.origin).hostname):
        problems.append("MCP_UPSTREAM_URL is not the MCP server on the pod's loopback")
    problems += _grace_problems(pod, sidecar, config)
    uid, _, _ = next(i.value for i in parse_dockerfile(DOCKERFILE.read_text())[-1]
                     if i.keyword == "USER").partition(":")
    user = sidecar.get("securityContext", {}).get("runAsUser",
                                                  pod.get("securityContext", {}).get("runAsUser"))
    if user != int(uid):
        problems.append(f"the sidecar's runAsUser {user} is not the image's USER {uid}")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    for container in pod["containers"]:
        if container["name"] == SIDECAR:
            continue
        if container.get("ports"):
            problems.append(f"{container['name']} declares ports: only the sidecar is exposed")
        names = {item["name"] for item in container.get("env", [])}
        allowed = OTHER_CONTAINERS_ENV.get(container["name"], frozenset())
        if names - allowed:
            problems.append(f"{container['name']} gets {sorted(names - allowed)}")
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                problems += _security_problems(f"{d['metadata']['name']}/{c['name']}",
                                               d["spec"]["template"]["spec"], c)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    problems += _kubernetes_metrics_problems(docs, config)
    problems += _exposure_problems(docs, config)
    replicas = deployment["spec"].get("replicas", 1)
    if replicas > 1:
        if not config.rate_limits.storage_uri.startswith("async+redis"):
            problems.append(f"{replicas} replicas need RATE_LIMIT_STORAGE_URI=redis://...")
        else:
            problems += _redis_problems(docs, env["RATE_LIMIT_STORAGE_URI"])
        if not config.auth_server.state_secret:
            problems.append(f"{replicas} replicas need one STATE_SECRET")
        budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"
                   and d["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        if not budgets or not 0 < budgets[0]["spec"].get("minAvailable", 0) < replicas:
            problems.append(f"{replicas} replicas need a PodDisruptionBudget with "
                            f"0 < minAvailable < {replicas}")
    return problems


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_hold_what_the_sidecar_needs(path: Path) -> None:
    assert kubernetes_problems(load_yaml(path)) == []


def test_the_replicas_variant_shares_rate_limits_and_state_across_replicas(
    tmp_path: Path,
) -> None:
    docs = load_yaml(EXAMPLES / "kubernetes" / "replicas-redis.yaml")
    assert _sidecar_deployment(docs)["spec"]["replicas"] >= 2
    env, _ = kubernetes_config_env(docs, tmp_path, substitute=True)
    config = load(env)
    assert config.rate_limits.storage_uri == "async+redis://redis:6379/0"
    assert config.auth_server.facade
    assert config.auth_server.state_secret == SUBSTITUTE


def test_the_stdio_variant_starts_its_server_per_session_in_each_users_directory(
    tmp_path: Path,
) -> None:
    docs = load_yaml(EXAMPLES / "kubernetes" / "stdio.yaml")
    env, problems = kubernetes_config_env(docs, tmp_path, substitute=True)
    assert problems == []
    assert "MCP_UPSTREAM_URL" not in env
    assert "MCP_SPAWN_PORT" not in env
    config = load(env)
    spawn = config.spawn
    assert spawn is not None
    assert spawn.stdio
    assert spawn.scope == "session"
    assert config.upstream.origin == ""
    assert spawn.argv == ("mcp-server-filesystem", ".")  # installed in the image, not npx
    assert spawn.workdir_root == str(tmp_path / "workdir-root")  # the pod's volume stands in
    assert config.forward_identity
    assert spawn.max_per_subject < spawn.max_processes
    assert [c["name"] for c in _sidecar_deployment(docs)["spec"]["template"]["spec"][
        "containers"]] == [SIDECAR]  # the sidecar starts the servers: no server container


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_placeholder_secret_makes_the_sidecar_refuse_to_start(
    path: Path, tmp_path: Path
) -> None:
    env, _ = kubernetes_config_env(load_yaml(path), tmp_path, substitute=False)
    with pytest.raises(ConfigError) as error:
        load(env)
    assert any(problem.startswith("STATE_SECRET is shorter") for problem in error.value.problems)
    assert not any("_FILE" in problem for problem in error.value.problems)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_allow_list_configmap_is_what_the_sidecar_admits(path: Path, tmp_path: Path) -> None:
    """The ConfigMap's emails.txt, read by the sidecar's own file reader, plus ALLOW_EMAILS."""
    docs = load_yaml(path)
    env, problems = kubernetes_config_env(docs, tmp_path, substitute=True)
    assert problems == []
    assert env["ALLOW_EMAILS_FILE"].startswith(str(tmp_path))
    config = load(env)
    listed = allow_file_entries(_config_map(docs, "mcp-allow-list")["emails.txt"])
    assert listed
    assert config.policy.emails == listed | allow_file_entries(env.get("ALLOW_EMAILS", ""))
    assert [(f.kind, f.path) for f in config.policy.files] == [
        ("emails", env["ALLOW_EMAILS_FILE"])]
    assert config.policy.email_domains == {"example.com"}  # both lists apply


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_metrics_are_scraped_from_the_pod_and_reach_no_service(path: Path, tmp_path: Path) -> None:
    docs = load_yaml(path)
    env, _ = kubernetes_config_env(docs, tmp_path, substitute=True)
    config = load(env)
    assert config.metrics is not None
    assert config.metrics.host == ALL_INTERFACES
    ports = {p["name"]: p["containerPort"] for p in _sidecar_container(docs)["ports"]}
    assert ports["metrics"] == config.metrics.port != config.port
    targets = {p["targetPort"] for d in docs if d["kind"] == "Service"
               for p in d["spec"]["ports"]}
    assert not targets & {"metrics", config.metrics.port}
    assert _kubernetes_metrics_problems(docs, config) == []
    assert _exposure_problems(docs, config) == []


def _config_map(docs: list[Doc], name: str = SIDECAR_CONFIG_MAP) -> dict[str, str]:
    config_map = _named(docs, "ConfigMap", name)
    assert config_map is not None
    data: dict[str, str] = config_map["data"]
    return data


def _allow_mount(docs: list[Doc]) -> Doc:
    mount: Doc = next(m for m in _sidecar_container(docs)["volumeMounts"]
                      if m["name"] == "allow-list")
    return mount


def _allow_volume(docs: list[Doc]) -> Doc:
    pod = _sidecar_deployment(docs)["spec"]["template"]["spec"]
    volume: Doc = next(v for v in pod["volumes"] if v["name"] == "allow-list")
    return volume


def _allow_subpath(docs: list[Doc]) -> None:
    _allow_mount(docs).update(mountPath="/etc/oauth-sidecar/allow/emails.txt",
                              subPath="emails.txt")


def _allow_in_empty_dir(docs: list[Doc]) -> None:
    volume = _allow_volume(docs)
    volume.pop("configMap")
    volume["emptyDir"] = {}


def _allow_key_renamed(docs: list[Doc]) -> None:
    data = _config_map(docs, "mcp-allow-list")
    data["emails"] = data.pop("emails.txt")


def _metrics_behind_ingress(docs: list[Doc]) -> None:
    next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mcp")[
        "spec"]["ports"].append({"name": "metrics", "port": 9090, "targetPort": "metrics"})
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] = {
        "name": "metrics"}


def _volume_mount(docs: list[Doc], name: str) -> Doc:
    mount: Doc = next(m for m in _sidecar_container(docs)["volumeMounts"] if m["name"] == name)
    return mount


def _env_item(docs: list[Doc], name: str) -> Doc:
    item: Doc = next(i for i in _sidecar_container(docs)["env"] if i["name"] == name)
    return item


def _mcp_server(docs: list[Doc]) -> Doc:
    pod = _sidecar_deployment(docs)["spec"]["template"]["spec"]
    container: Doc = next(c for c in pod["containers"] if c["name"] == "mcp-server")
    return container


def _inline_secret(docs: list[Doc]) -> None:
    item = _env_item(docs, "STATE_SECRET")
    item.pop("valueFrom")
    item["value"] = SUBSTITUTE


def _redis_service_gone(docs: list[Doc]) -> None:
    docs.remove(next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] ==
                     "redis"))


def _redis_unprobed(docs: list[Doc]) -> None:
    redis = next(d for d in docs if d["metadata"]["name"] == "redis" and d["kind"] == "Deployment")
    del redis["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]


# (file, what breaks it, a problem it must cause)
KUBERNETES_BREAKAGES: dict[str, tuple[str, Callable[[list[Doc]], object], str]] = {
    "liveness on /readyz": ("deployment.yaml", lambda d: _sidecar_container(d)["livenessProbe"][
        "httpGet"].update(path="/readyz"), "livenessProbe"),
    "readiness on /healthz": ("deployment.yaml", lambda d: _sidecar_container(d)[
        "readinessProbe"]["httpGet"].update(path="/healthz"), "readinessProbe"),
    "readiness on the MCP server's port": ("deployment.yaml", lambda d: _sidecar_container(d)[
        "readinessProbe"]["httpGet"].update(port=3000), "readinessProbe"),
    "misspelt variable": ("deployment.yaml", lambda d: _config_map(d).update(
        OIDC_AUDIENSE="mcp"), "OIDC_AUDIENSE"),
    "secret in the ConfigMap": ("deployment.yaml", lambda d: _config_map(d).update(
        STATIC_CLIENT_SECRET="x"), "STATIC_CLIENT_SECRET is in ConfigMap"),
    "inline secret": ("deployment.yaml", _inline_secret, "STATE_SECRET has an inline value"),
    "missing secret key": ("deployment.yaml", lambda d: _env_item(d, "STATE_SECRET")[
        "valueFrom"]["secretKeyRef"].update(key="STATE"), "has no key STATE"),
    "a rejected configuration": ("deployment.yaml", lambda d: _config_map(d).update(
        RESOURCE_URL="http://mcp.example.com/mcp"), "config: RESOURCE_URL"),
    "no upstream": ("deployment.yaml", lambda d: _config_map(d).pop("MCP_UPSTREAM_URL"),
                    "config: MCP_UPSTREAM_URL is required"),
    "upstream off the pod": ("deployment.yaml", lambda d: _config_map(d).update(
        MCP_UPSTREAM_URL="http://mcp-server:3000"), "loopback"),
    "MCP server exposed": ("deployment.yaml", lambda d: _mcp_server(d).update(
        ports=[{"containerPort": 3000}]), "mcp-server declares ports"),
    "Service to the MCP server": ("deployment.yaml", lambda d: next(
        x for x in d if x["kind"] == "Service")["spec"]["ports"][0].update(targetPort=3000),
        "exposes 3000"),
    "a sidecar secret handed to the MCP server": ("deployment.yaml", lambda d: _mcp_server(
        d)["env"].append({"name": "STATE_SECRET", "value": "x"}), "mcp-server gets"),
    "root": ("deployment.yaml", lambda d: _sidecar_container(d)["securityContext"].update(
        runAsUser=0), "runAsUser is 0"),
    "another uid than the image's": ("deployment.yaml", lambda d: _sidecar_container(d)[
        "securityContext"].update(runAsUser=1000), "not the image's USER"),
    "may run as root": ("deployment.yaml", lambda d: (
        _mcp_server(d)["securityContext"].pop("runAsNonRoot"),
        _sidecar_deployment(d)["spec"]["template"]["spec"]["securityContext"].pop(
            "runAsNonRoot")), "mcp/mcp-server: runAsNonRoot"),
    "privilege escalation": ("deployment.yaml", lambda d: _sidecar_container(d)[
        "securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    "writable root": ("deployment.yaml", lambda d: _mcp_server(d)["securityContext"].update(
        readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
    "capabilities kept": ("deployment.yaml", lambda d: _sidecar_container(d)[
        "securityContext"].pop("capabilities"), "drop ALL"),
    "no seccomp": ("deployment.yaml", lambda d: _sidecar_deployment(d)["spec"]["template"][
        "spec"]["securityContext"].pop("seccompProfile"), "seccompProfile"),
    "no resources": ("deployment.yaml", lambda d: _sidecar_container(d).pop("resources"),
                     "resources"),
    "replicas without Redis": ("deployment.yaml", lambda d: _sidecar_deployment(d)[
        "spec"].update(replicas=3), "RATE_LIMIT_STORAGE_URI"),
    "no shared STATE_SECRET": ("replicas-redis.yaml", lambda d: _sidecar_container(d)[
        "env"].remove(_env_item(d, "STATE_SECRET")), "need one STATE_SECRET"),
    "no disruption budget": ("replicas-redis.yaml", lambda d: d.remove(next(
        x for x in d if x["kind"] == "PodDisruptionBudget")), "PodDisruptionBudget"),
    "no Redis Service": ("replicas-redis.yaml", _redis_service_gone, "no Service here"),
    "Redis without readiness": ("replicas-redis.yaml", _redis_unprobed,
                                "redis has no readinessProbe"),
    "allow-list mounted with subPath": ("deployment.yaml", _allow_subpath, "subPath"),
    "allow-list mounted with subPath (replicas)": ("replicas-redis.yaml", _allow_subpath,
                                                   "subPath"),
    "allow-list mounted writable": ("deployment.yaml", lambda d: _allow_mount(d).pop(
        "readOnly"), "not mounted readOnly"),
    "allow-list not mounted": ("deployment.yaml", lambda d: _sidecar_container(d).pop(
        "volumeMounts"), "not in a volume mounted"),
    "allow-list file outside the mount": ("deployment.yaml", lambda d: _config_map(d).update(
        ALLOW_EMAILS_FILE="/etc/allow/emails.txt"), "not in a volume mounted"),
    "allow-list in an emptyDir": ("deployment.yaml", _allow_in_empty_dir,
                                  "not a configMap volume"),
    "allow-list ConfigMap missing": ("deployment.yaml", lambda d: d.remove(next(
        x for x in d if x["metadata"]["name"] == "mcp-allow-list")),
        "no ConfigMap mcp-allow-list"),
    "allow-list key renamed": ("deployment.yaml", _allow_key_renamed, "has no key emails.txt"),
    "allow-list without entries": ("deployment.yaml", lambda d: _config_map(
        d, "mcp-allow-list").update({"emails.txt": "# nobody yet\n"}), "has no entry"),
    "a bad allow-list entry": ("deployment.yaml", lambda d: _config_map(
        d, "mcp-allow-list").update({"emails.txt": "alice@example.net\nbob\n"}),
        "config: ALLOW_EMAILS_FILE"),
    "metrics off": ("deployment.yaml", lambda d: _config_map(d).pop("METRICS_PORT"),
                    "METRICS_PORT is not set"),
    "metrics on loopback": ("replicas-redis.yaml", lambda d: _config_map(d).pop(
        "METRICS_HOST"), "METRICS_HOST=127.0.0.1"),
    "metrics port not the container's": ("deployment.yaml", lambda d: _config_map(d).update(
        METRICS_PORT="9091"), "port `metrics` is not its METRICS_PORT 9091"),
    "metrics on the public port": ("deployment.yaml", lambda d: _config_map(d).update(
        METRICS_PORT="8080"), "config: METRICS_PORT=8080 is PORT"),
    "scrape annotation drifted": ("deployment.yaml", lambda d: _sidecar_deployment(d)["spec"][
        "template"]["metadata"]["annotations"].update({"prometheus.io/port": "8080"}),
        "prometheus.io/port"),
    "no scrape annotations": ("replicas-redis.yaml", lambda d: _sidecar_deployment(d)["spec"][
        "template"]["metadata"].pop("annotations"), "prometheus.io/scrape"),
    "Service to the metrics port": ("deployment.yaml", lambda d: next(
        x for x in d if x["kind"] == "Service")["spec"]["ports"][0].update(targetPort="metrics"),
        "exposes the metrics port (metrics)"),
    "Service to the metrics port by number": ("replicas-redis.yaml", lambda d: next(
        x for x in d if x["kind"] == "Service")["spec"]["ports"][0].update(targetPort=9090),
        "exposes the metrics port (9090)"),
    "Ingress to the metrics port": ("deployment.yaml", _metrics_behind_ingress,
                                    "Ingress mcp routes to mcp:metrics"),
    "grace shorter than the drain": ("deployment.yaml", lambda d: _config_map(d).update(
        SHUTDOWN_TIMEOUT_SECONDS="30"), "terminationGracePeriodSeconds 35"),
    "stdio: grace shorter than the children's stop": ("stdio.yaml", lambda d: _config_map(
        d).update(MCP_SPAWN_STOP_TIMEOUT_SECONDS="15"), "MCP_SPAWN_STOP_TIMEOUT_SECONDS (15 s)"),
    "stdio: no command": ("stdio.yaml", lambda d: _config_map(d).pop("MCP_SPAWN_CMD"),
                          "config: MCP_UPSTREAM_URL is required"),
    "stdio: a port as well": ("stdio.yaml", lambda d: _config_map(d).update(
        MCP_SPAWN_PORT="8765"), "config: MCP_SPAWN_TRANSPORT=stdio with MCP_SPAWN_PORT"),
    "stdio: an upstream as well": ("stdio.yaml", lambda d: _config_map(d).update(
        MCP_UPSTREAM_URL="http://127.0.0.1:3000"), "config: MCP_UPSTREAM_URL and MCP_SPAWN_CMD"),
    "stdio: http without a port": ("stdio.yaml", lambda d: _config_map(d).update(
        MCP_SPAWN_TRANSPORT="http"), "config: MCP_SPAWN_TRANSPORT=http needs MCP_SPAWN_PORT"),
    "stdio: an unsplittable command": ("stdio.yaml", lambda d: _config_map(d).update(
        MCP_SPAWN_CMD="mcp-server-filesystem '."), "config: MCP_SPAWN_CMD cannot be split"),
    "stdio: a program the image lacks": ("stdio.yaml", lambda d: _config_map(d).update(
        MCP_SPAWN_CMD="/opt/nowhere/mcp-server ."), "config: MCP_SPAWN_CMD program"),
    "stdio: working directories off the volume": ("stdio.yaml", lambda d: _sidecar_container(
        d)["volumeMounts"].remove(_volume_mount(d, "users")), "not in a volume mounted"),
    "stdio: working directories read-only": ("stdio.yaml", lambda d: _volume_mount(
        d, "users").update(readOnly=True), "mounted readOnly"),
}


@pytest.mark.parametrize("breakage", sorted(KUBERNETES_BREAKAGES))
def test_kubernetes_check_rejects_a_broken_copy(breakage: str) -> None:
    filename, breaks, expected = KUBERNETES_BREAKAGES[breakage]
    docs = load_yaml(EXAMPLES / "kubernetes" / filename)
    broken = copy.deepcopy(docs)
    breaks(broken)
    assert broken != docs
    problems = kubernetes_problems(broken)
    assert any(expected in problem for problem in problems), problems


# -- docker compose ------------------------------------------------------------------------------


def compose_schema_errors(doc: Doc) -> list[str]:
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_spec_schema() -> None:
    assert compose_schema_errors(load_yaml(COMPOSE)[0]) == []


COMPOSE_SCHEMA_BREAKAGES: dict[str, Callable[[Doc], object]] = {
    "misspelt key": lambda d: d["services"][SIDECAR].update(enviroment={}),
    "wrong type": lambda d: d["services"][SIDECAR].update(ports={"http": 8080}),
    "unknown top-level key": lambda d: d.update(service={}),
}


@pytest.mark.parametrize("breakage", sorted(COMPOSE_SCHEMA_BREAKAGES))
def test_compose_schema_check_rejects_a_broken_copy(breakage: str) -> None:
    doc = load_yaml(COMPOSE)[0]
    COMPOSE_SCHEMA_BREAKAGES[breakage](doc)
    assert compose_schema_errors(doc) != []


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def _environment(service: Doc) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.partition("=")[::2] for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


@dataclass(frozen=True)
class ComposeMount:
    source: str
    target: str
    read_only: bool
    bind: bool


def compose_mounts(service: Doc) -> list[ComposeMount]:
    """A service's `volumes`, short (src:dst[:mode]) or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target, _, mode = rest.partition(":")
            mounts.append(ComposeMount(source, target, "ro" in mode.split(","),
                                       source.startswith((".", "/", "~"))))
        else:
            mounts.append(ComposeMount(volume.get("source", ""), volume["target"],
                                       volume.get("read_only") is True,
                                       volume.get("type") == "bind"))
    return mounts


def compose_allow_files(service: Doc, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """env with each ALLOW_*_FILE pointing at the repository file bind-mounted there."""
    problems: list[str] = []
    env = dict(env)
    mounts = compose_mounts(service)
    for name in ALLOW_FILE_VARIABLES:
        path = env.get(name)
        if not path:
            continue
        found = [(m, rel) for m in mounts if (rel := inside(path, m.target)) is not None]
        if not found:
            problems.append(f"{name}={path} is not in a volume mounted into the sidecar")
            continue
        mount, relative = max(found, key=lambda f: len(f[0].target))
        if not mount.read_only:
            problems.append(f"{name}: {mount.source} is not mounted read-only")
        if not mount.bind:
            problems.append(f"{name}: {mount.source} is not a bind mount of a file in the "
                            "repository")
            continue
        if relative == ".":
            problems.append(f"{name}: {mount.source} binds the file itself, which pins its inode: "
                            "an edit saved by rename (vim, sed -i) goes unseen; bind its directory")
        host = (COMPOSE.parent / mount.source / relative).resolve()
        if not host.is_relative_to(REPO) or not host.is_file():
            problems.append(f"{name}={path} is {host}, which does not exist in the repository")
            continue
        if not allow_file_entries(host.read_text()):
            problems.append(f"{name}: {host.relative_to(REPO)} has no entry: show the format")
        env[name] = str(host)
    return env, problems


def compose_problems(doc: Doc) -> list[str]:  # noqa: PLR0912 (one check per compose rule)
    problems: list[str] = []
    services: dict[str, Doc] = doc["services"]
    sidecar = services[SIDECAR]
    if (COMPOSE.parent / sidecar["build"]["context"]).resolve() != REPO:
        problems.append("the sidecar is not built from the repository's Dockerfile")
    if (COMPOSE.parent / sidecar["env_file"]).resolve() != REPO / ".env":
        problems.append("env_file is not the repository's .env (made from .env.example)")
    environment = _environment(sidecar)
    for name in sorted(set(environment) - set(VARIABLES)):
        problems.append(f"{name} is not a variable oauth_sidecar knows")
    for name in sorted(set(environment) & SECRET_VARIABLES):
        problems.append(f"{name} is in the compose file: secrets belong in .env")
    # What `docker compose up` gives the sidecar after `cp .env.example .env`, with each
    # ALLOW_*_FILE read from the repository file mounted there.
    env, file_problems = compose_allow_files(
        sidecar, read_env_file(REPO / ".env.example") | environment)
    problems += file_problems
    try:
        config = load(env)
        problems += [f"config warning: {warning}" for warning in config.warnings]
        port = config.port
    except ConfigError as exc:
        return [*problems, *(f"config: {problem}" for problem in exc.problems)]
    published = [str(p).rpartition(":")[2] for p in sidecar.get("ports", [])]
    problems += metrics_problems(config)
    if config.metrics is not None:
        if str(config.metrics.port) in published:
            problems.append(f"the sidecar publishes the metrics port {config.metrics.port}: "
                            "`expose` it to the project's network only")
        if str(config.metrics.port) not in [str(p) for p in sidecar.get("expose", [])]:
            problems.append(f"the sidecar does not expose its METRICS_PORT "
                            f"{config.metrics.port}")
    if published != [str(port)]:
        problems.append(f"the sidecar publishes {published}, not its PORT {port}")
    dockerfile_argv = healthcheck_argv(parse_dockerfile(DOCKERFILE.read_text())[-1])
    if sidecar.get("healthcheck", {}).get("test") != ["CMD", *dockerfile_argv]:
        problems.append("the sidecar's healthcheck is not the image's HEALTHCHECK")
    for name, service in services.items():
        if name != SIDECAR and service.get("ports"):
            problems.append(f"{name} publishes ports: only the sidecar is exposed")
        if name != SIDECAR:
            extra = set(_environment(service)) - OTHER_CONTAINERS_ENV.get(name, frozenset())
            if extra:
                problems.append(f"{name} gets {sorted(extra)}")
        if service.get("read_only") is not True or "ALL" not in service.get("cap_drop", []) or (
            "no-new-privileges:true" not in service.get("security_opt", [])
        ):
            problems.append(f"{name}: needs read_only, cap_drop ALL and no-new-privileges")
    return problems


def test_compose_file_holds_what_the_sidecar_needs() -> None:
    assert compose_problems(load_yaml(COMPOSE)[0]) == []


def test_compose_allow_list_file_is_what_the_sidecar_admits() -> None:
    sidecar = load_yaml(COMPOSE)[0]["services"][SIDECAR]
    dotenv = read_env_file(REPO / ".env.example")
    env, problems = compose_allow_files(sidecar, dotenv | _environment(sidecar))
    assert problems == []
    host = Path(env["ALLOW_EMAILS_FILE"])
    assert host.is_relative_to(EXAMPLES)
    assert host.is_file()
    config = load(env)
    listed = allow_file_entries(host.read_text())
    assert listed
    assert config.policy.emails == listed | allow_file_entries(env.get("ALLOW_EMAILS", ""))
    assert [(f.kind, f.path) for f in config.policy.files] == [("emails", str(host))]
    assert config.metrics is not None
    assert config.metrics.host == ALL_INTERFACES


def _allow_volume_replaced(volume: str) -> Callable[[Doc], object]:
    return lambda d: d["services"][SIDECAR].update(volumes=[volume])


def _compose_allow_file(path: str) -> Callable[[Doc], object]:
    return lambda d: d["services"][SIDECAR]["environment"].update(ALLOW_EMAILS_FILE=path)


COMPOSE_BREAKAGES: dict[str, tuple[Callable[[Doc], object], str]] = {
    "MCP server published": (lambda d: d["services"]["mcp-server"].update(ports=["3000:3000"]),
                             "mcp-server publishes ports"),
    "misspelt variable": (lambda d: d["services"][SIDECAR]["environment"].update(
        OIDC_AUDIENSE="x"), "OIDC_AUDIENSE"),
    "secret inline": (lambda d: d["services"][SIDECAR]["environment"].update(
        STATE_SECRET=SUBSTITUTE), "STATE_SECRET is in the compose file"),
    "a rejected configuration": (lambda d: d["services"][SIDECAR]["environment"].update(
        MCP_UPSTREAM_URL="ftp://mcp-server"), "config: MCP_UPSTREAM_URL"),
    "healthcheck drifted": (lambda d: d["services"][SIDECAR]["healthcheck"]["test"].__setitem__(
        1, "python3"), "healthcheck"),
    "wrong port": (lambda d: d["services"][SIDECAR].update(ports=["8080:3000"]), "publishes"),
    "writable": (lambda d: d["services"][SIDECAR].pop("read_only"), "read_only"),
    "a sidecar secret handed to the MCP server": (lambda d: d["services"]["mcp-server"][
        "environment"].update(STATIC_CLIENT_SECRET="x"), "mcp-server gets"),
    "another env file": (lambda d: d["services"][SIDECAR].update(env_file="prod.env"),
                         "env_file"),
    "allow-list mounted writable": (_allow_volume_replaced(
        "./allow:/etc/oauth-sidecar/allow"), "not mounted read-only"),
    "allow-list not mounted": (lambda d: d["services"][SIDECAR].pop("volumes"),
                               "not in a volume mounted"),
    "allow-list file outside the mount": (_compose_allow_file("/etc/allow/emails.txt"),
                                          "not in a volume mounted"),
    "allow-list file missing": (_compose_allow_file("/etc/oauth-sidecar/allow/nobody.txt"),
                                "does not exist in the repository"),
    "allow-list in a named volume": (_allow_volume_replaced(
        "allow:/etc/oauth-sidecar/allow:ro"), "not a bind mount"),
    "allow-list file bound by itself": (_allow_volume_replaced(
        "./allow/emails.txt:/etc/oauth-sidecar/allow/emails.txt:ro"), "pins its inode"),
    "a bad allow-list entry": (lambda d: (
        _allow_volume_replaced("..:/etc/oauth-sidecar/allow:ro")(d),
        _compose_allow_file("/etc/oauth-sidecar/allow/pyproject.toml")(d)),
        "config: ALLOW_EMAILS_FILE"),
    "metrics off": (lambda d: d["services"][SIDECAR]["environment"].pop("METRICS_PORT"),
                    "METRICS_PORT is not set"),
    "metrics on loopback": (lambda d: d["services"][SIDECAR]["environment"].update(
        METRICS_HOST="127.0.0.1"), "METRICS_HOST=127.0.0.1"),
    "metrics published": (lambda d: d["services"][SIDECAR]["ports"].append("9090:9090"),
                          "publishes the metrics port"),
    "metrics not exposed": (lambda d: d["services"][SIDECAR].pop("expose"),
                            "does not expose its METRICS_PORT"),
}


@pytest.mark.parametrize("breakage", sorted(COMPOSE_BREAKAGES))
def test_compose_check_rejects_a_broken_copy(breakage: str) -> None:
    breaks, expected = COMPOSE_BREAKAGES[breakage]
    doc = load_yaml(COMPOSE)[0]
    broken = copy.deepcopy(doc)
    breaks(broken)
    assert broken != doc
    problems = compose_problems(broken)
    assert any(expected in problem for problem in problems), problems
