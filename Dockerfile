# oauth_sidecar: an OAuth 2.1 resource-server sidecar for one MCP server.
#
#   docker build -t oauth-sidecar .
#   docker run --rm -p 8080:8080 --env-file .env oauth-sidecar
#
# All configuration comes from the environment at run time (see .env.example); nothing is baked
# in. tests/test_examples.py checks this file: a non-root numeric USER, the init in the
# ENTRYPOINT, a HEALTHCHECK that works (it is run against a real sidecar), no configuration in ENV.

# Pin the base by digest in production (--build-arg PYTHON_IMAGE=python:3.11-slim@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim

# -- build: turn the source into a wheel, install it and its dependencies into /opt/venv ----------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Exactly what the package needs (.dockerignore keeps everything else out of the context):
# pyproject.toml, README.md (the package's readme) and the package itself.
COPY pyproject.toml README.md ./
COPY oauth_sidecar ./oauth_sidecar
# Every dependency ships binary wheels (aiohttp, cryptography, uvloop): no compiler is needed.
# A virtual environment without pip of its own: one directory to copy, whatever the base
# image's install scheme.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir \
      "$(ls /wheels/oauth_sidecar-*.whl)[uvloop]"

# -- runtime: the same slim Python, tini, the installed package; no pip cache, no sources ---------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="oauth-sidecar" \
      org.opencontainers.image.description="OAuth 2.1 resource-server sidecar for MCP servers" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# tini as PID 1: the sidecar waits only for the children it started, so anything re-parented to
# PID 1 (a spawned MCP server's grandchildren that left it) would stay a zombie; tini reaps them
# and passes SIGTERM/SIGINT on to the sidecar. No `-g`: the sidecar orders shutdown itself (stop
# accepting, drain requests, then SIGTERM the spawned child's process group, SIGKILL after
# MCP_SPAWN_STOP_TIMEOUT_SECONDS; see oauth_sidecar/upstream/child.py), and that child runs in its own
# session, which `-g` would not reach anyway.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --gid 10001 sidecar \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/venv /opt/venv

# -- stdio MCP servers: add their runtime (Node or uv) here ---------------------------------------
# A stdio server (MCP_SPAWN_CMD without MCP_SPAWN_PORT) is started by the sidecar inside this
# image, as uid 10001, one process per MCP session: its runtime and the server itself must be in
# the image. Uncomment one block below (this point of the file still runs as root), or put it in
# an image of your own (`FROM oauth-sidecar`, `USER root`, the block, `USER 10001:10001`), as
# README's "stdio servers" does. Install the server at build time, pinned: `npx -y` and `uvx`
# would fetch it when a session starts on a cold cache (uvx asks PyPI at every start), which needs
# the network and a writable cache (this image's user has none), and every session would keep the
# fetcher's process as well.
#
# Node, for npm servers (Debian's nodejs and npm packages):
# RUN apt-get update \
#  && apt-get install -y --no-install-recommends nodejs npm \
#  && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
#  && npm install --global --no-audit --no-fund @modelcontextprotocol/server-filesystem@2026.8.31 \
#  && npm cache clean --force
#   then run with MCP_SPAWN_CMD="mcp-server-filesystem /data"
#
# uv, for PyPI servers (`pip install uv` into the base image's Python, not into /opt/venv, which
# is the sidecar's own); the server as a uv tool, its commands in /usr/local/bin. mcp-server-git
# needs git too:
# RUN apt-get update \
#  && apt-get install -y --no-install-recommends git \
#  && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
#  && pip install --no-cache-dir uv \
#  && UV_TOOL_DIR=/opt/uv-tools UV_TOOL_BIN_DIR=/usr/local/bin \
#     uv tool install --no-cache --python /usr/local/bin/python3 mcp-server-git==2026.10.19
#   then run with MCP_SPAWN_CMD="mcp-server-git --repository /data/repo"

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# /healthz on the PORT the sidecar was given (8080 unless PORT is set at run time). Docker keeps
# it; buildah and podman keep it only with `--format docker` (OCI images have no HEALTHCHECK).
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request;urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT','8080'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "oauth-sidecar"]
