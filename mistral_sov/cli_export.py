"""CLI commands (registered on the main Typer app in cli.py). Heavy imports inside commands only."""

from __future__ import annotations

from .cli import app, command  # noqa: F401
