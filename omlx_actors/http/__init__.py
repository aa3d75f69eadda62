"""The HTTP front: OpenAI- and Anthropic-compatible routes over the in-process runtime API.

`create_app(runtime, settings)` builds the ASGI app; `omlx_actors.server.open_server` serves
it with Hypercorn in the runtime's trio run.
"""

from omlx_actors.http.app import create_app
from omlx_actors.http.exchange import ServerState
from omlx_actors.http.settings import HttpSettings

__all__ = ["HttpSettings", "ServerState", "create_app"]
