"""The command line: a thin typer layer over the Python API (`tunesmith.api`)."""

from .commands import app, main

__all__ = ["app", "main"]
