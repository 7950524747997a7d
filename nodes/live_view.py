"""Live view server side (being built)."""

from __future__ import annotations


def register_routes() -> None:
    """Registers the live view's HTTP routes on ComfyUI's server."""
