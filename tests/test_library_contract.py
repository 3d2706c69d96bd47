"""What the relay relies on inside aiosmtpd and aiosmtplib, checked against the installed
versions, so that an upgrade that changes it fails here, by name, and not in production.

relay/receive/session.py subclasses aiosmtpd's SMTP protocol (it has no setting for an
asynchronous AUTH check, per-line deadlines or a streamed DATA) and reads a few of its
private attributes; relay/deliver/data.py streams DATA through aiosmtplib's protocol object,
and relay/deliver/pipelining.py subclasses that object and makes it in aiosmtplib's way.
Two shortcuts past aiosmtpd's per-connection costs are checked against aiosmtpd's own
results: relay/receive/setuponce.py (AUTH methods found once per class) and the plain-path
reading in RelaySMTP._getaddr. pyproject.toml bounds both versions to the ranges checked here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import types
from typing import Any

import aiosmtpd.smtp
import aiosmtplib
import aiosmtplib.email
import aiosmtplib.protocol
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.addrspec import PLAIN_DOMAIN, PLAIN_LOCAL, is_plain
from relay.receive import replies as replies_module

# Attributes an aiosmtpd SMTP instance has once constructed, which the session reads.
SMTP_ATTRIBUTES = ("_tls_protocol", "_original_transport",
                   "_handler_coroutine", "_timeout_handle", "_timeout_duration",
                   "_auth_require_tls",
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


def test_aiosmtplib_has_what_the_pipelining_protocol_uses() -> None:
    """relay/deliver/pipelining.py subclasses the protocol (its reply buffer and waiter)
    and repeats SMTP._create_connection, which is where aiosmtplib makes the protocol."""
    import aiosmtplib.email

    protocol = aiosmtplib.protocol.SMTPProtocol
    for name in ("data_received", "_read_response_from_buffer", "_set_response_exception",
                 "connection_made"):
        assert callable(getattr(protocol, name, None)), f"aiosmtplib's {name} is gone"
    loop = asyncio.new_event_loop()
    try:
        made = protocol(loop=loop)
        for name in ("_buffer", "_response_waiter", "_response_pending", "_loop",
                     "transport"):
            assert hasattr(made, name), f"aiosmtplib's protocol has no {name}"
    finally:
        loop.close()
    assert list(inspect.signature(protocol.__init__).parameters) == [
        "self", "loop", "connection_lost_callback"]
    # PipeliningProtocol._reply is read_response waiting its own way; what else it does
    # must still be what aiosmtplib's does.
    reading = inspect.getsource(protocol.read_response)
    for step in ("self._response_pending = True", "self._response_pending = False",
                 "wait_for(self._response_waiter, timeout)", "SMTPReadTimeoutError(",
                 "self._response_waiter = None", "self._loop.create_future()"):
        assert step in reading, f"aiosmtplib's read_response no longer has {step!r}"
    smtp = aiosmtplib.SMTP
    assert list(inspect.signature(smtp._create_connection).parameters) == ["self", "timeout"]
    for name in ("_on_connection_lost", "_get_tls_context", "_get_default_port"):
        assert callable(getattr(smtp, name, None)), f"aiosmtplib's SMTP.{name} is gone"
    client = vars(aiosmtplib.SMTP())
    for name in ("sock", "socket_path", "source_address", "loop", "transport", "use_tls"):
        assert name in client, f"aiosmtplib's SMTP has no {name}"
    source = inspect.getsource(smtp._create_connection)
    assert "SMTPProtocol(" in source and "create_connection(" in source
    assert aiosmtplib.protocol.MAX_RESPONSE_LENGTH <= 64 * 1024
    assert aiosmtplib.protocol.COMMAND_INJECTION_REGEX.search(b"a\x00b")
    assert aiosmtplib.email.quote_address("a@b") == "<a@b>"


def test_the_plain_path_shortcut_reads_addresses_as_aiosmtpd_does() -> None:
    """RelaySMTP reads ``<local@domain>`` itself, without the email package's parser; for
    everything the shortcut takes, the result must be aiosmtpd's own."""
    from relay.receive.session import _PLAIN_PATH, RelaySMTP

    locals_ = ["a", "b1", "x-y", "_", "=", "a.b", "%", "'", "{", "\u00e9", "a..b", ".", "-",
               "a" * 64, "a" * 65, "first.last+tag", "o'brien", "a/b=c"]
    domains = ["b", "b.c", "-b", "b-", "b..c", "b.", "1.2.3.4", "[1.2.3.4]", "b_c",
               "xn--e.com", "\u00e9.com", "example.co.uk"]
    tails = [">", "> ", ">\t", ">  SIZE=1", "> (c)", ">x", "", ">\r\n", "> \x00",
             "> SIZE=100 BODY=8BITMIME", ">(comment) SIZE=1"]
    args = [f"{lead}{local}@{domain}{tail}" for lead in ("<", " <", "<<")
            for local in locals_ for domain in domains for tail in tails]

    async def compare() -> int:
        smtp = RelaySMTP.__new__(RelaySMTP)
        SMTP.__init__(smtp, object(), loop=asyncio.get_running_loop())
        taken = 0
        for arg in args:
            ours = RelaySMTP._getaddr(smtp, arg)
            try:
                theirs = SMTP._getaddr(smtp, arg)
            except (IndexError, ValueError):
                theirs = (None, None)
            assert ours == theirs, arg
            taken += _PLAIN_PATH.match(arg) is not None
        return taken

    assert asyncio.run(compare()) > 500         # the shortcut was really taken


@settings(max_examples=500)
@given(address=st.one_of(
    st.from_regex(rf"{PLAIN_LOCAL}@{PLAIN_DOMAIN}", fullmatch=True),
    st.text(alphabet="ab.@-_+<> \"(),:;[]\\\u00e9", max_size=16)))
def test_a_plain_address_goes_on_the_command_line_as_aiosmtplib_would_write_it(
        address: str) -> None:
    """relay.deliver.transaction writes ``<local@domain>`` itself for a plain address,
    without aiosmtplib's parser (email.utils.parseaddr); it must be what aiosmtplib writes."""
    if not is_plain(address):
        return
    assert aiosmtplib.email.quote_address(address) == f"<{address}>"


def test_commands_and_hooks_are_found_once_per_class_with_the_same_result() -> None:
    """relay.receive.setuponce gives aiosmtpd.smtp a ``dir`` of its own; aiosmtpd must
    call it only for the ``smtp_*`` commands and ``handle_*`` hooks, and find the same."""
    from relay.receive import setuponce
    from relay.receive.handler import RelayHandler
    from relay.receive.session import RelaySMTP

    source = inspect.getsource(aiosmtpd.smtp)
    uses = re.findall(r"\bdir\((\w+)\)\s+if m\.startswith\(['\"](\w+)['\"]\)", source)
    assert sorted(uses) == [("handler", "handle_"), ("self", "smtp_")]
    assert len(re.findall(r"\bdir\(", source)) == 2
    setuponce.install()

    class Handler:
        extra = "not a hook"

        async def handle_DATA(self, *args: object) -> str: ...

    def module_handler() -> object:
        handler = types.ModuleType("handler")
        handler.handle_RCPT = lambda *args: None      # type: ignore[attr-defined]
        return handler

    async def found(smtp_class: type[SMTP], handler: object
                    ) -> tuple[dict[str, object], dict[str, object]]:
        smtp = smtp_class.__new__(smtp_class)
        smtp.smtp_OWN = lambda arg: None        # an instance's own command counts too
        SMTP.__init__(smtp, handler, loop=asyncio.get_running_loop())

        def named(methods: dict[str, Any]) -> dict[str, object]:
            return {n: getattr(m, "__func__", m).__qualname__ for n, m in methods.items()}

        return named(smtp._smtp_methods), named(smtp._handle_hooks)

    for smtp_class, handler in ((SMTP, Handler()), (RelaySMTP, RelayHandler.__new__(
            RelayHandler)), (SMTP, module_handler())):
        fast = asyncio.run(found(smtp_class, handler))
        aiosmtpd.smtp.dir = dir  # type: ignore[attr-defined]
        try:
            slow = asyncio.run(found(smtp_class, handler))
        finally:
            setuponce.install()
        assert fast == slow and {"EHLO", "DATA", "OWN"} <= set(fast[0]), smtp_class
        assert fast[1], handler


def test_a_command_table_binds_what_aiosmtpd_would_have_bound() -> None:
    """RelaySMTP's commands are bound on lookup (setuponce.CommandTable); aiosmtpd must
    only read its table (get, items), and find there what its own table would hold."""
    from relay.receive.session import RelaySMTP

    source = inspect.getsource(aiosmtpd.smtp)
    uses = re.findall(r"self\._smtp_methods(\S*)", source)
    assert sorted(set(uses)) == [".get(arg.upper())", ".get(command)", ".items():", ":"]

    async def tables() -> tuple[dict[str, object], dict[str, object]]:
        smtp = RelaySMTP.__new__(RelaySMTP)
        smtp.smtp_OWN = lambda arg: None        # type: ignore[attr-defined]
        SMTP.__init__(smtp, object(), loop=asyncio.get_running_loop())
        own = {m[5:]: getattr(smtp, m) for m in dir(smtp) if m.startswith("smtp_")}
        table = smtp._smtp_methods
        assert table.get("NOSUCH") is None and "NOSUCH" not in table
        return dict(table.items()), own

    table, own = asyncio.run(tables())
    assert table == own and {"EHLO", "DATA", "AUTH", "OWN"} <= set(table)


def test_auth_mechanisms_are_found_once_per_class_with_the_same_result() -> None:
    """relay.receive.setuponce replaces the ``inspect`` aiosmtpd.smtp calls getmembers
    through; aiosmtpd must use it nowhere else, and find the same mechanisms."""
    from relay.receive import setuponce
    from relay.receive.session import RelaySMTP

    source = inspect.getsource(aiosmtpd.smtp)
    assert source.count("inspect.getmembers(") == 1
    assert re.search(r"inspect\.getmembers\(obj\)\s+if mname\.startswith\(\"auth_\"\)", source)
    assert {m.group(1) for m in re.finditer(r"\binspect\.(\w+)", source)} <= {
        "getmembers", "signature"}
    setuponce.install()
    assert isinstance(aiosmtpd.smtp.inspect, setuponce._Inspect)

    class Handler:
        async def auth_CUSTOM(self, *args: object) -> None: ...

    async def mechanisms(smtp_class: type[SMTP]) -> dict[str, tuple[object, bool]]:
        smtp = smtp_class.__new__(smtp_class)
        SMTP.__init__(smtp, Handler(), loop=asyncio.get_running_loop())
        return {name: (getattr(attr.method, "__func__", attr.method), attr.is_builtin)
                for name, attr in smtp._auth_methods.items()}

    for smtp_class in (SMTP, RelaySMTP):
        fast = asyncio.run(mechanisms(smtp_class))
        aiosmtpd.smtp.inspect = inspect  # type: ignore[attr-defined]
        try:
            slow = asyncio.run(mechanisms(smtp_class))
        finally:
            setuponce.install()
        assert fast == slow and {"PLAIN", "LOGIN", "CUSTOM"} <= set(fast), smtp_class


def test_command_lines_are_masked_when_logged_and_not_looked_at_otherwise(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """setuponce asks the logger before aiosmtpd's sanitized_log masks a line: aiosmtpd
    must call it with a logger's own method, and a line that is logged is still masked."""
    from relay.receive import setuponce

    source = inspect.getsource(aiosmtpd.smtp)
    calls = re.findall(r"sanitized_log\((\w+)\.(\w+),", source)
    assert calls and all(obj == "log" and level in setuponce._LEVELS for obj, level in calls)
    setuponce.install()
    assert aiosmtpd.smtp.sanitized_log is setuponce._sanitized_log
    masked: list[bytes] = []
    mask = aiosmtpd.smtp.sanitize
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize",
                        lambda text: masked.append(text) or mask(text))
    logger = logging.getLogger("mail.log")
    line = b"AUTH PLAIN c2VjcmV0LXBhc3N3b3Jk"
    with caplog.at_level(logging.WARNING, logger="mail.log"):
        aiosmtpd.smtp.sanitized_log(logger.info, "%r >> %r", "peer", line)
    assert masked == [] and not caplog.records
    with caplog.at_level(logging.INFO, logger="mail.log"):
        aiosmtpd.smtp.sanitized_log(logger.info, "%r >> %r", "peer", line)
    assert masked == [line]
    assert "c2VjcmV0" not in caplog.text and "AUTH PLAIN" in caplog.text

