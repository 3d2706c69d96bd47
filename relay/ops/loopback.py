"""The one request a browser makes back to this machine after a sign-in.

- :class:`LoopbackRedirect`: an HTTP server on 127.0.0.1 that waits for the authorization
  server's answer (a form POST with the code and the state, or a GET with them), answers it
  with a page that says the sign-in is done, and hands the query over.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_PAGE = (b"<!doctype html><title>smtp-oauth-relay</title><p>The sign-in reached "
         b"smtp-oauth-relay; this page can be closed.</p>")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        """response_mode=form_post: the code comes in the body, not in the address (so
        not in the browser's history or a proxy's log)."""
        length = min(int(self.headers.get("Content-Length") or 0), 64 * 1024)
        self._answer(self.rfile.read(length).decode("utf-8", "replace"))

    def do_GET(self) -> None:
        self._answer(urlsplit(self.path).query)

    def _answer(self, form: str) -> None:
        query = {k: v[0] for k, v in parse_qs(form).items()}
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(_PAGE)))
        self.end_headers()
        self.wfile.write(_PAGE)
        if "code" in query or "error" in query:
            self.server.response = query
            self.server.arrived.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(HTTPServer):
    response: dict[str, str] | None = None
    arrived: threading.Event


class LoopbackRedirect:
    """``with LoopbackRedirect(port) as back:`` ``back.uri`` to redirect to, then
    ``back.wait(timeout)`` for the query (None if none came)."""

    def __init__(self, port: int = 0) -> None:
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.arrived = threading.Event()
        self.port = self._server.server_address[1]
        self.uri = f"http://localhost:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> LoopbackRedirect:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait(self, timeout: float) -> dict[str, str] | None:
        self._server.arrived.wait(timeout)
        return self._server.response
