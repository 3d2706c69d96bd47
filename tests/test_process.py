"""The relay as a real process: crash, restart, drain, reload and queue commands.

These are the promises an operator relies on and that only a separate process can test:
a 250 survives SIGKILL, SIGTERM drains without losing mail and exits 0, SIGHUP reloads
without dropping clients or the listening socket (and refuses a broken file), and the
``queue`` commands work on the spool of a running relay. See tests/relayproc.py.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import re
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.core.passhash import hash_password
from relay.sandbox.exchange import ReceivedMessage
from tests.relayproc import (
    MAILBOX,
    Harness,
    RelayProcess,
    SendError,
    make_message,
    send_on,
    subject_of,
    wait_for,
)

HarnessFactory = Callable[..., Harness]


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[HarnessFactory]:
    made: list[Harness] = []

    def make(overrides: dict[str, Any] | None = None) -> Harness:
        h = Harness(tmp_path / f"h{len(made)}", overrides)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def h(make_harness: HarnessFactory) -> Harness:
    return make_harness()


def spool_busy(h: Harness) -> bool:
    return any(h.spool_files(s) for s in ("incoming", "active", "deferred"))


def assert_no_secrets(h: Harness, proc: RelayProcess, *extra: str) -> None:
    """Neither the client secret, a password nor any token issued may reach the log."""
    text = proc.log
    tokens = h.fakes.entra.issued_tokens
    assert tokens, "the relay never fetched a token: this check would prove nothing"
    for secret in (h.fakes.client_secret, *extra, *tokens):
        assert secret not in text


def iso(ts: float) -> str:
    """The form `queue list --json` uses for times (ISO 8601, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts))


def ids_in(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {r["id"]: r["state"] for r in rows}


# --- 1. crash: every 250 survives SIGKILL ------------------------------------------------------

@dataclass
class Load:
    """Clients sending a stream of uniquely numbered messages; what got a 250 is recorded."""

    attempted: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    errors_before_kill: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    killed: threading.Event = field(default_factory=threading.Event)
    kill_times: list[float] = field(default_factory=list)   # time.time() of each SIGKILL

    def client(self, port: int, name: str) -> None:
        n = 0
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="app.test",
                              timeout=10) as client:
                while not self.killed.is_set():
                    subject = f"{name}-{n}"
                    n += 1
                    with self.lock:
                        self.attempted.add(subject)
                    send_on(client, subject, body=f"message {subject}\r\n" * 20)
                    with self.lock:
                        self.acked.add(subject)
        except (OSError, smtplib.SMTPException, SendError) as exc:
            if not self.killed.is_set():
                with self.lock:
                    self.errors_before_kill.append(f"{name}: {exc!r}")

    def run_until_killed(self, proc: RelayProcess, cycle: int, clients: int,
                         acks_before_kill: int) -> None:
        self.killed.clear()
        target = len(self.acked) + acks_before_kill
        threads = [threading.Thread(target=self.client, args=(proc.port, f"c{cycle}.{i}"),
                                    daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(self.acked) >= target or self.errors_before_kill, 30,
                     f"{acks_before_kill} acknowledged messages")
        finally:
            # The flag first, so that the clients' connection errors count as expected.
            self.killed.set()
            self.kill_times.append(time.time())
            proc.kill()
            for t in threads:
                t.join(15)
        assert not self.errors_before_kill, self.errors_before_kill


@dataclass
class KillFigures:
    """What one SIGKILL did. ``unfinished``: queue ids of the messages the upstream had
    accepted from the killed process that this process had not logged as delivered - those
    whose data had gone out and whose 250 it had not yet recorded, or had recorded just
    before the kill. ``duplicates``: queue ids of the messages delivered again after it."""

    unfinished: set[str]
    duplicates: set[str]


DELIVERED_RE = re.compile(r"\[([0-9A-F]{12})\] attempt \d+ delivered")
RECEIVED_ID_RE = re.compile(rb"^Received:.*?\bid ([0-9A-F]{12})", re.MULTILINE | re.DOTALL)


def queue_id_of(data: bytes) -> str:
    """The relay's queue id, from the Received field it added."""
    m = RECEIVED_ID_RE.search(data.split(b"\r\n\r\n", 1)[0])
    assert m is not None, data[:300]
    return m.group(1).decode()


def crash_and_recover(h: Harness, *, kills: int, clients: int,
                      acks_per_cycle: int) -> dict[str, Any]:
    load = Load()
    recovered: list[str] = []
    starts: list[float] = []            # when each relay process was started
    for cycle in range(kills):
        starts.append(time.time())
        proc = h.start()
        if cycle:
            recovered += [ln for ln in proc.lines if "spool recovered" in ln]
        load.run_until_killed(proc, cycle, clients, acks_per_cycle)
    starts.append(time.time())
    final = h.start()
    recovered += [ln for ln in final.lines if "spool recovered" in ln]
    wait_for(lambda: load.acked <= set(h.delivered()), 30,
             "every acknowledged message at the upstream")
    wait_for(lambda: not spool_busy(h), 15, "the spool to settle")
    delivered = collections.Counter(h.delivered())
    assert load.acked <= set(delivered)
    assert set(delivered) <= load.attempted, "the upstream got mail nobody sent"
    assert h.spool_files("tmp") == [], "tmp/ must be empty once the relay has settled"
    assert h.spool_files("data") == [], "a delivered message's data must be removed"
    assert list(h.spool.glob("corrupt/*")) == []
    final.terminate()
    assert final.wait(15) == 0
    for proc in h.processes:
        assert_no_secrets(h, proc)
    duplicates = {s: n for s, n in delivered.items() if n > 1}
    # Per kill: what the upstream accepted from the process that was killed, against what
    # that process logged as delivered; a message delivered twice was first delivered by
    # the process that was killed, then again by the next one.
    first: dict[str, ReceivedMessage] = {}
    for msg in h.exchange.messages:
        first.setdefault(subject_of(msg.data) or "", msg)
    per_kill = []
    for i, proc in enumerate(h.processes[:kills]):
        logged = set(DELIVERED_RE.findall(proc.log))
        stored = {queue_id_of(m.data) for m in h.exchange.messages
                  if starts[i] <= m.received_at < starts[i + 1]}
        per_kill.append(KillFigures(
            unfinished=stored - logged,
            duplicates={queue_id_of(first[s].data) for s in duplicates
                        if starts[i] <= first[s].received_at < starts[i + 1]}))
    report = {"acknowledged": len(load.acked), "attempted": len(load.attempted),
              "delivered": len(delivered), "duplicates": sum(n - 1 for n in duplicates.values()),
              "unacknowledged_delivered": len(set(delivered) - load.acked),
              "acknowledged_delivered_times": dict(sorted(collections.Counter(
                  delivered[s] for s in load.acked).items())),
              "per_kill": per_kill}
    print(f"crash test: {report}; recovery: {recovered}")
    return report


def test_sigkill_loses_no_acknowledged_message(h: Harness) -> None:
    report = crash_and_recover(h, kills=1, clients=2, acks_per_cycle=20)
    assert report["acknowledged"] >= 20


@pytest.mark.slow
def test_sigkill_under_load_three_times(h: Harness) -> None:
    report = crash_and_recover(h, kills=3, clients=6, acks_per_cycle=150)
    assert report["acknowledged"] >= 450


@pytest.mark.slow
def test_sigkill_duplicates_are_only_the_messages_in_flight(h: Harness) -> None:
    """A message is delivered twice only if the kill came between the moment its data had
    all gone to the upstream and the moment the relay recorded the upstream's 250 (the
    README's window): at most one message per upstream session, and there are at most
    delivery.mailbox_limits.max_sessions of those per mailbox."""
    max_sessions = h.config["delivery"]["mailbox_limits"]["max_sessions"]
    report = crash_and_recover(h, kills=6, clients=8, acks_per_cycle=120)
    times = report["acknowledged_delivered_times"]
    kills = report["per_kill"]
    print(f"{report['acknowledged']} acknowledged messages delivered 0/1/2 times: "
          f"{times.get(0, 0)}/{times.get(1, 0)}/{times.get(2, 0)}; duplicates per kill: "
          f"{[len(k.duplicates) for k in kills]}; accepted upstream but not yet logged as "
          f"delivered at each kill: {[len(k.unfinished) for k in kills]}")
    assert times.get(0, 0) == 0                                 # none lost
    assert set(times) <= {1, 2}
    assert len(kills) == 6
    for k in kills:
        assert len(k.duplicates) <= max_sessions, kills
        assert k.duplicates <= k.unfinished, kills    # only what was in its last step
    assert report["duplicates"] == sum(len(k.duplicates) for k in kills)


def test_a_port_in_use_is_a_clear_start_up_failure(make_harness: HarnessFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        h = make_harness({"server": {"listeners": [{"address": "127.0.0.1", "port": port}]}})
        proc = h.start(ready=False)
        assert proc.wait(30) == 71                    # EX_OSERR: systemd may retry
    errors = [line.split(" [-] ", 1)[1] for line in proc.lines if " ERROR " in line]
    assert errors == [f"cannot start: cannot listen on 127.0.0.1:{port}: Address already in "
                      f"use (another program has it, `ss -ltnp 'sport = :{port}'` shows which: "
                      "stop it, or change server.listeners.0.port)"]
    assert "Traceback" not in proc.log and "WARNING" not in proc.log


# --- 2. upstream down, then a restart -----------------------------------------------------------

def test_deferred_message_survives_restart_and_goes_out(h: Harness) -> None:
    h.upstream_down()
    proc = h.start()
    mid = proc.send("while the upstream is down")
    assert mid
    rows = wait_for(lambda: [r for r in h.queue_list()
                             if r["state"] == "deferred" and r["attempts"] >= 1], 15,
                    "the message to be deferred")
    assert [r["id"] for r in rows] == [mid]
    assert rows[0]["last_reply"].startswith("4"), rows[0]   # temporary, never a bounce
    assert (h.spool / "data" / f"{mid}.eml").is_file()

    proc.terminate()
    assert proc.wait(15) == 0
    # The queue commands work on the spool of a stopped relay too.
    [row] = h.queue_list()
    assert (row["id"], row["state"]) == (mid, "deferred")

    h.upstream_up()                                    # a new port: the config is rewritten
    proc = h.start()
    wait_for(lambda: "while the upstream is down" in h.delivered(), 20, "delivery after restart")
    wait_for(lambda: h.queue_list() == [], 10, "an empty queue")
    assert not (h.spool / "data" / f"{mid}.eml").exists()
    [msg] = h.exchange.messages
    assert msg.mailbox == MAILBOX
    assert msg.rcpt_tos == ["someone@example.com"]
    proc.terminate()
    assert proc.wait(15) == 0


# --- 3. SIGTERM drains ---------------------------------------------------------------------------

def test_sigterm_lets_the_open_transaction_finish(h: Harness) -> None:
    proc = h.start()
    client = proc.connect()
    try:
        assert client.mail("app@contoso.com")[0] == 250
        assert client.rcpt("someone@example.com")[0] == 250
        mark = proc.mark()
        proc.terminate()
        proc.wait_for_log(r"\bstopping\b", 10, since=mark)

        # A new client is told to come back later (421), never refused with 5xx.
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", proc.port, timeout=10)
        assert refused.value.smtp_code == 421
        assert b"shutting down" in refused.value.smtp_error
        assert proc.alive

        # The client in the middle of a transaction gets to finish it.
        code, text = client.data(make_message("sent during shutdown"))
        assert code == 250, text
        mid = re.search(rb"queued as (\w+)", text)
        assert mid is not None
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()                            # the relay may say 421 and close first
    started = time.monotonic()
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 5                 # delivery.shutdown_timeout
    # Never lost: delivered during the drain, or still in the spool for the next start.
    delivered = "sent during shutdown" in h.delivered()
    queued = mid.group(1).decode() in ids_in(h.queue_list())
    assert delivered or queued
    assert not (delivered and queued)


def test_sigterm_does_not_wait_forever_for_a_stalled_client(
        make_harness: HarnessFactory) -> None:
    h = make_harness({"delivery": {"shutdown_timeout": "1s"}})
    proc = h.start()
    client = proc.connect()
    try:
        assert client.mail("app@contoso.com")[0] == 250
        assert client.rcpt("someone@example.com")[0] == 250
        started = time.monotonic()
        proc.terminate()                              # ...and the client never sends DATA
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 4
        try:
            code, _ = client.docmd("DATA")
        except smtplib.SMTPServerDisconnected:
            code = 421
        assert code == 421                            # told, not left hanging
    finally:
        client.close()
    assert "stopping" in proc.log
    assert h.queue_list() == []                       # nothing was acknowledged, nothing kept


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
def test_signals_during_the_drain_do_not_kill_the_relay(h: Harness, sig: int) -> None:
    proc = h.start()
    client = proc.connect()
    try:
        assert client.mail("app@contoso.com")[0] == 250
        assert client.rcpt("someone@example.com")[0] == 250
        mark = proc.mark()
        proc.terminate()
        proc.wait_for_log(r"\bstopping\b", 10, since=mark)
        time.sleep(0.3)                               # well into the drain
        proc.signal(sig)
        time.sleep(0.3)
        assert proc.alive
        code, _ = client.data(make_message("finished after a stray signal"))
        assert code == 250
    finally:
        client.close()
    assert proc.wait(10) == 0


# --- 4. SIGHUP reloads ---------------------------------------------------------------------------

def test_sighup_applies_a_good_config_without_dropping_anything(h: Harness) -> None:
    proc = h.start()
    port = proc.port
    before = proc.connect()                          # opened before the reload
    try:
        h.config["users"] = {"carol": {"password_hash": hash_password("carol-password-1",
                                                                      ln=10)}}
        h.config["profiles"]["system"]["mailbox"] = "relay2@contoso.com"
        h.write_config()
        mark = proc.mark()
        proc.hup()
        proc.wait_for_log("configuration reloaded", 10, since=mark)

        # The new account works, on the same port, and new mail uses the new mailbox.
        assert proc.send("from carol", login=("carol", "carol-password-1"))
        wait_for(lambda: "from carol" in h.delivered(), 10, "carol's message")
        [carol] = [m for m in h.exchange.messages if b"Subject: from carol" in m.data]
        assert carol.mailbox == "relay2@contoso.com"

        # The connection from before the reload is still open and usable. (Where its mail
        # goes is test_mail_accepted_before_a_mailbox_change_is_delivered's business.)
        assert send_on(before, "on the old connection")
        assert before.noop()[0] == 250
    finally:
        before.close()
    assert proc.port == port
    assert len([ln for ln in proc.lines if "listening on" in ln]) == 1
    after = proc.lines[mark:]
    assert not [ln for ln in after if "Traceback" in ln or "cannot listen" in ln], after
    assert not [ln for ln in after if " ERROR " in ln and "SendAsDenied" not in ln], after
    assert proc.alive
    assert_no_secrets(h, proc, "carol-password-1")


def test_mail_accepted_before_a_mailbox_change_is_delivered(
        make_harness: HarnessFactory) -> None:
    h = make_harness(QUEUE_HOLDS)
    h.upstream_down()
    proc = h.start()
    proc.send("queued before the change")
    wait_for(lambda: [r for r in h.queue_list() if r["state"] == "deferred"], 10,
             "the message to be deferred")
    session = proc.connect()                          # a client connected before the change
    try:
        h.config["profiles"]["system"]["mailbox"] = "relay2@contoso.com"
        h.upstream_up()
        mark = proc.mark()
        proc.hup()
        proc.wait_for_log("configuration reloaded", 10, since=mark)
        send_on(session, "sent on a session opened before the change")
    finally:
        session.close()
    proc.usr1()
    wait_for(lambda: not spool_busy(h), 10, "the queue to empty")
    assert "queued before the change" in h.delivered()
    assert "sent on a session opened before the change" in h.delivered()
    assert "SendAsDenied" not in proc.log


@pytest.mark.parametrize(("breakage", "problem"), [
    (lambda h: h.write_raw("server: [unclosed\n"), r"invalid YAML: line \d+"),
    (lambda h: (h.config["delivery"].update(retry_intial="1s"), h.write_config()),
     r"delivery\.retry_intial: unknown setting"),
], ids=["invalid-yaml", "unknown-key"])
def test_sighup_refuses_a_broken_config_and_keeps_running(
        h: Harness, breakage: Callable[[Harness], object], problem: str) -> None:
    proc = h.start()
    good = copy.deepcopy(h.config)
    breakage(h)
    mark = proc.mark()
    proc.hup()
    proc.wait_for_log("reload refused", 10, since=mark)
    wait_for(lambda: re.search(problem, "\n".join(proc.lines[mark:])), 5,
             f"the log to name the problem ({problem})")
    time.sleep(0.2)
    assert proc.alive

    # Still running, with the old configuration.
    assert proc.send("after a refused reload")
    wait_for(lambda: "after a refused reload" in h.delivered(), 10, "delivery")
    assert h.exchange.messages[-1].mailbox == MAILBOX
    assert "configuration reloaded" not in "\n".join(proc.lines[mark:])

    # Once the file is fixed, the next SIGHUP takes it.
    h.config = good
    h.write_config()
    mark = proc.mark()
    proc.hup()
    proc.wait_for_log("configuration reloaded", 10, since=mark)
    proc.terminate()
    assert proc.wait(15) == 0


def ehlo_extensions(client: smtplib.SMTP) -> set[str]:
    code, _ = client.ehlo()
    assert code == 250
    return set(client.esmtp_features)


def test_sighup_refuses_a_listener_whose_port_is_taken(h: Harness) -> None:
    """The new config adds a listener on a port another program holds: the reload is
    refused as a whole (the mailbox change too), the old listener goes on taking mail, and
    the log says so. Once the port is free, the same file is taken."""
    proc = h.start()
    port = proc.port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        h.config["server"]["listeners"].append({"address": "127.0.0.1", "port": busy})
        h.config["profiles"]["system"]["mailbox"] = "relay2@contoso.com"
        h.write_config()
        mark = proc.mark()
        proc.hup()
        proc.wait_for_log("reload refused, keeping the running configuration", 10,
                          since=mark)
        proc.wait_for_log(f"cannot listen on 127.0.0.1:{busy}: Address already in use", 5,
                          since=mark)
        assert proc.alive
        assert proc.send("after the refused reload")
        wait_for(lambda: "after the refused reload" in h.delivered(), 10, "delivery")
        assert h.exchange.messages[-1].mailbox == MAILBOX         # the old config runs
        assert "configuration reloaded" not in "\n".join(proc.lines[mark:])

    mark = proc.mark()
    proc.hup()
    proc.wait_for_log("configuration reloaded", 10, since=mark)
    assert proc.port == port
    with smtplib.SMTP("127.0.0.1", busy, local_hostname="app.test", timeout=10) as client:
        send_on(client, "on the added listener")
    assert proc.send("on the first listener")
    wait_for(lambda: {"on the added listener", "on the first listener"} <= set(h.delivered()),
             10, "delivery through both listeners")
    assert h.exchange.messages[-1].mailbox == "relay2@contoso.com"
    proc.terminate()
    assert proc.wait(15) == 0


def test_sighup_moves_a_listener_to_another_address(h: Harness) -> None:
    proc = h.start()
    before = proc.connect()
    try:
        h.config["server"]["listeners"] = [{"address": "127.0.0.2", "port": 0}]
        h.write_config()
        mark = proc.mark()
        proc.hup()
        port = int(proc.wait_for_log(r"configuration reloaded; SMTP listeners: "
                                     r"127\.0\.0\.2:(\d+)$", 10, since=mark).group(1))
        after = "\n".join(proc.lines[mark:])
        assert "listener 127.0.0.2:0 added" in after
        assert "listener 127.0.0.1:0 closed" in after
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proc.port), timeout=5).close()
        with smtplib.SMTP("127.0.0.2", port, local_hostname="app.test",
                          timeout=10) as client:
            send_on(client, "on the new address")
        send_on(before, "on a connection from before the move")
    finally:
        before.close()
    wait_for(lambda: {"on the new address", "on a connection from before the move"}
             <= set(h.delivered()), 10, "both messages")
    proc.terminate()
    assert proc.wait(15) == 0


def test_sighup_changing_only_options_keeps_the_socket(h: Harness) -> None:
    tls = {"certificate_file": str(h.fakes.pki.cert_file),
           "key_file": str(h.fakes.pki.key_file)}
    h.config["server"]["tls"] = tls
    h.write_config()
    proc = h.start()
    before = proc.connect()
    try:
        assert "starttls" not in ehlo_extensions(before)
        h.config["server"]["listeners"] = [{"address": "127.0.0.1", "port": 0,
                                            "tls": "starttls"}]
        h.write_config()
        mark = proc.mark()
        proc.hup()
        proc.wait_for_log("configuration reloaded", 10, since=mark)
        assert "listener 127.0.0.1:0 keeps its socket, new connections get: tls starttls" \
            in "\n".join(proc.lines[mark:])
        with proc.connect() as client:                      # the same port
            assert "starttls" in ehlo_extensions(client)
        assert "starttls" not in ehlo_extensions(before)   # a session keeps its options
        send_on(before, "on the session from before")
    finally:
        before.close()
    wait_for(lambda: "on the session from before" in h.delivered(), 10, "delivery")
    assert not [ln for ln in proc.lines if "cannot listen" in ln or "Traceback" in ln]
    proc.terminate()
    assert proc.wait(15) == 0


# --- 5. queue commands against a running relay ---------------------------------------------------

# Failed attempts wait an hour, so deferred messages stay put while the commands run.
QUEUE_HOLDS = {"delivery": {"retry_initial": "1h", "retry_max": "1h",
                            "mailbox_limits": {"max_sessions": 10}}}


def test_queue_commands_on_a_running_relay(make_harness: HarnessFactory) -> None:
    h = make_harness(QUEUE_HOLDS)
    h.upstream_down()
    proc = h.start()
    ids = {name: proc.send(f"queued {name}") for name in "ABCD"}
    a, b, c, d = (ids[n] for n in "ABCD")
    wait_for(lambda: sum(r["state"] == "deferred" and r["attempts"] == 1
                         for r in h.queue_list()) == 4, 10, "four deferred messages")

    res = h.queue("list")
    assert res.returncode == 0, res.stderr
    for mid in ids.values():
        assert re.search(rf"^{mid}\s+\d+ \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d deferred ",
                         res.stdout, re.M), res.stdout
    assert re.search(r"^-- \d+ KiB in 4 messages\.$", res.stdout, re.M), res.stdout

    res = h.queue("show", a, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["id"] == a and info["state"] == "deferred"
    assert "Subject: queued A" in info["headers"]
    assert "hello" not in info["headers"]               # headers only, not the body

    res = h.queue("hold", a)
    assert res.returncode == 0, res.stderr
    res = h.queue("delete", b)
    assert res.returncode == 0, res.stderr
    states = ids_in(h.queue_list())
    assert states == {a: "hold", c: "deferred", d: "deferred"}
    assert not (h.spool / "data" / f"{b}.eml").exists()

    # Operator mistakes: exit 1 and a message that says what is wrong.
    res = h.queue("hold", "0123456789AB")
    assert res.returncode == 1
    assert "no message 0123456789AB in the queue" in res.stderr
    res = h.queue("release", c)
    assert res.returncode == 1
    assert f"{c} is in deferred" in res.stderr
    res = h.queue("delete", b)
    assert res.returncode == 1
    assert "no message" in res.stderr
    assert h.queue("hold").returncode == 2                        # no id: usage error

    # The upstream comes back (on a new port: SIGHUP picks up the rewritten config).
    h.upstream_up()
    mark = proc.mark()
    proc.hup()
    proc.wait_for_log("configuration reloaded", 10, since=mark)

    res = h.queue("retry", c)
    assert res.returncode == 0, res.stderr
    assert "will be retried now" in res.stdout
    [row] = [r for r in h.queue_list() if r["id"] == c]
    assert row["next_attempt"] <= iso(time.time() + 1), row      # due now, not in an hour
    res = h.queue("flush")
    assert res.returncode == 0, res.stderr
    assert re.match(r"[01] deferred message\(s\) due now", res.stdout), res.stdout
    for row in h.queue_list():
        if row["state"] == "deferred":
            assert row["next_attempt"] <= iso(time.time() + 1), row

    proc.usr1()
    wait_for(lambda: {"queued C", "queued D"} <= set(h.delivered()), 5,
             "prompt delivery after SIGUSR1")
    time.sleep(0.5)
    assert ids_in(h.queue_list()) == {a: "hold"}        # held: not delivered
    assert "queued A" not in h.delivered()

    res = h.queue("release", a)
    assert res.returncode == 0, res.stderr
    proc.usr1()
    wait_for(lambda: "queued A" in h.delivered(), 5, "the released message")
    wait_for(lambda: h.queue_list() == [], 5, "an empty queue")
    assert sorted(h.delivered()) == ["queued A", "queued C", "queued D"]   # never B
    proc.terminate()
    assert proc.wait(15) == 0


class BlackHole:
    """An upstream that accepts TCP connections and never says a word (a hung server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def test_queue_refuses_a_message_being_delivered(make_harness: HarnessFactory) -> None:
    hole = BlackHole()
    try:
        h = make_harness({"upstreams": {"exchange": {"port": hole.port, "timeout": "30s"}},
                          "delivery": {"shutdown_timeout": "1s"}})
        proc = h.start()
        mid = proc.send("stuck in delivery")
        wait_for(lambda: (h.spool / "active" / f"{mid}.json").exists(), 10,
                 "the message to be in active/")
        for action in ("hold", "delete", "retry"):
            res = h.queue(action, mid)
            assert res.returncode == 1, (action, res.stdout)
            assert f"{mid} is being delivered right now" in res.stderr
        assert ids_in(h.queue_list()) == {mid: "active"}

        # SIGTERM with an attempt hanging: exit 0 after shutdown_timeout, mail kept.
        started = time.monotonic()
        proc.terminate()
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 5
        assert ids_in(h.queue_list()) == {mid: "active"}
    finally:
        hole.close()
    h.config["upstreams"]["exchange"].update(port=h.exchange.port, timeout="10s")
    h.write_config()
    proc = h.start()
    wait_for(lambda: "stuck in delivery" in h.delivered(), 15, "delivery after the restart")
    assert any("requeued 1" in ln for ln in proc.lines), proc.log
    proc.terminate()
    assert proc.wait(15) == 0


def test_queue_flush_on_a_stopped_relay(make_harness: HarnessFactory) -> None:
    """flush works without the relay, and what `queue list` says is what the relay does."""
    h = make_harness(QUEUE_HOLDS)
    h.upstream_down()
    proc = h.start()
    mid = proc.send("to be flushed")
    wait_for(lambda: ids_in(h.queue_list()).get(mid) == "deferred", 10, "a deferral")
    proc.terminate()
    assert proc.wait(15) == 0
    res = h.queue("flush")
    assert res.stdout.startswith("1 deferred message(s) due now"), res.stdout
    [row] = h.queue_list()
    assert row["next_attempt"] <= iso(time.time() + 1), row
    h.upstream_up()
    proc = h.start()                    # due now: the first scan after start sends it
    wait_for(lambda: "to be flushed" in h.delivered(), 5, "the flushed message")


def test_a_burst_over_the_session_limit_goes_out_promptly(
        make_harness: HarnessFactory) -> None:
    """Mail over the per-mailbox session limit waits in active/ for a session (the pool's
    queue, first come first served), and goes as each one frees: never a second session."""
    h = make_harness({"delivery": {"mailbox_limits": {"max_sessions": 1}}})
    proc = h.start()
    proc.wait_for_log("token for credential main acquired", 10)
    with h.exchange.frozen():                 # the first attempt holds the only session
        proc.send("burst 0")
        wait_for(lambda: h.spool_files("active"), 5, "the first attempt")
        for i in (1, 2, 3):
            proc.send(f"burst {i}")
        wait_for(lambda: len(h.spool_files("active")) == 4, 5, "the others to wait")
        assert not h.spool_files("deferred")
    started = time.monotonic()
    wait_for(lambda: len(h.delivered()) == 4, 5, "the whole burst")
    print(f"burst delivered {time.monotonic() - started:.2f} s after the upstream answered")
    assert h.exchange.current is not None
    assert h.exchange.current.max_concurrent_sessions == 1
