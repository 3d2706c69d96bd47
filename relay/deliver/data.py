"""DATA with the message streamed from the spool, dot-stuffed on the way.

- :func:`send_data`: DATA, the message, the final dot and the upstream's verdict, for a
  message of any size in a small, fixed amount of memory; raises ``SMTPDataError`` for a
  refusal, like aiosmtplib's ``SMTP.data``;
- :func:`send_body`: the same from the message on, for a DATA sent in a pipelined group
  (:mod:`relay.deliver.transaction`).

aiosmtplib's ``SMTP.data`` wants the whole message as one bytes object and makes copies of
it (line endings, dot-stuffing), so a 30 MB message would cost about 100 MB. This sends it
a chunk at a time, waiting for the connection to drain in between. It uses aiosmtplib's
protocol object (``execute_command``, ``write``, ``read_response``, and the flow-control
wait ``_drain_helper``, asyncio's own pattern); tests/test_library_contract.py checks they
are there, so an aiosmtplib that changes them fails loudly.
"""

from __future__ import annotations

import contextlib

import aiosmtplib
from aiosmtplib import SMTPDataError, SMTPServerDisconnected, SMTPTimeoutError

from relay.core.message import Content

# The final reply may only come after the whole message went out; allow for a slow link
# (2 Mbit/s) on top of the configured timeout rather than failing big messages.
_DATA_BYTES_PER_SECOND = 250_000
# Bytes of the message handed to the connection at a time; the transport's own buffer
# stays near its high-water mark, so a 30 MB message costs two of these (the one being
# read and the one held back for the next write), not 90 MB.
_DATA_CHUNK = 64 * 1024


async def send_data(smtp: aiosmtplib.SMTP, content: Content,
                    reply_timeout: float) -> aiosmtplib.SMTPResponse:
    """DATA with ``content``; ``reply_timeout`` for each reply, plus the time a slow link
    takes to carry the message for the final one."""
    protocol = smtp.protocol
    if protocol is None:
        raise SMTPServerDisconnected("Connection lost")
    start = await protocol.execute_command(b"DATA", timeout=reply_timeout)
    if start.code != 354:
        raise SMTPDataError(start.code, start.message)
    return await send_body(smtp, content, reply_timeout)


async def send_body(smtp: aiosmtplib.SMTP, content: Content,
                    reply_timeout: float) -> aiosmtplib.SMTPResponse:
    """The message and the final dot, once the upstream answered DATA with 354.

    The content is canonical (relay.core.message), so stuffing is a matter of a dot after
    every CRLF.
    """
    final_timeout = reply_timeout + content.size / _DATA_BYTES_PER_SECOND
    protocol = smtp.protocol
    if protocol is None:
        raise SMTPServerDisconnected("Connection lost")
    at_line_start = True
    last = b"\n"
    held = b""          # the latest chunk, written with the next (or with the final dot)
    try:
        async with contextlib.aclosing(content.chunks(_DATA_CHUNK)) as chunks:
            async for chunk in chunks:
                stuffed = chunk.replace(b"\n.", b"\n..")
                if at_line_start and chunk.startswith(b"."):
                    stuffed = b"." + stuffed
                at_line_start = chunk.endswith(b"\n")
                last = chunk[-1:]
                if held:
                    protocol.write(held)
                    await protocol._drain_helper()
                held = stuffed
        # The last chunk and the final dot in one write: one TLS record and one system
        # call for the usual message, which is a single chunk.
        protocol.write(held + (b".\r\n" if last == b"\n" else b"\r\n.\r\n"))
        response = await protocol.read_response(timeout=final_timeout)
    except (SMTPServerDisconnected, SMTPTimeoutError, ConnectionError):
        smtp.close()
        raise
    if response.code != 250:
        raise SMTPDataError(response.code, response.message)
    return response
