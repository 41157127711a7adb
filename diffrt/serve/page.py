"""The web page at "/": three static files shipped in the package, served with a Content-Security-Policy that
lets the page reach only this server (no CDN, no inline script) and show images from data: URLs."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

FILES = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("diffrt.serve").joinpath("page", name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=f"{FILES[name]}; charset=utf-8", headers=HEADERS)


def add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _file("index.html")

    @app.get("/page/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in FILES:  # a fixed set: no path a client names is ever opened
            return JSONResponse({"detail": f"no page file {name!r}"}, status_code=404)
        return _file(name)
