"""MCP-aware rules: the JSON-RPC a caller sends, the tools it may call, what it is shown."""
