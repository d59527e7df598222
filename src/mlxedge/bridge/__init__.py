"""stdio JSON-lines front-end over the engine, for native apps (protocol: docs/bridge.md)."""

from .protocol import EVENTS, PROTOCOL_VERSION, REQUESTS, schema_files
from .stdio import Bridge, run_stdio

__all__ = ["Bridge", "run_stdio", "REQUESTS", "EVENTS", "PROTOCOL_VERSION", "schema_files"]
