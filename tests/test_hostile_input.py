"""Hostile and broken input from clients, end to end: what the relay refuses, what it
normalises, and that what Exchange gets is exactly what the sender policy inspected.

Every message goes through a real relay on loopback (receive -> spool -> queue -> the
fake Exchange), written byte for byte by a raw client, so that line endings and control
bytes arrive as a misbehaving program would send them.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import os
import time
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.sandbox.service import Sandbox
from relay.spool.records import State
from tests.conftest import RelayFactory, address, build_config, wait_until
from tests.test_receive import Client, _close_clients  # noqa: F401  (autouse fixture)

MAILBOX = "relay@contoso.com"
REWRITE = {"delivery": {"synchronous": None}}
REJECT = {"delivery": {"synchronous": None},
          "profiles": {"system": {"sender_policy": "reject"}}}


async def connect(relay: Relay) -> Client:
    client = await Client.connect(address(relay))
    assert client.banner[0] == 220
    await client.ehlo()
    return client


async def send_raw(relay: Relay, raw: bytes, *, sender: str = MAILBOX,
                   rcpts: tuple[str, ...] = ("customer@example.com",)) -> tuple[int, str]:
    """MAIL, RCPT, DATA, then ``raw`` exactly as given (it must end the data itself)."""
    client = await connect(relay)
    try:
        code, text = await client.cmd(f"MAIL FROM:<{sender}>")
        assert code == 250, text
        for rcpt in rcpts:
            code, text = await client.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, text
        code, text = await client.cmd("DATA")
        assert code == 354, text
        client.writer.write(raw)
        await client.writer.drain()
        return await client.reply()
    finally:
        await client.close()


def upstream_view(data: bytes) -> email.message.EmailMessage:
    """The message as a standards-following parser reads the bytes Exchange was given."""
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def senders(data: bytes) -> dict[str, list[str]]:
    msg = upstream_view(data)
    out: dict[str, list[str]] = {}
    for name in ("From", "Sender", "Resent-From", "Resent-Sender"):
        for value in msg.get_all(name, []):
            out.setdefault(name, []).extend(a.addr_spec for a in value.addresses)
    return out


async def delivered(sandbox: Sandbox, n: int = 1) -> list[bytes]:
    await wait_until(lambda: len(sandbox.exchange.messages) >= n)
    return [m.data for m in sandbox.exchange.messages]


def assert_canonical(data: bytes) -> None:
    assert b"\0" not in data
    assert data.replace(b"\r\n", b"").count(b"\r") == 0
    assert data.replace(b"\r\n", b"").count(b"\n") == 0
    assert data.endswith(b"\r\n")


# --- one line model ------------------------------------------------------------------------

async def test_a_bare_cr_cannot_hide_a_from_header_from_reject(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(REJECT)
    raw = (b"From: relay@contoso.com\r\nSubject: x\rFrom: ceo@contoso.com\r\n\r\nhi\r\n"
           b".\r\n")
    code, text = await send_raw(relay, raw)
    assert code == 550 and "ceo@contoso.com is not permitted" in text
    assert sandbox.exchange.messages == []


@pytest.mark.parametrize("hidden", [b"From: ceo@contoso.com", b"Sender: ceo@contoso.com",
                                    b"Resent-From: ceo@contoso.com"])
async def test_a_bare_cr_cannot_smuggle_a_sender_past_rewrite(
        start_relay: RelayFactory, sandbox: Sandbox, hidden: bytes) -> None:
    relay = await start_relay(REWRITE)
    raw = b"From: app@contoso.com\r\nSubject: x\r" + hidden + b"\r\n\r\nhi\r\n.\r\n"
    assert (await send_raw(relay, raw, sender="app@contoso.com"))[0] == 250
    [data] = await delivered(sandbox)
    assert_canonical(data)
    # What Exchange checks Send As against names the mailbox alone (the app's From
    # addresses, the hidden one too, become Reply-To, as rewrite does for any From).
    assert senders(data) == {"From": [MAILBOX]}
    assert upstream_view(data)["Subject"] == "x"


async def test_bare_lf_and_bare_cr_lines_become_crlf(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({**REWRITE, "profiles": {"system": {"sender_policy": "keep"}}})
    raw = (b"From: relay@contoso.com\nSubject: unix\n\nline one\nline two\rline three\r\n"
           b".\r\n")
    assert (await send_raw(relay, raw))[0] == 250
    [data] = await delivered(sandbox)
    assert_canonical(data)
    assert data.split(b"\r\n", 1)[1].startswith(b"Received: ") is False  # one trace field
    assert data.endswith(b"From: relay@contoso.com\r\nSubject: unix\r\n\r\n"
                         b"line one\r\nline two\r\nline three\r\n")


async def test_only_crlf_dot_crlf_ends_the_data(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """The SMTP smuggling forms (a dot line next to a bare LF) are content, and go upstream
    dot-stuffed: a following "MAIL FROM" is text of this message, not a new one."""
    relay = await start_relay({**REWRITE, "profiles": {"system": {"sender_policy": "keep"}}})
    raw = (b"From: relay@contoso.com\r\nSubject: s\r\n\r\nbody\n.\r\n"
           b"MAIL FROM:<ceo@contoso.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
           b"smuggled\r\n.\n\r\n.\r\n")
    code, _ = await send_raw(relay, raw)
    assert code == 250
    [data] = await delivered(sandbox)
    [got] = sandbox.exchange.messages
    assert got.rcpt_tos == ["customer@example.com"]
    assert data.endswith(b"body\r\n.\r\nMAIL FROM:<ceo@contoso.com>\r\n"
                         b"RCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n\r\n")
    assert len(sandbox.exchange.messages) == 1


async def test_a_body_read_in_blocks_keeps_the_line_rules_on_a_live_connection(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """The body is read in blocks: a body that is one 3 MB line, or 3 MB of bare CRs, is
    refused at its end as a line too long, and the next transaction on the same
    connection is read from where that one ended; a large body whose lines start with
    dots, arriving in many segments, reaches Exchange unstuffed and whole."""
    relay = await start_relay({**REWRITE, "server": {"max_message_size": "10MiB"}})
    client = await connect(relay)
    try:
        for body in (b"x" * 3_000_000, b"\r" * 3_000_000):
            for line in ("MAIL FROM:<relay@contoso.com>", "RCPT TO:<customer@example.com>"):
                assert (await client.cmd(line))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            client.writer.write(b"From: relay@contoso.com\r\n\r\n" + body + b"\r\n.\r\n")
            await client.writer.drain()
            code, text = await client.reply()
            assert (code, text.split(" ", 1)[0]) == (500, "5.5.2"), text
        lines = [b".starts with a dot %d" % i if i % 7 == 0 else b"line %d" % i
                 for i in range(40_000)]
        body = b"\r\n".join(lines) + b"\r\n"
        for line in ("MAIL FROM:<relay@contoso.com>", "RCPT TO:<customer@example.com>"):
            assert (await client.cmd(line))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        stuffed = b"".join(b"." + line + b"\r\n" if line.startswith(b".") else line + b"\r\n"
                           for line in lines)
        wire = (b"From: relay@contoso.com\r\nSubject: dots\r\n\r\n" + stuffed
                + b".\r\nNOOP\r\n")
        for start in range(0, len(wire), 9_973):       # many segments, cut anywhere
            client.writer.write(wire[start:start + 9_973])
            await client.writer.drain()
        assert (await client.reply())[0] == 250
        assert (await client.reply())[0] == 250           # the NOOP sent with the data
    finally:
        await client.close()
    [data] = await delivered(sandbox)
    assert data.endswith(b"\r\n\r\n" + body)
    assert len(sandbox.exchange.messages) == 1


async def test_nul_is_refused(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(REWRITE)
    for raw in (b"From: relay@contoso.com\r\nSubject: a\0b\r\n\r\nhi\r\n.\r\n",
                b"From: relay@contoso.com\r\n\r\nbinary \0 body\r\n.\r\n"):
        code, text = await send_raw(relay, raw)
        assert (code, text.split(" ", 1)[0]) == (554, "5.6.0"), text
        assert "NUL" in text
    assert sandbox.exchange.messages == []
    assert list((relay.spool.root / "tmp").iterdir()) == []


async def test_8bit_headers_reach_exchange_as_utf8(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({**REWRITE, "profiles": {"system": {"sender_policy": "keep"}}})
    raw = ("From: relay@contoso.com\r\nSubject: Gr\xfc\xdfe aus K\xf6ln\r\n"
           "X-Utf8: Gr\u00fc\u00dfe\r\n\r\nK\xf6ln\r\n.\r\n")
    await send_raw(relay, raw.encode("latin-1").replace(
        b"Gr\xc3\xbc\xc3\x9fe\r\n\r\n", b"Gr\xc3\xbc\xc3\x9fe\r\n\r\n"))
    [data] = await delivered(sandbox)
    head, body = data.split(b"\r\n\r\n", 1)
    head.decode("utf-8")                             # every header is UTF-8 now
    assert "Subject: Grüße aus Köln" in head.decode("utf-8")
    assert body == b"K\xf6ln\r\n"                    # the body is the sender's business
    [got] = sandbox.exchange.messages
    assert "BODY=8BITMIME" in got.mail_options


async def test_control_characters_in_mail_from_are_refused(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(REWRITE)
    client = await connect(relay)
    for bad in (b"a\rb@contoso.com", b"a\0b@contoso.com", b"a\x01b@contoso.com",
                b"a\x7fb@contoso.com"):
        code, text = await client.cmd(b"MAIL FROM:<" + bad + b">")
        assert (code, text) == (553, "5.1.7 Sender address contains control characters")
    assert await client.cmd("MAIL FROM:<root>") == (250, "2.1.0 Sender OK")   # cron's
    await client.close()


# --- limits --------------------------------------------------------------------------------

def _message(head: bytes) -> bytes:
    return head + b"\r\n\r\nbody\r\n.\r\n"


@pytest.mark.parametrize(("head", "reply"), [
    (b"From: relay@contoso.com\r\nX-Pad: " + b"\r\n a" * 100_000,
     "552 5.3.4 Header section too large (limit 262144 octets)"),
    (b"From: relay@contoso.com\r\n" + b"X-A: b\r\n" * 1001,
     "552 5.3.4 Too many header fields (limit 1000)"),
    (b"".join(b"Received: from h%d\r\n" % i for i in range(51)) + b"From: relay@contoso.com",
     "554 5.4.6 Too many hops (51 Received header fields): a mail loop?"),
    (b"From: " + b", ".join(b"u%d@contoso.com" % i for i in range(101)),
     "552 5.6.0 Message refused: sender header fields name 101 addresses; the limit is 100"),
    (b"From: relay@contoso.com\r\nSender: " + b"x " * 5000,
     "552 5.6.0 Message refused: sender header fields (From, Sender, Resent-From, "
     "Resent-Sender) of 10035 octets exceed the limit of 8192"),
])
async def test_header_limits_are_refused_with_a_clear_reply(
        start_relay: RelayFactory, sandbox: Sandbox, head: bytes, reply: str) -> None:
    relay = await start_relay(REWRITE)
    code, text = await send_raw(relay, _message(head))
    assert f"{code} {text}" == reply
    assert sandbox.exchange.messages == []
    assert list((relay.spool.root / "tmp").iterdir()) == []


async def test_one_pathological_message_does_not_hold_up_other_clients(
        start_relay: RelayFactory) -> None:
    """The reported stall: a From listing 32,000 addresses (630 KB) froze every client for
    15 s. Now it is refused at its size, and the worst message within the limits (sender
    fields at their maximum, which the email package parses slowly) is parsed in a worker
    thread: a new client gets its banner within a second throughout."""
    relay = await start_relay(REWRITE)
    huge = b"From: " + b",\r\n ".join(b"user%05d@example.com" % i for i in range(32_000))
    worst = (b"From: " + b"x " * 1500 + b"\r\nSender: " + b"x " * 1500
             + b"\r\nResent-From: " + b", ".join(b"a%02d@b.c" % i for i in range(99)))
    done = asyncio.Event()
    replies: list[int] = []

    async def pathological() -> None:
        try:
            for _ in range(3):
                replies.append((await send_raw(relay, _message(huge)))[0])
                for _ in range(3):
                    replies.append((await send_raw(relay, _message(worst)))[0])
        finally:
            done.set()

    task = asyncio.create_task(pathological())
    waits: list[float] = []
    while not done.is_set():
        started = time.monotonic()
        client = await Client.connect(address(relay))
        waits.append(time.monotonic() - started)
        assert client.banner[0] == 220
        await client.close()
        await asyncio.sleep(0.02)
    await task
    assert replies[0] == 552 and all(code in (250, 552) for code in replies)
    print(f"banner waits: n={len(waits)} max={max(waits) * 1000:.1f} ms")
    assert len(waits) >= 5 and max(waits) < 1.0, waits


# --- the spool under trouble ---------------------------------------------------------------

async def test_a_failed_write_leaves_nothing_behind_and_the_next_message_goes_through(
        start_relay: RelayFactory, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay.spool import disk
    relay = await start_relay(REWRITE)
    real = disk.write_all
    full = [True]

    def write_all(fd: int, data: bytes) -> None:
        if full[0] and len(data) > 100_000:
            os.write(fd, data[:50_000])         # part of it made it, then the disk was full
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(disk, "write_all", write_all)
    big = b"From: relay@contoso.com\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1000 + b".\r\n"
    code, text = await send_raw(relay, big)
    assert (code, text.split(" ", 1)[0]) == (452, "4.3.1")
    assert list((relay.spool.root / "tmp").iterdir()) == []
    full[0] = False
    assert (await send_raw(relay, big))[0] == 250
    await delivered(sandbox)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
async def test_a_really_full_disk_is_a_452_and_frees_itself(
        tmp_path: Path, sandbox: Sandbox) -> None:
    """A real filesystem of 2 MB: a 3 MB message fills it, is refused with 452, and leaves
    the space it took free again, so the next message is accepted without a restart."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = await asyncio.create_subprocess_exec(
        "mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount),
        stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {err.decode().strip()}")
    try:
        relay = None
        config = sandbox.apply(build_config(REWRITE))
        spool = config.spool.model_copy(update={"directory": mount / "spool",
                                                "on_tmpfs": "warn"})
        relay = Relay(config.model_copy(update={"spool": spool}))
        await relay.start()
        big = b"From: relay@contoso.com\r\n\r\n" + (b"z" * 998 + b"\r\n") * 3000 + b".\r\n"
        code, text = await send_raw(relay, big)
        assert (code, text.split(" ", 1)[0]) == (452, "4.3.1")
        assert list((relay.spool.root / "tmp").iterdir()) == []
        small = b"From: relay@contoso.com\r\n\r\nsmall\r\n.\r\n"
        assert (await send_raw(relay, small))[0] == 250
        await delivered(sandbox)
    finally:
        if relay is not None:
            await relay.stop()
        umount = await asyncio.create_subprocess_exec("umount", "-l", str(mount))
        await umount.wait()


@pytest.mark.parametrize("damage", [{"rcpt_tos": 5}, {"attempts": "x"}, {"id": "../x"},
                                    {"received_at": "nan"}, {"rcpt_tos": []}])
async def test_a_malformed_record_goes_to_corrupt_and_the_rest_is_delivered(
        start_relay: RelayFactory, sandbox: Sandbox, damage: dict[str, Any]) -> None:
    import json

    relay = await start_relay(REWRITE)
    await relay.queue.stop(0)               # write the damaged record with the queue idle
    bad = "BAD000000001"
    meta = {"id": bad, "profile": "system", "mail_from": MAILBOX, "rcpt_tos": ["a@b.c"],
            "size": 4, "received_at": time.time(), **damage}
    (relay.spool.root / "data" / f"{bad}.eml").write_bytes(b"x\r\n")
    (relay.spool.root / "incoming" / f"{bad}.json").write_text(json.dumps(meta))
    relay.queue = type(relay.queue)(relay.spool, relay.deliverer, relay.config,
                                    hooks=relay.metrics)
    await relay.queue.start()
    assert (await send_raw(relay, b"From: relay@contoso.com\r\n\r\nfine\r\n.\r\n"))[0] == 250
    await delivered(sandbox)
    await wait_until(lambda: (relay.spool.root / "corrupt" / f"{bad}.json").exists())
    assert (relay.spool.root / "corrupt" / f"{bad}.eml").exists()
    await wait_until(lambda: relay.spool.count(State.INCOMING)
                     + relay.spool.count(State.ACTIVE) == 0)


async def test_spool_directories_are_private(tmp_path: Path) -> None:
    from relay.spool.store import Spool

    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    (root / "incoming").mkdir(mode=0o777)
    os.chmod(root / "incoming", 0o777)      # as an old version or a umask may have left it
    Spool(root).open(on_tmpfs="warn")
    for path in (root, *root.iterdir()):
        if path.is_dir():
            assert path.stat().st_mode & 0o027 == 0, path


async def test_buffer_memory_is_shared_and_a_data_waits_for_its_share(
        start_relay: RelayFactory, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay.receive import session as session_module

    monkeypatch.setattr(session_module, "BUFFER_WAIT", 0.3)
    # Room for one message at a time: the second DATA waits, then is refused.
    relay = await start_relay({**REWRITE, "server": {"buffer_memory": 1}})
    first, second = await connect(relay), await connect(relay)
    for client in (first, second):
        assert (await client.cmd(f"MAIL FROM:<{MAILBOX}>"))[0] == 250
        assert (await client.cmd("RCPT TO:<a@example.com>"))[0] == 250
    assert (await first.cmd("DATA"))[0] == 354              # holds the budget
    assert await second.cmd("DATA") == (
        452, "4.3.1 Insufficient system resources (too much mail arriving at once); try "
             "again later")
    first.writer.write(b"From: relay@contoso.com\r\n\r\none\r\n.\r\n")
    assert (await first.reply())[0] == 250
    assert (await second.cmd("DATA"))[0] == 354             # its turn now
    second.writer.write(b"From: relay@contoso.com\r\n\r\ntwo\r\n.\r\n")
    assert (await second.reply())[0] == 250
    assert relay.receiver.budget.used == 0
    await delivered(sandbox, 2)
