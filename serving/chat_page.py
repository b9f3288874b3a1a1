"""The chat page: static HTML, CSS and JavaScript shipped in the package (`serving/static/`).

`GET /` answers the page and `GET /chat/{file}` its two assets. No build step and nothing from
another origin: the Content-Security-Policy allows this origin only, so the page works offline and
cannot be made to load or send anything elsewhere. The page is a client of this server's
OpenAI-compatible API (`/v1/...`) like any other: it holds no privileges, so it needs no API key
itself; the key the user types goes with each API call.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
# self only; inline styles stay off too (every style is in chat.css)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def mount_chat_page(app: FastAPI) -> None:
    """Add `GET /` (the page) and `/chat/*` (its assets) to the API app."""
    if not (STATIC / "index.html").is_file():
        raise FileNotFoundError(f"the chat page is missing from the package: {STATIC / 'index.html'}; "
                                "reinstall ctxmem (its serving/static files are package data)")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    app.mount("/chat", _Assets(directory=STATIC), name="chat-assets")


class _Assets(StaticFiles):
    """StaticFiles with the page's security headers on every asset."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response
