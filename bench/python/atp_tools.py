"""The benchmark toolkit for the Python reference servers.

As the seed README says: "Register your toolkits and tools in a module (e.g.
atp_tools.py), and import it in your FastAPI app before starting." The one
toolkit, `conformance`, has the seed's `hello_world`, registered with the
published `AgentToolProtocol` package's `ToolKitClient.register_tool`, and is
registered with both `fastapi_atp.registry` and `django_atp.registry`.
"""

import os

import requests
from atp_sdk.clients import ToolKitClient
from django_atp.registry import register_client as register_django_client
from fastapi_atp.registry import register_client as register_fastapi_client

# `register_tool` checks the toolkit's hash with the ATP server at
# `base_url` and then registers the tool there. The benchmark has no
# network: `atp-bench` passes the URL of a local port nothing listens on, so
# both calls fail at once instead of waiting for a time-out.
BASE_URL = os.environ.get("ATP_BENCH_PY_BASE_URL", "http://127.0.0.1:9")

client = ToolKitClient(
    api_key="YOUR_ATP_TOOLKIT_API_KEY",
    app_name="Conformance",
    base_url=BASE_URL,
)
register_fastapi_client("conformance", client)
register_django_client("conformance", client)

try:

    @client.register_tool(
        function_name="hello_world",
        params=["name"],
        required_params=["name"],
        description="Returns a greeting.",
        auth_provider=None,
        auth_type=None,
        auth_with=None,
    )
    def hello_world(**kwargs):
        return {"message": f"Hello, {kwargs.get('name', 'World')}!"}

except requests.exceptions.RequestException:
    # The hash check catches its own failure, the registration with the
    # server does not. The tool is in `registered_tools` before that call,
    # which is all the HTTP endpoints need.
    pass

if "hello_world" not in client.registered_tools:
    raise SystemExit("atp_tools: hello_world was not registered")
