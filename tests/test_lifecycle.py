"""The relay's lifecycle in process: a refused reload changes nothing, in any stage;
listeners are switched all or nothing; one relay per spool. (Reloads of a real process by
SIGHUP are in test_process.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.config import Config, Listener, SecretRef
from relay.receive import server as receive_server
from relay.sandbox.pki import create_pki
from relay.sandbox.service import Sandbox
from relay.spool.locks import SpoolError
from tests.conftest import build_config, wait_until
from tests.test_end_to_end import MESSAGE, send


def _one_recipient(config: Config, upstream_ca: Path | None = None) -> Config:
    """``config`` with max_recipients 1 and, if given, another CA file for every upstream.
    (Derived from the running config: the sandbox's credentials stay valid.)"""
    upstreams = {name: up.model_copy(update={"ca_file": upstream_ca or up.ca_file})
                 for name, up in config.upstreams.items()}
    server = config.server.model_copy(update={"max_recipients": 1})
    return config.model_copy(update={"server": server, "upstreams": upstreams})


async def test_reload_refused_by_a_later_stage_leaves_the_earlier_ones_alone(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """The receiver's part of a new config is valid, the deliverer's is not (a CA file that
    exists but holds no certificate): nothing may switch, not even the receiver."""
    relay = Relay(sandbox.apply(build_config()))
    await relay.start()
    try:
        not_pem = tmp_path / "ca.pem"
        not_pem.write_text("this is not a certificate\n")
        running = relay.config
        broken = _one_recipient(running, upstream_ca=not_pem)

        assert await relay.reload(lambda: broken) is False
        assert relay.config is running
        # The receiver still takes two recipients (max_recipients is still 500)...
        reply = await send(relay, "app@contoso.com", ["a@example.com", "b@example.com"])
        assert reply.code == 250
        await wait_until(lambda: len(sandbox.exchange.messages) == 1)
        # ...and the deliverer still trusts the sandbox CA: the message went out.
        assert sorted(sandbox.exchange.messages[0].rcpt_tos) == ["a@example.com",
                                                                 "b@example.com"]

        # The same change without the broken CA file is taken, by every stage.
        assert await relay.reload(lambda: _one_recipient(running)) is True
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
            await send(relay, "app@contoso.com", ["a@example.com", "b@example.com"])
        assert info.value.code == 452
    finally:
        await relay.stop()


async def test_one_relay_per_spool(sandbox: Sandbox) -> None:
    """A second relay on the same spool would requeue the first one's messages in
    delivery and deliver them twice: it refuses to start, and says who holds the spool."""
    config = sandbox.apply(build_config())
    first = Relay(config)
    await first.start()
    try:
        second = Relay(config)
        with pytest.raises(SpoolError, match=rf"another relay \(pid {os.getpid()}\)"):
            await second.start()
        assert second.listening == []
        reply = await send(first, "app@contoso.com", ["a@example.com"])  # unharmed
        assert reply.code == 250
    finally:
        await first.stop()
    # Stopped (or killed: the kernel drops the lock), the spool is free again.
    again = Relay(config)
    await again.start()
    await again.stop()


# --- listeners on reload --------------------------------------------------------------------

def with_listeners(config: Config, *listeners: dict[str, Any]) -> Config:
    """``config`` (the running one, so the sandbox's settings stay) with other listeners."""
    server = config.server.model_copy(
        update={"listeners": [Listener(**x) for x in listeners]})
    return config.model_copy(update={"server": server})


@pytest.fixture
def bound_ports(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The port of every listening socket the receiver binds from now on, in order.
    (Ports are left to the kernel: a number picked by a test could be taken meanwhile.)"""
    ports: list[int] = []
    real_listen = receive_server.listen

    def listen(listener: Listener) -> socket.socket:
        sock = real_listen(listener)
        ports.append(sock.getsockname()[1])
        return sock

    monkeypatch.setattr(receive_server, "listen", listen)
    return ports


@contextlib.contextmanager
def port_taken(host: str = "127.0.0.1") -> Iterator[int]:
    """A port that another program listens on."""
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen()
        yield int(s.getsockname()[1])


def accepts(host: str, port: int) -> bool:
    """Whether something listens on host:port (the kernel completes the handshake)."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


async def send_to(host: str, port: int, **kwargs: Any) -> aiosmtplib.SMTPResponse:
    options: dict[str, Any] = {"start_tls": False, "timeout": 30, **kwargs}
    async with aiosmtplib.SMTP(hostname=host, port=port, **options) as client:
        await client.mail("app@contoso.com")
        await client.rcpt("a@example.com")
        return await client.data(MESSAGE)


class Session:
    """A raw SMTP connection, to see what a session offers after EHLO."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, **kwargs: Any) -> Session:
        session = cls(*await asyncio.open_connection(host, port, **kwargs))
        code, _ = await session.reply()
        assert code == 220
        return session

    async def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 5)).decode()
            assert line, f"connection closed after {lines}"
            lines.append(line[4:].strip())
            if line[3:4] != "-":
                return int(line[:3]), lines

    async def cmd(self, line: str) -> tuple[int, list[str]]:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def extensions(self) -> list[str]:
        code, lines = await self.cmd("EHLO app.test")
        assert code == 250
        return lines[1:]

    def close(self) -> None:
        self.writer.transport.abort()


async def test_reload_refused_when_a_new_listener_cannot_be_bound(
        sandbox: Sandbox, caplog: pytest.LogCaptureFixture, bound_ports: list[int]) -> None:
    """Of two new listeners the second finds its port taken: the reload is refused, the
    first is closed again, and the relay goes on with its old listener and config."""
    relay = Relay(sandbox.apply(build_config()))
    await relay.start()
    try:
        before = list(relay.listening)
        running = relay.config
        with port_taken() as taken:
            new = with_listeners(_one_recipient(running), {"port": 0}, {"port": 0},
                                 {"port": taken})
            bound_ports.clear()
            with caplog.at_level(logging.INFO, logger="relay"):
                assert await relay.reload(lambda: new) is False
            assert "reload refused, keeping the running configuration" in caplog.text
            assert f"cannot listen on 127.0.0.1:{taken}" in caplog.text
            assert "configuration reloaded" not in caplog.text
            assert relay.config is running and relay.listening == before
            assert relay.receiver.unbound == []
            [added] = bound_ports                          # bound for the reload...
            assert not accepts("127.0.0.1", added)         # ...and closed again
            # The old listener takes mail, under the old rules (two recipients).
            reply = await send(relay, "app@contoso.com", ["a@example.com", "b@example.com"])
            assert reply.code == 250
        # Once the port is free, the same configuration is taken.
        assert await relay.reload(lambda: new) is True, caplog.text
        assert relay.listening[0] == before[0] and relay.listening[2] == ("127.0.0.1", taken)
        assert len(relay.listening) == 3
        assert (await send_to("127.0.0.1", taken)).code == 250
    finally:
        await relay.stop()


async def test_moving_a_listener_binds_the_new_before_closing_the_old(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay(sandbox.apply(build_config()))
    await relay.start()
    try:
        [(host, port)] = relay.listening
        old_open_when_new_bound: list[bool] = []
        real_listen = receive_server.listen

        def listen(listener: Listener) -> socket.socket:
            sock = real_listen(listener)
            old_open_when_new_bound.append(accepts(host, port))
            return sock

        monkeypatch.setattr(receive_server, "listen", listen)
        session = await Session.open(host, port)          # opened before the move
        moved = with_listeners(relay.config, {"address": "127.0.0.2", "port": 0})
        assert await relay.reload(lambda: moved) is True, caplog.text
        assert old_open_when_new_bound == [True]
        [(new_host, new_port)] = relay.listening
        assert new_host == "127.0.0.2"
        assert not accepts(host, port)
        assert (await send_to(new_host, new_port)).code == 250
        assert (await session.cmd("NOOP"))[0] == 250       # the open session goes on
        session.close()
    finally:
        await relay.stop()


async def test_moving_a_port_to_an_overlapping_address_is_refused_with_the_reason(
        sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    """127.0.0.1:P -> 0.0.0.0:P cannot be bound while the old socket holds P, and binding
    the new one first is the rule: refused, and the log says why and what to do."""
    relay = Relay(sandbox.apply(build_config()))
    await relay.start()
    try:
        [(_, port)] = relay.listening
        wildcard = with_listeners(relay.config, {"address": "0.0.0.0", "port": port})
        assert await relay.reload(lambda: wildcard) is False
        assert relay.listening == [("127.0.0.1", port)]
        assert (await send_to("127.0.0.1", port)).code == 250
    finally:
        await relay.stop()
    assert (f"cannot listen on 0.0.0.0:{port}: Address already in use (held by "
            f"listener 127.0.0.1:{port}, which this configuration removes") in caplog.text
    assert "needs a restart" in caplog.text


async def test_changing_only_options_keeps_the_socket(
        sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """tls, require_tls and synchronous change for new connections on the same socket;
    open sessions keep what they started with."""
    pki = create_pki(tmp_path / "pki")
    tls = {"certificate_file": str(pki.cert_file), "key_file": str(pki.key_file)}
    relay = Relay(sandbox.apply(build_config({"server": {"tls": tls}})))
    await relay.start()
    client_tls = ssl.create_default_context(cafile=str(pki.ca_file))
    sessions: list[Session] = []
    try:
        [(host, port)] = relay.listening
        plain = await Session.open(host, port)
        sessions.append(plain)
        assert "STARTTLS" not in await plain.extensions()

        starttls = with_listeners(relay.config, {"port": 0, "tls": "starttls",
                                                 "require_tls": True})
        with caplog.at_level(logging.INFO, logger="relay"):
            assert await relay.reload(lambda: starttls) is True, caplog.text
        assert relay.listening == [(host, port)]
        assert ("listener 127.0.0.1:0 keeps its socket, new connections get: "
                "tls starttls, require_tls true") in caplog.text
        offered = await Session.open(host, port)
        sessions.append(offered)
        assert "STARTTLS" in await offered.extensions()
        assert (await offered.cmd("MAIL FROM:<app@contoso.com>"))[0] == 530  # require_tls
        assert "STARTTLS" not in await plain.extensions()                    # as before
        assert (await send_to(host, port, start_tls=True, tls_context=client_tls)
                ).code == 250

        # TLS from the first byte is the socket's business too: still the same port.
        implicit = with_listeners(relay.config, {"port": 0, "tls": "implicit"})
        assert await relay.reload(lambda: implicit) is True, caplog.text
        assert relay.listening == [(host, port)]
        assert (await send_to(host, port, use_tls=True, tls_context=client_tls)
                ).code == 250
        assert (await plain.cmd("NOOP"))[0] == 250          # plaintext sessions go on

        back = with_listeners(relay.config, {"port": 0})
        assert await relay.reload(lambda: back) is True, caplog.text
        assert relay.listening == [(host, port)]
        assert (await send_to(host, port)).code == 250
        assert relay.receiver.unbound == []
    finally:
        for session in sessions:
            session.close()
        await relay.stop()


async def test_stop_waits_for_a_reload_in_progress(
        sandbox: Sandbox, bound_ports: list[int]) -> None:
    """Shutdown neither closes listeners under a reload nor lets one bind after it."""
    relay = Relay(sandbox.apply(build_config()))
    await relay.start()
    grown = with_listeners(relay.config, {"port": 0}, {"port": 0})
    bound_ports.clear()
    reloading = asyncio.create_task(relay.reload(lambda: grown))
    await asyncio.sleep(0)
    assert relay._reload_lock.locked()            # the reload is under way...
    await relay.stop()                            # ...and shutdown begins
    assert await reloading is True
    [added] = bound_ports
    assert relay.listening == [] and not accepts("127.0.0.1", added)
    assert await relay.reload(lambda: grown) is False     # none after shutdown
    assert bound_ports == [added]


# --- what a reload says ------------------------------------------------------------------------

def reload_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "relay.app" and r.getMessage().startswith("reload")]


async def test_a_reload_says_what_changed_what_it_applied_and_what_waits_for_a_restart(
        sandbox: Sandbox, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """One line for what took effect, one for what needs a restart, by key; the logging
    settings are among what takes effect at once."""
    caplog.set_level(logging.INFO)
    relay = Relay(sandbox.apply(build_config()))
    await relay.start()
    root = logging.getLogger()
    level = root.level
    try:
        running = relay.config
        changed = build_config({
            "server": {"max_recipients": 1, "event_loop": "asyncio"},
            "profiles": {"sales": {"mailbox": "sales@contoso.com", "credential": "main"}},
            "logging": {"level": "debug"},
            "spool": {"io_threads": 2},
            "http": {"port": 1, "cache_ttl": "1s"},
        })
        users = {n: u for n, u in changed.users.items() if n != "bob"}
        new = sandbox.apply(changed.model_copy(update={"users": users}))
        assert await relay.reload(lambda: new) is True
        assert reload_lines(caplog) == [
            "reload applied: server.max_recipients, users.bob (removed), profiles.sales "
            "(added), logging.level, http.cache_ttl",
            "reload not applied until the relay restarts: server.event_loop, "
            "spool.io_threads, http.port",
        ]
        assert root.level == logging.DEBUG                     # logging.level taken
        assert relay.config.server.max_recipients == 1
        # What waits for a restart stays as it runs, and is named again at the next reload.
        assert relay.config.spool == running.spool and relay.config.http.port == 0
        assert relay.config.server.event_loop == "auto"
        caplog.clear()
        assert await relay.reload(lambda: new) is True
        assert reload_lines(caplog) == [
            "reload not applied until the relay restarts: server.event_loop, "
            "spool.io_threads, http.port"]
        caplog.clear()
        assert await relay.reload(lambda: relay.config) is True
        assert reload_lines(caplog) == ["reload: no setting changed"]
    finally:
        root.setLevel(level)
        await relay.stop()


async def test_a_changed_secret_is_named_never_shown(
        sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    relay = Relay(sandbox.apply(build_config()))
    await relay.start()
    try:
        cred = relay.config.credentials["main"]
        secret = SecretRef(value="an-entirely-new-secret-value")
        new = relay.config.model_copy(update={"credentials": {
            "main": cred.model_copy(update={"client_secret": secret})}})
        assert await relay.reload(lambda: new) is True
        assert reload_lines(caplog) == [
            "reload applied: credentials.main.client_secret"]
        assert "an-entirely-new-secret-value" not in caplog.text
    finally:
        await relay.stop()


async def test_a_refused_reload_in_sandbox_mode_leaves_the_stand_ins_as_they_were(
        tmp_path: Path) -> None:
    """`run --sandbox` reloads through Sandbox.rewrite: the same credential keeps its
    secret (no new token), and a refused reload grants nothing and renews nothing, so
    the running relay goes on getting tokens and sending as before."""
    base = build_config({"profiles": {"system": {"sender_policy": "keep"}}})
    async with Sandbox(tmp_path / "sandbox") as sandbox:
        relay = Relay(sandbox.apply(base), on_reload=sandbox.adopt)
        await relay.start()
        try:
            main = relay.tokens.provider("main")
            await main.get()
            requests = sandbox.entra.token_requests
            assert await relay.reload(lambda: sandbox.rewrite(base)) is True
            assert relay.tokens.provider("main") is main            # credential unchanged
            assert sandbox.entra.token_requests == requests

            granted = build_config({"profiles": {"system": {
                "sender_policy": "keep", "send_as": ["*@contoso.com"]}}})
            with port_taken() as port:
                refused = with_listeners(granted, {"port": 0}, {"port": port})
                assert await relay.reload(lambda: sandbox.rewrite(refused)) is False
            await main.refresh()                   # Entra still knows the running secret
            with pytest.raises(aiosmtplib.SMTPDataError) as denied:
                await send(relay, "app@contoso.com", ["a@example.com"])
            assert denied.value.code == 554                    # no Send As granted yet

            assert await relay.reload(lambda: sandbox.rewrite(granted)) is True
            assert (await send(relay, "app@contoso.com", ["a@example.com"])).code == 250
        finally:
            await relay.stop()
