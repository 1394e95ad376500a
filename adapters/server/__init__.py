"""The server side: the service (`WirestateServer`), the same hub as an ASGI app
(`WirestateASGI`), and everything they run."""

from wirestate.adapters.server.service import WirestateServer
from wirestate.adapters.server.transports.asgi import WirestateASGI

__all__ = ["WirestateASGI", "WirestateServer"]
