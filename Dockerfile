# oauth_sidecar: an OAuth 2.1 resource-server sidecar for one MCP server.
# All configuration comes from the environment (see .env.example).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY oauth_sidecar ./oauth_sidecar
RUN pip install '.[uvloop]' && useradd --system --uid 10001 --no-create-home sidecar

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request;urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT','8080'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["oauth-sidecar"]
