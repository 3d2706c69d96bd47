"""The HTTP endpoint: probes, Prometheus metrics, and how it copes with bad clients.

Every relay here runs against the sandbox stand-ins, with the HTTP endpoint on port 0 and
short cache and request timeouts so that changes show within a test's patience.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from prometheus_client.parser import text_string_to_metric_families

from relay.app import Relay
from relay.config import Config
from relay.core.reply import Reply
from relay.ops.http import MAX_CONNECTIONS, _Connections
from relay.ops.metrics import RelayMetrics, _CertificateDates
from relay.sandbox.pki import create_pki
from relay.sandbox.service import Sandbox
from tests.conftest import RelayFactory, address, build_config, wait_until
from tests.test_receive import ipv6_available

HTTP: dict[str, Any] = {"http": {"port": 0, "cache_ttl": "0.1s", "request_timeout": "0.5s"}}
MESSAGE = b"From: app@contoso.com\r\nTo: x@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def with_http(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"http": dict(HTTP["http"])}
    for key, value in (extra or {}).items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


class HttpReply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1]) if lines[0] else 0
        self.headers = {k.lower(): v.strip() for k, _, v in
                        (ln.partition(":") for ln in lines[1:])}

    @property
    def text(self) -> str:
        return self.body.decode()


async def request(relay: Relay, raw: bytes, within: float = 5.0) -> HttpReply:
    """Send ``raw`` bytes and read the answer until the server closes the connection."""
    assert relay.http_address is not None
    host, port = relay.http_address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(within):
            return HttpReply(await reader.read())
    finally:
        writer.close()


async def get(relay: Relay, path: str, method: str = "GET") -> HttpReply:
    return await request(relay, f"{method} {path} HTTP/1.1\r\nHost: relay\r\n"
                                f"User-Agent: test\r\n\r\n".encode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


async def send(relay: Relay, rcpt: str = "x@example.com") -> aiosmtplib.SMTPResponse:
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               timeout=30) as client:
        await client.mail("app@contoso.com")
        await client.rcpt(rcpt)
        return await client.data(MESSAGE)


# --- probes -------------------------------------------------------------------------------

async def test_healthz_answers_ok_on_the_bound_port(start_relay: RelayFactory) -> None:
    relay = await start_relay(with_http())
    assert relay.http_address is not None
    host, port = relay.http_address
    assert host == "127.0.0.1" and port > 0
    reply = await get(relay, "/healthz")
    assert (reply.status, reply.text) == (200, "ok\n")
    assert reply.headers["connection"] == "close"
    assert reply.headers["content-length"] == "3"


async def test_http_can_be_disabled(start_relay: RelayFactory) -> None:
    relay = await start_relay({"http": {"enabled": False}})
    assert relay.http is None and relay.http_address is None


async def test_a_port_in_use_stops_the_start_and_leaves_nothing_bound(
        sandbox: Sandbox) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = Relay(sandbox.apply(build_config({"http": {"port": port}})))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} for the HTTP"):
            await relay.start()
    assert relay.listening == [] and relay.http_address is None
    await relay.stop()


async def test_readyz_is_ready_and_says_why(start_relay: RelayFactory) -> None:
    relay = await start_relay(with_http())
    reply = await get(relay, "/readyz")
    assert reply.status == 200, reply.text
    lines = reply.text.splitlines()
    assert lines[0] == "ready"
    host, port = address(relay)
    assert f"listeners: ok: bound: {host}:{port}" in lines
    assert any(ln.startswith("spool: ok: ") for ln in lines)
    assert any(ln.startswith("credential main: ok: token valid for ") for ln in lines)


async def test_readyz_reports_a_spool_that_cannot_be_written(
        start_relay: RelayFactory) -> None:
    relay = await start_relay(with_http())
    assert (await get(relay, "/readyz")).status == 200
    tmp = relay.spool.root / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("not a directory")        # unwritable even for root
    try:
        await asyncio.sleep(0.15)             # past cache_ttl
        reply = await get(relay, "/readyz")
        assert reply.status == 503
        lines = reply.text.splitlines()
        assert lines[0] == "not ready"
        assert lines[1].startswith("spool: NOT READY: ") and "not writable" in lines[1]
        assert any(ln.startswith("credential main: ok") for ln in lines)
    finally:
        tmp.unlink()
        tmp.mkdir()
    await asyncio.sleep(0.15)
    assert (await get(relay, "/readyz")).status == 200


async def test_readyz_without_a_token_is_503_until_entra_recovers(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    sandbox.entra.fail_next(500, count=1000, retry_after=0)
    relay = await start_relay(with_http({"http": {"cache_ttl": "2s"}}))
    reply = await get(relay, "/readyz")
    assert reply.status == 503
    assert "credential main: NOT READY: no valid token" in reply.text
    assert "answered with HTTP 500" in reply.text
    # Within cache_ttl, probes are answered from the cache: no request reaches Entra ID.
    before = sandbox.entra.token_requests
    for _ in range(10):
        assert (await get(relay, "/readyz")).status == 503
    assert sandbox.entra.token_requests == before
    sandbox.entra.clear_failures()

    async def ready() -> bool:
        return (await get(relay, "/readyz")).status == 200

    deadline = time.monotonic() + 8
    while not await ready():
        assert time.monotonic() < deadline, "not ready after Entra ID recovered"
        await asyncio.sleep(0.2)


async def test_readyz_is_503_while_shutting_down(start_relay: RelayFactory) -> None:
    relay = await start_relay(with_http())
    assert (await get(relay, "/readyz")).status == 200
    await relay.receiver.drain(0)
    reply = await get(relay, "/readyz")
    assert reply.status == 503
    assert "listeners: NOT READY: shutting down" in reply.text
    assert (await get(relay, "/healthz")).status == 200      # alive all the same


async def test_readyz_reports_a_listener_that_stopped_listening(
        start_relay: RelayFactory) -> None:
    """A listening socket closed under the relay (nothing in the relay does that: a reload
    binds new listeners before it closes old ones) is reported, not papered over."""
    relay = await start_relay(with_http())
    assert (await get(relay, "/readyz")).status == 200
    relay.receiver._bound[0].server.close()
    reply = await get(relay, "/readyz")
    assert reply.status == 503
    assert "listeners: NOT READY: not bound: 127.0.0.1:0" in reply.text
    assert (await get(relay, "/healthz")).status == 200      # alive: liveness is the loop


@pytest.mark.skipif(not ipv6_available(), reason="IPv6 loopback (::1) is not available")
async def test_ipv6_endpoints_are_written_in_brackets(start_relay: RelayFactory,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """``::1:2525`` reads as an address without a port: /readyz and the log lines that name
    a listener write ``[::1]:2525``, as the relay's other messages do."""
    caplog.set_level(logging.DEBUG, logger="relay")
    relay = await start_relay(with_http({"server": {"listeners": [
        {"address": "127.0.0.1", "port": 0}, {"address": "::1", "port": 0}]}}))
    (_, v4), (_, v6) = relay.listening
    reply = await get(relay, "/readyz")
    assert f"listeners: ok: bound: 127.0.0.1:{v4}, [::1]:{v6}" in reply.text
    assert f"listening on 127.0.0.1:{v4}, [::1]:{v6}; spool" in caplog.text
    client = aiosmtplib.SMTP(hostname="::1", port=v6, timeout=5)
    await client.connect()
    await client.quit()
    assert "connection: client=::1 listener=[::1]:0" in caplog.text
    relay.receiver._bound[1].server.close()
    reply = await get(relay, "/readyz")
    assert "listeners: NOT READY: not bound: [::1]:0" in reply.text


# --- metrics ------------------------------------------------------------------------------

async def test_metrics_follow_delivered_and_deferred_messages(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(with_http({"delivery": {"retry_initial": "1h"}}))
    reply = await get(relay, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    before = reply.text
    assert value(before, "smtp_relay_messages_received_total", profile="system",
                 reply_class="2xx") == 0
    assert value(before, "smtp_relay_queue_messages", state="deferred") == 0
    assert value(before, "smtp_relay_queue_oldest_message_age_seconds") == 0

    assert (await send(relay)).code == 250                       # delivered at once
    sandbox.exchange.fail_next("mail", 451, "4.3.2 System not accepting network messages")
    reply_text = (await send(relay)).message
    assert "queued" in reply_text                                # deferred, retry in 1 h
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown")
    with pytest.raises(aiosmtplib.SMTPDataError):                # the waiting client's 5xx
        await send(relay, "gone@example.com")
    await asyncio.sleep(0.15)                                    # past cache_ttl
    text = (await get(relay, "/metrics")).text

    assert value(text, "smtp_relay_messages_received_total", profile="system",
                 reply_class="2xx") == 2
    assert value(text, "smtp_relay_messages_received_total", profile="system",
                 reply_class="5xx") == 1
    assert value(text, "smtp_relay_messages_delivered_total", profile="system",
                 reply_class="2xx") == 1
    assert value(text, "smtp_relay_messages_deferred_total", profile="system",
                 reply_class="4xx") == 1
    # The refusal a waiting client was given counts as failed for good, too.
    assert value(text, "smtp_relay_messages_bounced_total", profile="system",
                 reply_class="5xx") == 1
    assert value(text, "smtp_relay_queue_messages", state="deferred") == 1
    assert value(text, "smtp_relay_queue_messages", state="incoming") == 0
    age = value(text, "smtp_relay_queue_oldest_message_age_seconds")
    assert age is not None and 0 <= age < 30
    assert value(text, "smtp_relay_upstream_delivery_seconds_count", reply_class="2xx") == 1
    assert value(text, "smtp_relay_upstream_delivery_seconds_count", reply_class="4xx") == 1
    assert value(text, "smtp_relay_upstream_delivery_seconds_count", reply_class="5xx") == 1
    assert value(text, "smtp_relay_upstream_delivery_seconds_bucket", reply_class="2xx",
                 le="+Inf") == 1
    expires_in = value(text, "smtp_relay_token_expires_in_seconds", credential="main")
    assert expires_in is not None and 3000 < expires_in <= 3600
    token_age = value(text, "smtp_relay_token_age_seconds", credential="main")
    assert token_age is not None and 0 <= token_age < 60
    assert value(text, "smtp_relay_token_errors_total", credential="main") == 0
    assert value(text, "smtp_relay_client_sessions") == 0
    sessions = value(text, "smtp_relay_upstream_sessions", mailbox="relay@contoso.com")
    assert sessions is not None and sessions >= 0
    assert value(text, "smtp_relay_build_info", version=__import__("relay").__version__) == 1
    assert "_created" not in text


async def test_token_errors_are_counted_per_credential(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    sandbox.entra.fail_next(500, count=1000, retry_after=0)
    relay = await start_relay(with_http())
    await wait_until(lambda: relay.metrics._token_errors.labels("main")._value.get() >= 1)
    text = (await get(relay, "/metrics")).text
    errors = value(text, "smtp_relay_token_errors_total", credential="main")
    assert errors is not None and errors >= 1
    assert value(text, "smtp_relay_token_expires_in_seconds", credential="main") is None


async def test_expiry_gauges_for_secret_and_server_certificate(
        sandbox: Sandbox, tmp_path: Path) -> None:
    pki = create_pki(tmp_path / "pki", days=30)
    config = sandbox.apply(build_config(with_http({"server": {
        "tls": {"certificate_file": str(pki.cert_file), "key_file": str(pki.key_file)}}})))
    expires = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=90)
    cred = config.credentials["main"].model_copy(update={"secret_expires": expires})
    relay = Relay(config.model_copy(update={"credentials": {"main": cred}}))
    await relay.start()
    try:
        text = (await get(relay, "/metrics")).text
    finally:
        await relay.stop()
    secret_days = value(text, "smtp_relay_client_secret_expires_in_days", credential="main")
    assert secret_days is not None and 89 < secret_days <= 90
    cert_days = value(text, "smtp_relay_certificate_expires_in_days", source="server.tls")
    assert cert_days is not None and 29 < cert_days <= 30
    assert value(text, "smtp_relay_credential_info", credential="main",
                 kind="client_secret") == 1


def test_certificate_credentials_expiry_from_pem_and_pfx(tmp_path: Path) -> None:
    pki = create_pki(tmp_path / "pki", days=30)
    cert = x509.load_pem_x509_certificate(pki.cert_file.read_bytes())
    key = serialization.load_pem_private_key(pki.key_file.read_bytes(), None)
    pfx = tmp_path / "app.pfx"
    pfx.write_bytes(pkcs12.serialize_key_and_certificates(
        b"app", key, cert, None,  # type: ignore[arg-type]
        serialization.BestAvailableEncryption(b"pfx-pass-123")))
    base = {"tenant_id": "contoso.onmicrosoft.com", "client_id": "c"}
    config = build_config({"credentials": {
        "main": {**base, "client_secret": None, "certificate": {
            "private_key_file": str(pki.key_file),
            "public_certificate_file": str(pki.cert_file)}},
        "pfx": {**base, "certificate": {"pfx_file": str(pfx),
                                         "passphrase": {"value": "pfx-pass-123"}}},
        "thumb": {**base, "certificate": {"private_key_file": str(pki.key_file),
                                           "thumbprint": "AB" * 20}},
    }})
    dates = _CertificateDates().read(config)
    expected = cert.not_valid_after_utc.timestamp()
    assert dates == {"credentials.main.certificate": expected,
                     "credentials.pfx.certificate": expected}


def test_every_relay_has_its_own_registry(sandbox: Sandbox) -> None:
    config: Config = sandbox.apply(build_config(with_http()))
    one, two = Relay(config), Relay(config)       # would clash on a shared registry
    assert isinstance(one.metrics, RelayMetrics)
    one.metrics.received("system", Reply(250, "2.0.0 Ok"))
    one.metrics.received("system", Reply(250, "2.0.0 Ok"))
    text_one = one.metrics.exposition().decode()
    text_two = two.metrics.exposition().decode()
    assert value(text_one, "smtp_relay_messages_received_total", profile="system",
                 reply_class="2xx") == 2
    assert value(text_two, "smtp_relay_messages_received_total", profile="system",
                 reply_class="2xx") == 0


# --- bad clients --------------------------------------------------------------------------

async def test_oversized_request_head_is_refused(start_relay: RelayFactory) -> None:
    relay = await start_relay(with_http())
    raw = b"GET /healthz HTTP/1.1\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n"
    reply = await request(relay, raw)
    assert reply.status == 431
    assert reply.headers["connection"] == "close"


async def test_malformed_and_unsupported_requests(start_relay: RelayFactory) -> None:
    relay = await start_relay(with_http())
    assert (await request(relay, b"HELLO\r\n\r\n")).status == 400
    assert (await request(relay, b"\x16\x03\x01\x02\x00\r\n\r\n")).status == 400
    post = await request(relay, b"POST /metrics HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
    missing = await get(relay, "/admin")
    assert missing.status == 404
    head = await get(relay, "/healthz", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "3"
    query = await get(relay, "/healthz?verbose=1")
    assert query.status == 200


async def test_a_slow_client_is_timed_out(start_relay: RelayFactory) -> None:
    relay = await start_relay(with_http())
    started = time.monotonic()
    reply = await request(relay, b"GET /healthz HTTP/1.1\r\nHost: rel", within=3.0)
    elapsed = time.monotonic() - started
    assert reply.status == 408
    assert 0.4 <= elapsed < 1.5                   # request_timeout is 0.5 s
    # The endpoint still serves everyone else.
    assert (await get(relay, "/healthz")).status == 200


# --- idle, slow and flooding clients ------------------------------------------------------
#
# request_timeout is long here (30 s), so that idle connections are held by the endpoint
# for the whole test: only making room for new connections can free them.

PATIENT = {"http": {"request_timeout": "30s"}}
PROBES = ("/healthz", "/readyz", "/metrics")


async def probe_all(relay: Relay, within: float = 2.0) -> None:
    """Every probe path answers 200, each within ``within`` seconds."""
    for path in PROBES:
        started = time.monotonic()
        reply = await asyncio.wait_for(get(relay, path), within)
        assert reply.status == 200, (path, reply.status, reply.text)
        assert time.monotonic() - started < within


async def open_idle(relay: Relay, count: int, source: str = "127.0.0.1"
                    ) -> list[asyncio.StreamWriter]:
    """``count`` connections that send nothing, opened one after another."""
    assert relay.http_address is not None
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection(*relay.http_address,
                                                  local_addr=(source, 0))
        writers.append(writer)
    return writers


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()


@pytest.mark.parametrize("idle", [40, 1000])
async def test_idle_connections_do_not_starve_the_probes(
        start_relay: RelayFactory, idle: int) -> None:
    relay = await start_relay(with_http(PATIENT))
    assert relay.http is not None
    await probe_all(relay)                        # the token and spool checks are warm
    writers = await open_idle(relay, idle)
    try:
        await asyncio.sleep(0.05)                 # let the endpoint see all of them
        assert relay.http.connections.count <= MAX_CONNECTIONS
        await probe_all(relay, within=1.0)
        # Memory stays bounded: the endpoint holds at most MAX_CONNECTIONS of them.
        assert relay.http.connections.count <= MAX_CONNECTIONS
        assert len(relay.http._clients) <= MAX_CONNECTIONS + 1
    finally:
        close_all(writers)


class Tricklers:
    """Clients that send a request head a byte every ``interval`` seconds and never finish
    it (slowloris). One that is closed connects again after ``reconnect`` seconds."""

    def __init__(self, relay: Relay, count: int, *, source: str = "127.0.0.1",
                 reconnect: float = 0.1, interval: float = 0.02) -> None:
        assert relay.http_address is not None
        self.address = relay.http_address
        self.source, self.reconnect, self.interval = source, reconnect, interval
        self.connections = 0
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._trickle()) for _ in range(count)]

    async def _trickle(self) -> None:
        while not self._stop.is_set():
            writer: asyncio.StreamWriter | None = None
            try:
                _, writer = await asyncio.open_connection(*self.address,
                                                          local_addr=(self.source, 0))
                self.connections += 1
                writer.write(b"GET /healthz HTTP/1.1\r\n")
                while not self._stop.is_set():
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(self.interval)
            except ConnectionError:
                await asyncio.sleep(self.reconnect)
            finally:
                if writer is not None:
                    writer.transport.abort()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_trickling_clients_do_not_starve_the_probes(start_relay: RelayFactory) -> None:
    """Twice as many slowloris clients as there is room for, from the probes' own address,
    each coming back soon after it is closed."""
    relay = await start_relay(with_http(PATIENT))
    assert relay.http is not None
    await probe_all(relay)
    tricklers = Tricklers(relay, 2 * MAX_CONNECTIONS)
    try:
        await wait_until(lambda: tricklers.connections >= 3 * MAX_CONNECTIONS)
        for _ in range(5):
            await probe_all(relay, within=1.0)
            assert relay.http.connections.count <= MAX_CONNECTIONS
    finally:
        await tricklers.stop()


async def test_a_flood_from_one_address_does_not_push_out_another(
        start_relay: RelayFactory) -> None:
    """A probe that is slow to send its request is not closed to make room for a flood
    from another address — idle connections, and tricklers that come back at once when
    closed: room is made at the busiest address."""
    relay = await start_relay(with_http(PATIENT))
    assert relay.http is not None and relay.http_address is not None
    await probe_all(relay)
    reader, writer = await asyncio.open_connection(*relay.http_address)
    flood = await open_idle(relay, 10 * MAX_CONNECTIONS, source="127.0.0.2")
    tricklers = Tricklers(relay, 2 * MAX_CONNECTIONS, source="127.0.0.2", reconnect=0)
    try:
        await wait_until(lambda: tricklers.connections >= 3 * MAX_CONNECTIONS)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        async with asyncio.timeout(1.0):
            reply = HttpReply(await reader.read())
        assert (reply.status, reply.text) == (200, "ok\n")
        assert relay.http.connections.count <= MAX_CONNECTIONS
    finally:
        writer.close()
        close_all(flood)
        await tricklers.stop()


def test_who_makes_room() -> None:
    """The rules of the cap, one by one: the busiest address gives way first, its oldest
    waiting connection first; connections being answered never; the newcomer never."""

    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    conns = _Connections(limit=4)
    opened: dict[str, Any] = {}
    transports: dict[str, Transport] = {}

    def open_(name: str) -> None:                 # "A1": the first connection from A
        transports[name] = Transport()
        opened[name] = conns.open(name[0], transports[name])  # type: ignore[arg-type]

    def aborted() -> set[str]:
        return {name for name, t in transports.items() if t.aborted}

    for name in ("A1", "A2", "B1", "C1"):
        open_(name)
    assert conns.count == 4 and aborted() == set()
    open_("B2")                        # A and B hold two each: A's have waited longer
    assert aborted() == {"A1"}
    conns.served(opened["B1"])         # B1 sent its request: it is being answered
    open_("C2")                        # waiting: A 1, B 1, C 2 (with the newcomer)
    assert aborted() == {"A1", "C1"}
    conns.served(opened["A2"])
    conns.served(opened["B2"])
    open_("D1")                        # waiting: C 1, D 1: C's has waited longer
    assert aborted() == {"A1", "C1", "C2"}
    conns.served(opened["D1"])
    open_("E1")                        # all four are being answered: refused (503)
    assert opened["E1"] is None and conns.count == 4
    conns.close(opened["A2"])
    conns.close(opened["A2"])          # closing twice counts once
    assert conns.count == 3
    open_("E2")
    assert opened["E2"] is not None and conns.count == 4
