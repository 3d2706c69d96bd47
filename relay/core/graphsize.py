"""Microsoft Graph's request limit, which a message sent with sendMail must fit.

- :data:`GRAPH_REQUEST_LIMIT`: the largest sendMail request body (the base64 MIME);
- :func:`graph_request_size`: how large a message of a given size is on the way there;
- :func:`too_big_for_graph`: the refusal for a message that does not fit.

The receiving side refuses at DATA what a Graph profile cannot send (and has no SMTP to
fall back to), and the delivering side checks again with the exact header it adds: one
reckoning for both.
"""

from __future__ import annotations

from relay.core.reply import Reply

# "About 4 MB" per request, base64 included (Graph's documentation); a message as MIME
# grows by a third on the way, so about 3 MB of message fits.
GRAPH_REQUEST_LIMIT = 4 * 1024 * 1024


def graph_request_size(message_size: int, added: int = 0) -> int:
    """Bytes of the sendMail request body for a message of ``message_size`` bytes plus
    ``added`` bytes of header the relay puts in front (the envelope's Bcc)."""
    return 4 * -(-(message_size + added) // 3)


def bcc_field_size(recipients: list[str]) -> int:
    """The most a ``Bcc:`` field naming ``recipients`` adds (all of them, each ``<a>`` on
    a line of its own)."""
    return len(b"Bcc: \r\n") + sum(len(r.encode()) + 6 for r in recipients)


NO_FALLBACK = "; the profile has no SMTP fallback (fallback_to_smtp)"


def too_big_for_graph(message_size: int, recipients: list[str], *,
                      refusal: bool = True) -> Reply | None:
    """The 552 for a message to ``recipients`` that Graph cannot take, else None; with
    ``refusal`` it says that no SMTP fallback will take it either."""
    size = graph_request_size(message_size, bcc_field_size(recipients))
    if size <= GRAPH_REQUEST_LIMIT:
        return None
    return Reply(552, f"5.3.4 Message too big for Microsoft Graph: {size:,} bytes as base64, "
                      f"Graph takes {GRAPH_REQUEST_LIMIT:,}" + (NO_FALLBACK if refusal else ""))
