"""What the relay relies on inside aiosmtpd and aiosmtplib, checked against the installed
versions, so that an upgrade that changes it fails here, by name, and not in production.

relay/receive/session.py subclasses aiosmtpd's SMTP protocol (it has no setting for an
asynchronous AUTH check, per-line deadlines or a streamed DATA) and reads a few of its
private attributes; relay/upstream.py streams DATA through aiosmtplib's protocol object.
pyproject.toml bounds both versions to the ranges checked here.
"""

from __future__ import annotations

import asyncio
import inspect
import re

import aiosmtpd.smtp
import aiosmtplib
import aiosmtplib.protocol
from aiosmtpd.smtp import SMTP

from relay.receive import replies as replies_module

# Attributes an aiosmtpd SMTP instance has once constructed, which the session reads.
SMTP_ATTRIBUTES = ("_tls_protocol", "_original_transport",
                   "_handler_coroutine", "_timeout_handle", "_auth_require_tls",
                   "command_size_limits", "session", "envelope", "transport",
                   "require_starttls", "tls_context", "loop", "hostname")
# Methods of aiosmtpd's SMTP the session overrides or calls, with the parameters it uses.
SMTP_METHODS = {
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "error"],
    "eof_received": ["self"],
    "data_received": ["self", "data"],
    "push": ["self", "status"],
    "handle_exception": ["self", "error"],
    "smtp_AUTH": ["self", "arg"],
    "smtp_DATA": ["self", "arg"],
    "check_helo_needed": ["self", "helo"],
    "check_auth_needed": ["self", "caller_method"],
    "_create_session": ["self"],
    "_create_envelope": ["self"],
    "_getaddr": ["self", "arg"],
    "_reset_timeout": ["self", "duration"],
    "_timeout_cb": ["self"],
    "_set_post_data_state": ["self"],
}


def test_aiosmtpd_smtp_has_what_the_session_uses() -> None:
    for name, params in SMTP_METHODS.items():
        method = getattr(SMTP, name, None)
        assert method is not None, f"aiosmtpd's SMTP.{name} is gone"
        assert list(inspect.signature(method).parameters)[:len(params)] == params, name

    async def construct() -> SMTP:
        return SMTP(object(), loop=asyncio.get_running_loop())

    smtp = asyncio.run(construct())
    for name in SMTP_ATTRIBUTES:
        assert hasattr(smtp, name), f"aiosmtpd's SMTP no longer sets {name}"
    # The connection's streams, set once the client is connected.
    source = inspect.getsource(SMTP._cb_client_connected)
    assert "self._reader = reader" in source and "self._writer = writer" in source
    # The class attribute the session replaces per connection (it would be shared).
    assert isinstance(SMTP.command_size_limit, int)
    assert isinstance(SMTP.line_length_limit, int)


def test_aiosmtpd_still_gives_the_replies_the_session_rewrites() -> None:
    """The session adds enhanced status codes to these texts of aiosmtpd's: if aiosmtpd
    words them differently, they would go out without one."""
    # Adjacent string literals joined, as Python joins them.
    source = re.sub(r"""['"]\s*\n\s*['"]""", "", inspect.getsource(aiosmtpd.smtp))
    for text in replies_module.ENHANCED_REPLIES:
        _code, _, words = text.partition(" ")
        # "send HELO/EHLO first" is an f-string there: send {helo} first.
        template = re.sub(r"\b[EH][EH]LO\b", "{helo}", words)
        assert words in source or template in source, f"aiosmtpd no longer replies {text!r}"


def test_aiosmtplib_protocol_has_what_the_streamed_data_uses() -> None:
    protocol = aiosmtplib.protocol.SMTPProtocol
    for name in ("execute_command", "write", "read_response", "_drain_helper"):
        assert callable(getattr(protocol, name, None)), f"aiosmtplib's {name} is gone"
    assert "timeout" in inspect.signature(protocol.execute_command).parameters
    assert "timeout" in inspect.signature(protocol.read_response).parameters
    assert "protocol" in vars(aiosmtplib.SMTP())
