"""One MCP server driven by the official Python MCP SDK (PyPI `mcp`), as a third-party client.

    python mcp_sdk_client.py stdio COMMAND [ARG...]
    python mcp_sdk_client.py http URL [--bearer TOKEN]

It initializes, sets the logging level, lists the tools (every `inputSchema` must be a JSON
Schema object: the SDK refuses the whole list otherwise), calls the tool named by
`MCP_CALL_TOOL` with the JSON arguments in `MCP_CALL_ARGS`, lists the resources and reads the
first page of the first one when the server has resources. It prints one JSON object with what
it saw; any failure is an exception and a non-zero exit.
"""

import asyncio
import json
import os
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client


async def exercise(read, write) -> dict:
    seen: dict = {}
    async with ClientSession(read, write) as session:
        init = await session.initialize()
        seen["server"] = init.server_info.name
        seen["protocol_version"] = init.protocol_version
        if init.capabilities.logging is not None:
            await session.set_logging_level("info")
            seen["set_level"] = True
        tools = await session.list_tools()
        seen["tools"] = [t.name for t in tools.tools]
        seen["schema_types"] = sorted({t.input_schema.get("type", "") for t in tools.tools})
        name = os.environ.get("MCP_CALL_TOOL")
        if name:
            args = json.loads(os.environ.get("MCP_CALL_ARGS", "{}"))
            result = await session.call_tool(name, args)
            seen["call"] = {
                "is_error": bool(result.is_error),
                "content_types": [c.type for c in result.content],
                "text": " ".join(getattr(c, "text", "") or "" for c in result.content),
                "structured": result.structured_content,
            }
        if init.capabilities.resources is not None:
            resources = await session.list_resources()
            seen["resources"] = len(resources.resources)
            if resources.resources:
                uri = str(resources.resources[0].uri)
                page = await session.read_resource(f"{uri}?start=0&end=1024")
                blob = getattr(page.contents[0], "blob", "")
                seen["first_page_base64_chars"] = len(blob)
    return seen


async def main() -> None:
    mode, target, *rest = sys.argv[1:]
    if mode == "stdio":
        params = StdioServerParameters(command=target, args=rest, env=dict(os.environ))
        async with stdio_client(params) as (read, write):
            seen = await exercise(read, write)
    else:
        headers = {}
        if rest[:1] == ["--bearer"]:
            headers["Authorization"] = f"Bearer {rest[1]}"
        async with httpx2.AsyncClient(headers=headers, timeout=60) as client:
            async with streamable_http_client(target, http_client=client) as streams:
                read, write = streams[0], streams[1]
                seen = await exercise(read, write)
    print(json.dumps(seen))


asyncio.run(main())
