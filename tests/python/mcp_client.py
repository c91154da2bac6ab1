"""The official Python MCP client (PyPI `mcp`) against an ATP toolkit's MCP
endpoint, `http://localhost:PORT/mcp/conformance` (the conformance fixture's
`conformance` toolkit). Run by tests/tests/mcp_python.rs.

Usage: python3 mcp_client.py URL TOKEN

Prints one `ok ...` line per check and, at the end, `ALL OK`; any failed
check raises (exit status 1, with the traceback on stderr).
"""

import json
import sys

import anyio

from mcp import ClientSession

# The transport: `streamablehttp_client(url, headers=...)` in mcp 1.x;
# `streamable_http_client(url, http_client=...)` (headers set on the httpx
# client) in mcp 2.x, where the old name is gone.
try:
    from mcp.client.streamable_http import streamablehttp_client as _legacy_client
except ImportError:  # mcp >= 2
    _legacy_client = None
try:
    from mcp.shared.exceptions import MCPError as RpcError
except ImportError:  # mcp 1.x
    from mcp.shared.exceptions import McpError as RpcError


class Connection:
    """`async with Connection(url, headers) as session:` an initialized
    ClientSession over streamable HTTP, whatever the SDK's major version."""

    def __init__(self, url, headers=None):
        self.url = url
        self.headers = headers or {}
        self.stack = None

    async def __aenter__(self):
        from contextlib import AsyncExitStack

        self.stack = AsyncExitStack()
        await self.stack.__aenter__()
        if _legacy_client is not None:
            streams = await self.stack.enter_async_context(
                _legacy_client(self.url, headers=self.headers)
            )
        else:
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client

            http = await self.stack.enter_async_context(
                create_mcp_http_client(headers=self.headers)
            )
            streams = await self.stack.enter_async_context(
                streamable_http_client(self.url, http_client=http)
            )
        read, write = streams[0], streams[1]
        session = await self.stack.enter_async_context(ClientSession(read, write))
        self.init = await session.initialize()
        return session

    async def __aexit__(self, *exc):
        return await self.stack.__aexit__(*exc)


def check(cond, what, got=None):
    if not cond:
        raise AssertionError(f"{what}; got: {got!r}")
    print(f"ok   {what}", flush=True)


def texts(result):
    return [c.text for c in result.content if getattr(c, "type", None) == "text"]


async def main(url, token):
    async with Connection(url) as session:
        init = getattr(session, "initialize_result", None)
        version = getattr(init, "protocol_version", None) or getattr(
            init, "protocolVersion", None
        )
        print(f"info initialized, protocol version {version}", flush=True)

        listed = await session.list_tools()
        names = [t.name for t in listed.tools]
        for name in ("echo", "hello_world", "add", "secure"):
            check(name in names, f"tools/list has {name}", names)
        echo_tool = next(t for t in listed.tools if t.name == "echo")
        schema = echo_tool.input_schema if hasattr(echo_tool, "input_schema") else echo_tool.inputSchema
        check(
            schema.get("type") == "object" and "text" in schema.get("properties", {}),
            "echo's inputSchema is an object schema with `text`",
            schema,
        )

        echoed = await session.call_tool("echo", {"text": "hi from python"})
        check(not echoed.is_error if hasattr(echoed, "is_error") else not echoed.isError,
              "echo is not an error", echoed)
        structured = getattr(echoed, "structured_content", None)
        if structured is None:
            structured = getattr(echoed, "structuredContent", None)
        check(structured == {"echo": "hi from python"}, "echo's structuredContent", structured)
        check(
            [json.loads(t) for t in texts(echoed)] == [{"echo": "hi from python"}],
            "echo's text content is the JSON result",
            texts(echoed),
        )

        added = await session.call_tool("add", {"a": 2, "b": 40})
        structured = getattr(added, "structured_content", None) or getattr(added, "structuredContent", None)
        check(structured == {"sum": 42}, "add(2, 40) is {sum: 42}", structured)

        failed = await session.call_tool("fail", {})
        is_error = getattr(failed, "is_error", None)
        if is_error is None:
            is_error = getattr(failed, "isError", None)
        check(is_error is True, "fail gives isError: true", failed)
        check(any("boom" in t for t in texts(failed)), "fail's message is boom", texts(failed))

        secure = await session.call_tool("secure", {})
        is_error = getattr(secure, "is_error", None)
        if is_error is None:
            is_error = getattr(secure, "isError", None)
        check(is_error is True, "secure without a token gives isError: true", secure)
        check(
            any("auth" in t.lower() for t in texts(secure)),
            "secure without a token says auth is required",
            texts(secure),
        )

        try:
            unknown = await session.call_tool("no_such_tool", {})
        except RpcError as e:
            check(True, f"unknown tool is an MCP error ({e.error.code}: {e.error.message})")
            check(e.error.code == -32602, "unknown tool's error code is -32602", e.error.code)
        else:
            raise AssertionError(f"unknown tool: expected an MCP error, got {unknown!r}")

    async with Connection(url, {"Authorization": f"Bearer {token}"}) as session:
        secure = await session.call_tool("secure", {})
        is_error = getattr(secure, "is_error", None)
        if is_error is None:
            is_error = getattr(secure, "isError", None)
        check(not is_error, "secure with a bearer token is not an error", secure)
        structured = getattr(secure, "structured_content", None) or getattr(secure, "structuredContent", None)
        check(
            structured == {"token_length": len(token)},
            f"secure got the token (token_length {len(token)})",
            structured,
        )

    print("ALL OK", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
