"""PIPELINING with the upstream (RFC 2920): MAIL, RCPT and DATA in one write.

Two levels. The protocol object is fed replies cut at every possible place, including
the moment aiosmtplib's own protocol would drop one (a reply arriving after the previous
one was parsed, before its reader ran). The transaction runs against the fake Exchange
over real TLS sockets, with and without PIPELINING offered, and with the refusals that
make a pipelined group end differently from a stepwise one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiosmtplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.deliver.pipelining import PipeliningProtocol, UpstreamSMTP
from relay.deliver.upstream import UpstreamClient
from relay.sandbox.exchange import FakeExchange
from relay.sandbox.pki import LocalPKI, create_pki
from tests.test_upstream import BODY, MAILBOX, client_for, message, token, validate

REPLIES = [b"250 2.1.0 Sender OK\r\n",
           b"250-2.1.5 Recipient OK\r\n250 and a second line\r\n",
           b"550 5.1.10 RESOLVER.ADR.RecipientNotFound\r\n",
           b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"]
GROUP = (b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n")


class _Transport(asyncio.Transport):
    """Keeps what the protocol writes; the test plays the server by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _connected() -> tuple[PipeliningProtocol, _Transport]:
    protocol = PipeliningProtocol(loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    protocol._response_pending = False   # as after the greeting was read
    return protocol, transport


def _expected() -> list[tuple[int, str]]:
    return [(250, "2.1.0 Sender OK"), (250, "2.1.5 Recipient OK\nand a second line"),
            (550, "5.1.10 RESOLVER.ADR.RecipientNotFound"),
            (354, "Start mail input; end with <CRLF>.<CRLF>")]


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(0, len(b"".join(REPLIES))), max_size=6),
       read_between=st.lists(st.booleans(), min_size=7, max_size=7))
def test_replies_are_read_in_order_wherever_the_segments_break(
        cuts: list[int], read_between: list[bool]) -> None:
    """The group's replies come in segments cut anywhere (one segment with all four, a
    reply split across two, a segment ending inside a continuation line); segments
    arrive before the reader asked, while it waits, or right after a reply was handed
    to it and before it ran. Every reply is read once, whole and in order."""
    stream = b"".join(REPLIES)
    points = sorted({0, len(stream), *cuts})
    segments = [stream[a:b] for a, b in itertools.pairwise(points)]

    async def scenario() -> list[tuple[int, str]]:
        protocol, transport = _connected()
        protocol.send_group(GROUP)
        assert transport.written == GROUP
        got: list[tuple[int, str]] = []
        reader: asyncio.Task[aiosmtplib.SMTPResponse] | None = None
        for i, segment in enumerate(segments):
            protocol.data_received(segment)
            if read_between[i] and len(got) < len(REPLIES):
                # Let the reader run now (it may find its reply, or wait for the rest).
                reader = reader or asyncio.ensure_future(protocol.read_response(5))
                await asyncio.sleep(0)
                if reader.done():
                    got.append(tuple(reader.result()))  # type: ignore[arg-type]
                    reader = None
        while len(got) < len(REPLIES):
            reader = reader or asyncio.ensure_future(protocol.read_response(5))
            got.append(tuple(await reader))  # type: ignore[arg-type]
            reader = None
        return got

    assert asyncio.run(scenario()) == _expected()


async def test_a_reply_in_the_gap_aiosmtplib_drops_is_kept() -> None:
    """The second reply arrives after the first was parsed and before its reader ran:
    aiosmtplib's protocol drops data at that moment; a pipelined group needs it."""
    protocol, _ = _connected()
    protocol.send_group(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    reader = asyncio.ensure_future(protocol.read_response(5))
    await asyncio.sleep(0)
    protocol.data_received(b"250 sender ok\r\n")        # the reader's waiter is done
    protocol.data_received(b"250 recipient ok\r\n")     # ... and its task has not run
    assert tuple(await reader) == (250, "sender ok")
    assert tuple(await protocol.read_response(5)) == (250, "recipient ok")


async def test_outside_a_group_unasked_data_is_still_dropped() -> None:
    """What arrives beyond the group's replies, or between commands, is not kept to be
    mistaken for the answer to a later command (aiosmtplib's own rule)."""
    protocol, _ = _connected()
    protocol.send_group(b"RSET\r\n")
    protocol.data_received(b"250 reset\r\n")
    protocol.data_received(b"250 something nobody asked for\r\n")
    assert tuple(await protocol.read_response(5)) == (250, "reset")
    protocol.data_received(b"554 more of it\r\n")
    assert await _noop(protocol, 5) == (250, "noop")


async def test_a_flood_ahead_of_its_turn_is_an_error_not_memory() -> None:
    protocol, _ = _connected()
    protocol.send_group(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    protocol.data_received(b"250 sender ok\r\n")
    for _ in range(100):
        protocol.data_received(b"250-" + b"x" * 4000 + b"\r\n")
    assert len(protocol._buffer) < 64 * 1024
    assert tuple(await protocol.read_response(5)) == (250, "sender ok")
    with pytest.raises(aiosmtplib.SMTPResponseException, match="too long"):
        await protocol.read_response(5)


async def test_a_reply_that_does_not_come_times_out_and_one_that_did_is_not_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read has its own deadline, as aiosmtplib's has; a reply that is there already
    is taken at once, with no timer and no turn of the event loop; a read's timer is
    gone once its reply has come."""
    protocol, _ = _connected()
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []
    call_later = loop.call_later

    def recorded(*args: Any) -> asyncio.TimerHandle:
        timers.append(call_later(*args))
        return timers[-1]

    monkeypatch.setattr(loop, "call_later", recorded)
    protocol.send_group(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    protocol.data_received(b"250 sender ok\r\n")
    reading = protocol.read_response(0.05)
    with pytest.raises(StopIteration) as done:     # finished without suspending
        reading.send(None)
    assert tuple(done.value.value) == (250, "sender ok") and timers == []
    started = loop.time()
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await protocol.read_response(0.05)
    assert 0.04 < loop.time() - started < 2
    assert await _noop(protocol, 0.05) == (250, "noop")
    assert len(timers) == 2 and timers[1].cancelled()


async def _noop(protocol: PipeliningProtocol, deadline: float) -> tuple[int, str]:
    """A NOOP outside any group, its reply arriving while the read waits."""
    protocol._response_pending = True
    protocol.write(b"NOOP\r\n")
    reader = asyncio.ensure_future(protocol.read_response(deadline))
    await asyncio.sleep(0)
    protocol.data_received(b"250 noop\r\n")
    return tuple(await reader)  # type: ignore[return-value]


async def test_a_group_waits_for_the_last_one_to_be_read() -> None:
    protocol, _ = _connected()
    protocol.send_group(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    with pytest.raises(RuntimeError, match="not all read"):
        protocol.send_group(b"RSET\r\n")


# --- against the fake Exchange ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=[True, False], ids=["pipelining", "stepwise"])
async def exchange(request: pytest.FixtureRequest, pki: LocalPKI,
                   tmp_path: Path) -> AsyncIterator[FakeExchange]:
    async with FakeExchange(pki, validate, maildir=tmp_path / "mail",
                            pipelining=request.param) as fake:
        yield fake


@pytest.fixture
def client(exchange: FakeExchange, pki: LocalPKI) -> UpstreamClient:
    return client_for(exchange.host, exchange.port, pki.ca_file)


RCPTS = ["alice@example.com", "bob@example.com", "carol@example.com"]


async def test_the_group_goes_in_one_write_only_when_offered(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    result = await client.send(message(RCPTS), MAILBOX, token())

    assert result.reply.code == 250 and result.accepted == RCPTS
    [got] = exchange.messages
    assert got.data == BODY and got.rcpt_tos == RCPTS
    verbs = [c.split(" ")[0] for c in exchange.commands]
    assert verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "RCPT", "RCPT",
                     "DATA", "QUIT"]
    # Each of MAIL and the three RCPTs arrived with the next command behind it.
    assert exchange.pipelined_commands == (4 if exchange.offer_pipelining else 0)


async def test_partial_refusal_abandons_the_message_whichever_way_it_went(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    """DATA was pipelined and answered 354 before the refusal was read: it cannot be
    taken back with RSET, so the connection is dropped and the upstream discards it."""
    text = "5.1.10 RESOLVER.ADR.RecipientNotFound"
    exchange.fail_next("rcpt", 550, text, recipient="bob@example.com")
    result = await client.send(message(RCPTS), MAILBOX, token())

    assert result.reply.code == 550 and list(result.refused) == ["bob@example.com"]
    assert result.accepted == []
    # The fake saw the connection end in the middle of the message, and kept nothing.
    await asyncio.sleep(0.05)
    assert exchange.messages == []
    if exchange.offer_pipelining:
        assert "DATA" in exchange.commands and "RSET" not in exchange.commands
    else:
        assert "RSET" in exchange.commands and "DATA" not in exchange.commands


async def test_partial_refusal_sends_to_the_rest_when_allowed(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    exchange.fail_next("rcpt", 452, "4.5.3 Too many recipients", recipient="carol@example.com")
    result = await client.send(message(RCPTS), MAILBOX, token(),
                               require_all_recipients=False)
    assert result.reply.code == 250 and result.accepted == RCPTS[:2]
    assert result.refused["carol@example.com"].code == 452
    [got] = exchange.messages
    assert got.rcpt_tos == RCPTS[:2] and got.data == BODY


async def test_a_refused_sender_is_the_verdict_and_the_session_stays_usable(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    exchange.fail_next("mail", 550, "5.7.60 SMTP; Client does not have permissions")
    session = client.session()
    await session.open(MAILBOX, token())
    try:
        first = await session.send_one(message(RCPTS))
        second = await session.send_one(message(["dave@example.com"]))
    finally:
        await session.close()
    assert first.reply.code == 550 and first.reply.enhanced == "5.7.60"
    assert first.refused == {} and first.accepted == []
    assert second.reply.code == 250
    assert [m.rcpt_tos for m in exchange.messages] == [["dave@example.com"]]
    assert exchange.sessions == 1


async def test_421_in_the_middle_of_the_group_ends_the_session(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    exchange.fail_next("rcpt", 421, "4.3.2 Service not available, closing channel",
                       recipient="bob@example.com")
    session = client.session()
    await session.open(MAILBOX, token())
    try:
        result = await session.send_one(message(RCPTS), require_all_recipients=False)
    finally:
        await session.close()
    assert result.reply.code == 421 and result.accepted == []
    assert not session.is_open
    await asyncio.sleep(0.05)
    assert exchange.messages == []


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
async def test_a_connection_lost_in_the_group_is_lost_before_the_message(
        exchange: FakeExchange, client: UpstreamClient, stage: str) -> None:
    """Lost before the message went out: the pool may send it again on a fresh session
    (relay.deliver.lease), which cannot deliver it twice."""
    exchange.drop_next(stage)
    session = client.session()
    await session.open(MAILBOX, token())
    result = await session.send_one(message(RCPTS))
    assert result.reply.code == 451 and not session.is_open
    assert session.stage in ("MAIL FROM", "RCPT TO")


async def test_dry_run_sends_no_data(exchange: FakeExchange, client: UpstreamClient) -> None:
    session = client.session()
    await session.open(MAILBOX, token())
    try:
        result = await session.send_one(message(RCPTS), dry_run=True)
    finally:
        await session.close()
    assert result.reply.code == 250 and "dry run" in result.reply.text
    assert "DATA" not in exchange.commands and "RSET" in exchange.commands
    assert exchange.messages == []


async def test_an_address_that_cannot_go_on_a_command_line_is_refused_locally(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    bad = "bob@exam\x00ple.com"       # passes aiosmtplib's address check
    result = await client.send(message(["alice@example.com", bad]),
                               MAILBOX, token(), require_all_recipients=False)
    assert result.reply.code == 250 and result.accepted == ["alice@example.com"]
    assert result.refused[bad].code == 501
    assert [c for c in exchange.commands if c.startswith("RCPT")] == [
        "RCPT TO:<alice@example.com>"]


async def test_the_relay_connects_with_the_pipelining_protocol(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    session = client.session()
    with mock.patch.object(aiosmtplib.SMTP, "_create_connection",
                           side_effect=AssertionError("aiosmtplib's own was used")):
        await session.open(MAILBOX, token())
    try:
        smtp = session._smtp
        assert isinstance(smtp, UpstreamSMTP)
        assert isinstance(smtp.protocol, PipeliningProtocol)
    finally:
        await session.close()
