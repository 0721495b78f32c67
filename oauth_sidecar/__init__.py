"""oauth_sidecar: an OAuth 2.1 resource-server sidecar for one MCP server."""

__version__ = "0.1.0"
