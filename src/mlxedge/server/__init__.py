"""HTTP front-end over the engine: OpenAI- and Ollama-compatible APIs, health and Prometheus metrics."""

from .app import Limits, create_app

__all__ = ["create_app", "Limits"]
