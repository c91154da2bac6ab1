"""The seed README's FastAPI endpoints, as written there.

Run: uvicorn fastapi_app:app
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_atp.registry import get_client

import atp_tools  # noqa: F401  Ensure toolkit registration

app = FastAPI()


@app.get("/atp/{toolkit_name}/{tool_name}/")
async def get_tool(toolkit_name: str, tool_name: str):
    client = get_client(toolkit_name)
    if not client:
        return JSONResponse({"error": "Toolkit not found"}, status_code=404)
    tool = client.registered_tools.get(tool_name)
    if not tool:
        return JSONResponse({"error": "Tool not found"}, status_code=404)
    return JSONResponse(tool)


@app.post("/atp/{toolkit_name}/{tool_name}/")
async def post_tool(toolkit_name: str, tool_name: str, request: Request):
    client = get_client(toolkit_name)
    if not client:
        return JSONResponse({"error": "Toolkit not found"}, status_code=404)
    tool = client.registered_tools.get(tool_name)
    if not tool:
        return JSONResponse({"error": "Tool not found"}, status_code=404)
    params = await request.json()
    result = tool["function"](**params)
    return JSONResponse({"result": result})


@app.get("/atp/{toolkit_name}/")
async def get_toolkit(toolkit_name: str):
    client = get_client(toolkit_name)
    if not client:
        return JSONResponse({"error": "Toolkit not found"}, status_code=404)
    tools = list(client.registered_tools.keys())
    return JSONResponse({"toolkit": toolkit_name, "tools": tools})
