"""The HTTP API: ``create_app(orchestrator)``."""

from .app import create_app

__all__ = ["create_app"]
