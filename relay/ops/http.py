"""The relay's HTTP endpoint: liveness and readiness probes, and Prometheus metrics.

- :class:`HttpEndpoint`: the server of one relay (``http:`` in the config): start, stop,
  and the three pages;
- :class:`Response`: one answer, rendered as HTTP/1.1 with ``Connection: close``.

It runs on the relay's own event loop (``asyncio.start_server``), not in a thread and not
in a web framework: three read-only pages need neither, and a probe answered by the very
loop that moves the mail proves that loop is responsive. The server is small and
defensive, because it may be published to a cluster network: GET and HEAD only, a
request head of at most 8 KiB, one request per connection (``Connection: close``), a
deadline for reading the request and for writing the answer, and a cap on connections.

Connections that have not yet sent their whole request head cannot crowd out a probe:
when a new connection would exceed the cap, one of them is closed to make room (as nginx
does) — of the client address holding the most of them, the one that has waited longest.
Connections being answered are never closed. So a probe that sends its request as it
connects is answered however many idle or trickling connections are open, and a flood
from one address pushes out its own connections before anyone else's. (Only more than
``MAX_CONNECTIONS`` new connections from the probe's own address, between its connecting
and its request arriving, push it out: a flood, which needs a firewall.) Memory stays
bounded: at most ``MAX_CONNECTIONS`` connections, each buffering at most a request head.

``/healthz``  200 ``ok`` while the process and its loop work; 503 if the queue's
              dispatcher died (mail would be accepted and never sent: restart it).
``/readyz``   200 when the relay can take and deliver mail, otherwise 503 and a
              plain-text list of what is not ready (see :mod:`relay.ops.readiness`).
``/metrics``  Prometheus' text format (see :mod:`relay.ops.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from relay.core.net import host_port
from relay.ops.exposition import CONTENT_TYPE
from relay.ops.metrics import RelayMetrics
from relay.ops.readiness import ReadinessCheck
from relay.ops.view import RelayView

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192       # request line + headers; probes and Prometheus send ~200 B
MAX_CONNECTIONS = 32          # open at once; more push out the longest-waiting idle one
_LINGER = 0.5                 # after an error reply, read what the client still sends

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str, **headers: str) -> Response:
        return cls(status, text.encode(), headers=headers)

    def render(self, *, head_only: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}",
                 f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}",
                 f"Date: {email.utils.formatdate(usegmt=True)}",
                 "Cache-Control: no-store",
                 "Connection: close",
                 *(f"{k}: {v}" for k, v in self.headers.items())]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


# --- the server --------------------------------------------------------------------------

_EVICTION_LOG_INTERVAL = 60.0  # seconds between warnings about closed idle connections


@dataclass(eq=False)
class _Connection:
    """One client connection, as the cap on connections sees it."""

    peer: str
    transport: asyncio.WriteTransport
    seq: int                       # arrival order
    waiting: bool = True           # no complete request head yet: may be closed for room
    gone: bool = False             # no longer counted


class _Connections:
    """The open connections of the endpoint, and which one makes room for a new one.

    ``_waiting`` holds the connections without a complete request head per client
    address, oldest first, so that the one to close is found by looking at one
    connection per address.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._waiting: dict[str, dict[_Connection, None]] = {}
        self._seq = itertools.count()
        self._evicted = 0                           # not yet reported in the log
        self._reported_at = -_EVICTION_LOG_INTERVAL

    def open(self, peer: str, transport: asyncio.WriteTransport) -> _Connection | None:
        """Count a new connection in, closing connections that are still waiting for
        their request head as needed to stay within the limit; None (not counted) if
        every other connection is past its request head."""
        conn = _Connection(peer, transport, next(self._seq))
        self._waiting.setdefault(peer, {})[conn] = None
        self.count += 1
        while self.count > self.limit:
            victim = self._victim(conn)
            if victim is None:
                self.close(conn)
                return None
            self.close(victim)
            victim.transport.abort()    # frees it now; its task sees EOF and ends quietly
            self._evicted += 1
        self._report()
        return conn

    def _victim(self, newcomer: _Connection) -> _Connection | None:
        """The oldest waiting connection of the address with the most waiting
        connections (the newcomer counts for its address, but is never the one)."""
        best: tuple[int, int] | None = None
        victim = None
        for conns in self._waiting.values():
            oldest = next((c for c in conns if c is not newcomer), None)
            if oldest is None:
                continue
            key = (len(conns), -oldest.seq)       # most connections, then longest waiting
            if best is None or key > best:
                best, victim = key, oldest
        return victim

    def served(self, conn: _Connection) -> None:
        """``conn`` sent its whole request head: it is answered, never closed for room."""
        if conn.waiting:
            self._forget(conn)

    def close(self, conn: _Connection) -> None:
        """``conn`` is closed or refused: it no longer counts (once, however often called)."""
        if conn.gone:
            return
        conn.gone = True
        self.count -= 1
        if conn.waiting:
            self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        conn.waiting = False
        conns = self._waiting[conn.peer]
        del conns[conn]
        if not conns:
            del self._waiting[conn.peer]

    def _report(self) -> None:
        """A warning now and then, not a line per closed connection: a scan or an attack
        must not flood the log."""
        now = time.monotonic()
        if self._evicted and now - self._reported_at >= _EVICTION_LOG_INTERVAL:
            log.warning("http: closed %d connection(s) that had not sent a complete request, "
                        "to stay within %d connections (idle or slow clients, or a scan)",
                        self._evicted, self.limit)
            self._evicted = 0
            self._reported_at = now


class HttpEndpoint:
    """The HTTP server of one relay (``http:`` in the config)."""

    def __init__(self, relay: RelayView, metrics: RelayMetrics) -> None:
        self._relay = relay
        self._registry = metrics
        self.readiness = ReadinessCheck(relay, metrics)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.connections = _Connections(MAX_CONNECTIONS)
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        settings = self._relay.config.http
        try:
            self._server = await asyncio.start_server(
                self._client, settings.address, settings.port, limit=MAX_REQUEST_HEAD,
                reuse_address=True)
        except OSError as exc:
            where = host_port(settings.address, settings.port)
            # asyncio's own text repeats the address: the system's words say it all.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"cannot listen on {where} for the HTTP "
                                     f"endpoint (http.address, http.port; or http.enabled: "
                                     f"false): {why}") from exc
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        log.info("http endpoint on http://%s (/healthz, /readyz, /metrics)",
                 host_port(settings.address, self.address[1]))

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await server.wait_closed()
        await self.readiness.close()
        self.address = None

    # --- one connection ------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        timeout = self._relay.config.http.request_timeout
        peer = writer.get_extra_info("peername")
        conn = self.connections.open(str(peer[0]) if isinstance(peer, tuple) and peer
                                     else "?", writer.transport)
        try:
            if conn is None:
                await self._send(writer, Response.text(503, "too many connections\n"),
                                 within=1.0)
                return
            try:
                async with asyncio.timeout(timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                await self._send(writer, Response.text(408, "request timeout\n"), within=1.0)
                return
            except asyncio.LimitOverrunError:
                await self._send(writer, Response.text(
                    431, f"request head larger than {MAX_REQUEST_HEAD} bytes\n"), within=1.0)
                await _linger(reader, writer)
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return      # the client went away (or was closed to make room) first
            self.connections.served(conn)
            method, response = await self._dispatch(head)
            await self._send(writer, response, within=timeout, head_only=method == "HEAD")
            if response.status in (400, 405):
                await _linger(reader, writer)
        except Exception:
            log.exception("http: error while serving a request")
        finally:
            if conn is not None:
                self.connections.close(conn)
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: Response, *, within: float,
                    head_only: bool = False) -> None:
        """Write the answer within ``within`` seconds: a client that does not read is dropped."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(within):
                writer.write(response.render(head_only=head_only))
                await writer.drain()

    async def _dispatch(self, head: bytes) -> tuple[str, Response]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
            return "", Response.text(400, "bad request\n")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return method, Response.text(405, "only GET and HEAD\n", Allow="GET, HEAD")
        path = urlsplit(target).path if "://" in target else target.split("?", 1)[0]
        if path == "/healthz":
            return method, self._healthz()
        if path == "/readyz":
            result = await self.readiness.result()
            return method, Response.text(200 if result.ready else 503, result.render())
        if path == "/metrics":
            return method, await self._metrics()
        return method, Response.text(404, "not found: try /healthz, /readyz or /metrics\n")

    def _healthz(self) -> Response:
        if self._relay.queue.failed:
            return Response.text(503, "unhealthy: the queue dispatcher stopped "
                                      "unexpectedly (see the log)\n")
        return Response.text(200, "ok\n")

    async def _metrics(self) -> Response:
        relay = self._relay
        settings = relay.config.http
        await self._registry.refresh(settings.cache_ttl,
                                    wait=min(5.0, settings.request_timeout))
        return Response(200, self._registry.exposition(), content_type=CONTENT_TYPE)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close and read away what the client still sends, briefly, before closing:
    closing a socket with unread input resets the connection, and the client might
    lose the error answer it was just sent."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(_LINGER):
            while await reader.read(MAX_REQUEST_HEAD):
                pass
