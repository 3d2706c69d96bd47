"""The HTTPS server the HTTP stand-ins (fake Entra ID, fake Graph) run on: threaded, TLS
from the sandbox's certificate, on 127.0.0.1 and a free port.

- :class:`HTTPSServer`: a :class:`~http.server.ThreadingHTTPServer` whose connections are
  TLS, with the stand-in it serves as ``owner`` for the request handlers;
- :class:`JSONHandler`: the base of their request handlers (keep-alive, JSON replies);
- :func:`serve`: start one on a thread of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from relay.sandbox.pki import LocalPKI

log = logging.getLogger(__name__)


class HTTPSServer(ThreadingHTTPServer):
    """Threaded HTTPS server; the TLS handshake runs in the connection's own thread."""

    daemon_threads = True
    owner: Any
    ssl_context: ssl.SSLContext

    def __init__(self, address: tuple[str, int],
                 handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._lock = threading.Lock()
        self._open: set[Any] = set()     # connections being served (keep-alive ones too)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def stop(self, thread: threading.Thread | None) -> None:
        """Stop accepting, end the connections still open (a keep-alive one would
        otherwise linger until its timeout), and wait for the serving thread."""
        self.shutdown()
        with self._lock:
            connections = list(self._open)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(10)
        # Handshake lazily on first read, in the handler thread, so a client that connects
        # and never speaks TLS cannot block the accept loop.
        return self.ssl_context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("%s: connection from %s failed", type(self.owner).__name__, client_address,
                  exc_info=True)


class JSONHandler(BaseHTTPRequestHandler):
    """A stand-in's request handler: keep-alive, as the requests session msal and the
    Graph transport use expects; its requests logged at debug; replies in JSON."""

    protocol_version = "HTTP/1.1"
    server: HTTPSServer
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self.server_version, *args)

    def reply(self, status: int, body: dict[str, Any] | None,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-store, no-cache")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def serve(owner: object, handler: type[BaseHTTPRequestHandler], pki: LocalPKI,
          host: str, name: str) -> tuple[HTTPSServer, threading.Thread]:
    """An :class:`HTTPSServer` for ``owner`` on ``host`` and a free port, serving on a
    daemon thread called ``name``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki.cert_file, pki.key_file)
    server = HTTPSServer((host, 0), handler)
    server.owner, server.ssl_context = owner, ctx
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=name, daemon=True)
    thread.start()
    return server, thread
