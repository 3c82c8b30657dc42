"""The operator dashboard at ``/`` (DESIGN §12): server-rendered pages, a token login into a
signed session cookie, CSRF-protected forms. Any JavaScript is vendored under ``static/``."""

from __future__ import annotations

from fastapi import FastAPI


def mount(app: FastAPI) -> None:
    """Add the dashboard's routes and static files to ``app``."""
