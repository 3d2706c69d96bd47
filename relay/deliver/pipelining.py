"""RFC 2920 PIPELINING with the upstream: a message's MAIL, RCPT and DATA in one write.

- :class:`UpstreamSMTP`: aiosmtplib's client, connected with the protocol below;
- :class:`PipeliningProtocol`: aiosmtplib's protocol object, able to read the replies to a
  group of commands written at once (:meth:`~PipeliningProtocol.send_group`).

Without pipelining a message costs four round trips to the upstream (MAIL, RCPT, DATA,
the message); with it, two. Against Exchange Online, tens of milliseconds away and
allowing three sessions per mailbox, that is what a mailbox's throughput is made of, and
each round trip saved is also a write and a read fewer on the relay's event loop.

aiosmtplib reads exactly one reply per command: a reply that arrives while none is
awaited is dropped (so that it cannot be paired with the wrong command), and a second
reply that came in the same segment as the first waits unparsed in the buffer until more
data comes. Both are right for one command at a time and wrong for a group, so this
protocol keeps and parses what arrives while the group's replies are still owed, and
only then. aiosmtplib makes its protocol object inside ``SMTP._create_connection``;
:class:`UpstreamSMTP` repeats that method for the host-and-port connection the relay
makes (tests/test_library_contract.py checks the parts of aiosmtplib it relies on).
"""

from __future__ import annotations

import asyncio

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPReadTimeoutError,
    SMTPResponse,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol

_READY = 220


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, which can also read the replies to a group of commands."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._owed = 0          # replies of the current group not yet handed out
        self._overflow = False  # more than a reply's worth arrived ahead of its turn

    def send_group(self, commands: bytes) -> None:
        """Write ``commands`` (whole lines, CRLF-ended, already checked) at once; each of
        the next calls to :meth:`read_response` returns one reply, in order."""
        if self._owed:
            raise RuntimeError("the replies to the previous group were not all read")
        self._owed = commands.count(b"\n")
        self._response_pending = True
        self.write(commands)

    def data_received(self, data: bytes) -> None:
        if self._owed:
            waiter = self._response_waiter
            if waiter is None or not waiter.done():
                # Replies of the group are owed, so this is one, even in the moment
                # between two reads (aiosmtplib would take it for unasked data).
                self._response_pending = True
            elif self._owed > 1:
                # The reply being handed out is parsed; what came with it or after it
                # belongs to the next commands of the group (aiosmtplib would drop it).
                if len(self._buffer) + len(data) > MAX_RESPONSE_LENGTH:
                    self._overflow = True
                    return
                self._buffer.extend(data)
                return
        super().data_received(data)

    async def read_response(  # aiosmtplib's signature
            self, timeout: float | None = None) -> SMTPResponse:  # noqa: ASYNC109
        if not self._owed:
            return await self._reply(timeout)
        waiter = self._response_waiter
        if self._overflow and waiter is not None and not waiter.done():
            self._owed = 0
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        if waiter is not None and not waiter.done() and b"\n" in self._buffer:
            # A reply that came ahead of its turn, with an earlier one.
            try:
                response = self._read_response_from_buffer()
            except Exception as exc:
                self._set_response_exception(waiter, exc)
            else:
                if response is not None:
                    waiter.set_result(response)
        try:
            response = await self._reply(timeout)
        except BaseException:
            self._owed = 0      # the session is of no further use: the caller closes it
            raise
        self._owed -= 1
        return response

    async def _reply(self, timeout: float | None) -> SMTPResponse:  # noqa: ASYNC109
        """aiosmtplib's own read_response, but for how it waits: its ``wait_for`` costs
        a future, a timer and a turn of the event loop even for a reply that is there
        already, as the second and third of a group are. Here a reply that is there is
        taken, and one that is not is awaited with a bare timer that fails the waiter."""
        waiter = self._response_waiter
        if waiter is None:
            raise SMTPServerDisconnected("Connection lost")
        self._response_pending = True
        try:
            if waiter.done() or timeout is None:
                return await waiter
            timer = self._loop.call_later(timeout, _time_out, waiter)
            try:
                return await waiter
            finally:
                timer.cancel()
        finally:
            self._response_pending = False
            # After a disconnection, no new waiter (as aiosmtplib does).
            self._response_waiter = None if self.transport is None \
                else self._loop.create_future()


def _time_out(waiter: asyncio.Future[SMTPResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(SMTPReadTimeoutError("Timed out waiting for server response"))


class UpstreamSMTP(aiosmtplib.SMTP):
    """aiosmtplib's client with :class:`PipeliningProtocol` as its protocol object."""

    protocol: PipeliningProtocol | None

    async def _create_connection(  # aiosmtplib's signature
            self, timeout: float | None) -> SMTPResponse:  # noqa: ASYNC109
        # aiosmtplib's own, for a connection by host and port (the only kind made here).
        if self.loop is None:
            raise RuntimeError("No event loop set")
        if self.sock is not None or self.socket_path is not None:
            raise RuntimeError("UpstreamSMTP connects by host and port only")
        hostname, port = self.hostname or "localhost", self.port or self._get_default_port()
        protocol = PipeliningProtocol(loop=self.loop,
                                      connection_lost_callback=self._on_connection_lost)
        tls_context = await self._get_tls_context() if self.use_tls else None
        connecting = self.loop.create_connection(
            lambda: protocol, host=hostname, port=port, ssl=tls_context,
            server_hostname=hostname if self.use_tls else None,
            ssl_handshake_timeout=timeout if self.use_tls else None,
            local_addr=self.source_address)
        try:
            transport, _ = await asyncio.wait_for(connecting, timeout=timeout)
        except TimeoutError as exc:
            raise SMTPConnectTimeoutError(
                f"Timed out connecting to {hostname} on port {port}") from exc
        except OSError as exc:
            raise SMTPConnectError(
                f"Error connecting to {hostname} on port {port}: {exc}") from exc
        self.protocol = protocol
        self.transport = transport
        try:
            response = await protocol.read_response(timeout=timeout)
        except SMTPServerDisconnected as exc:
            raise SMTPConnectError(
                f"Error connecting to {hostname} on port {port}: {exc}") from exc
        except SMTPTimeoutError as exc:
            raise SMTPConnectTimeoutError("Timed out waiting for server ready message") from exc
        if response.code != _READY:
            raise SMTPConnectResponseError(response.code, response.message)
        return response
