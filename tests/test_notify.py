"""sd_notify: real AF_UNIX datagram sockets standing in for systemd's notification socket."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ops import notify as notify
from tests.relayproc import sandbox_process

ROOT = Path(__file__).resolve().parent.parent


class NotifySocket:
    """The receiving end systemd would hold: one datagram per notification."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def receive(self) -> dict[str, str] | None:
        """The next message, parsed into its KEY=value fields; None if there is none yet."""
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return None
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    def drain(self) -> list[dict[str, str]]:
        """Every message received so far."""
        messages = []
        while (message := self.receive()) is not None:
            messages.append(message)
        return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def systemd(clean_env: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A socket at a file path (kept short: sun_path holds 108 bytes, pytest's tmp is long)."""
    with tempfile.TemporaryDirectory(prefix="sdn", dir="/tmp") as tmp:
        path = os.path.join(tmp, "notify")
        receiver = NotifySocket(path)
        clean_env.setenv("NOTIFY_SOCKET", path)
        yield receiver
        receiver.close()


def test_without_notify_socket_everything_is_a_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert notify.ready("listening") is False
    assert notify.stopping() is False
    assert notify.reloading() is False
    assert notify.watchdog_interval() is None


def test_ready_with_status(systemd: NotifySocket) -> None:
    assert notify.ready("listening on 127.0.0.1:2525") is True
    assert systemd.drain() == [{"READY": "1", "STATUS": "listening on 127.0.0.1:2525"}]


def test_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"relay-test-{uuid.uuid4().hex}"
    receiver = NotifySocket("\0" + name)
    try:
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready("hello") is True
        assert receiver.drain() == [{"READY": "1", "STATUS": "hello"}]
    finally:
        receiver.close()


def test_status_text_cannot_inject_fields(systemd: NotifySocket) -> None:
    notify.stopping("bad\nREADY=1\r\nWATCHDOG=1")
    [message] = systemd.drain()
    assert message == {"STOPPING": "1", "STATUS": "bad READY=1 WATCHDOG=1"}


def test_reloading_carries_the_monotonic_clock(systemd: NotifySocket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = systemd.drain()
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_stopping_extends_the_stop_timeout(systemd: NotifySocket) -> None:
    notify.stopping("draining", timeout=45)
    assert systemd.drain() == [{"STOPPING": "1", "STATUS": "draining",
                                "EXTEND_TIMEOUT_USEC": "45000000"}]


def test_unreachable_socket_warns_once_and_never_raises(
        clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    clean_env.setattr(notify, "_warned", False)
    with caplog.at_level(logging.DEBUG, logger="relay.ops.notify"):
        assert notify.ready() is False
        assert notify.ready() is False
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]


def test_unsupported_socket_kind_is_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


def test_watchdog_interval(systemd: NotifySocket, clean_env: pytest.MonkeyPatch) -> None:
    assert notify.watchdog_interval() is None
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_interval() == 15.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    # Meant for another process (we inherited the environment): not ours to ping.
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None
    clean_env.delenv("WATCHDOG_PID")
    for bad in ("", "0", "-5", "soon"):
        clean_env.setenv("WATCHDOG_USEC", bad)
        assert notify.watchdog_interval() is None


def test_no_watchdog_task_when_not_asked(systemd: NotifySocket) -> None:
    async def main() -> None:
        assert notify.start_watchdog() is None
        await notify.stop_watchdog(None)

    asyncio.run(main())


async def test_watchdog_pings_only_while_the_loop_runs(
        systemd: NotifySocket, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    task = notify.start_watchdog()
    assert task is not None
    try:
        await asyncio.sleep(0.3)
        pings = systemd.drain()
        assert len(pings) >= 3
        assert all(p == {"WATCHDOG": "1"} for p in pings)
        # A stuck event loop (blocking call on the loop): no pings, so systemd would act.
        time.sleep(0.3)  # noqa: ASYNC251 -- blocking on purpose
        assert systemd.drain() == []
        await asyncio.sleep(0.15)
        assert len(systemd.drain()) >= 1  # and they resume once it runs again
    finally:
        await notify.stop_watchdog(task)
    assert task.cancelled()
    await asyncio.sleep(0.12)
    assert systemd.drain() == []


async def test_watchdog_withholds_pings_when_unhealthy(
        systemd: NotifySocket, clean_env: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    clean_env.setenv("WATCHDOG_USEC", "100000")
    healthy = True
    task = notify.start_watchdog(lambda: healthy)
    assert task is not None
    try:
        await asyncio.sleep(0.12)
        assert systemd.drain()
        healthy = False
        await asyncio.sleep(0.06)
        systemd.drain()  # a ping may have been sent just before the switch
        await asyncio.sleep(0.2)
        assert systemd.drain() == []
        assert "withheld" in caplog.text
    finally:
        await notify.stop_watchdog(task)


# --- the relay process itself, as systemd starts it ----------------------------------------

RELAY_CONFIG = """
server:
  listeners: [{address: 127.0.0.1, port: 0}]
http: {address: 127.0.0.1, port: 0}
profiles:
  system: {mailbox: relay@contoso.com, credential: main}
routing: {system_profile: system}
delivery: {shutdown_timeout: 5s}
credentials:
  main: {tenant_id: contoso.onmicrosoft.com, client_id: app, client_secret: {value: sandbox}}
"""


def _wait_for(receiver: NotifySocket, key: str, proc: subprocess.Popen[str],
              timeout: float = 20.0) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The first message with ``key``, and every message that came before it."""
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = receiver.receive()
        if message is None:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        elif key in message:
            return message, seen
        else:
            seen.append(message)
    raise AssertionError(f"no {key}= from the relay (exit {proc.poll()}); got {seen}")


def test_relay_process_speaks_sd_notify(systemd: NotifySocket, tmp_path: Path) -> None:
    """READY after start-up, watchdog pings, RELOADING/READY on SIGHUP, STOPPING on SIGTERM."""
    config = tmp_path / "config.yaml"
    config.write_text(RELAY_CONFIG)
    env = {**os.environ, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    with sandbox_process(config, tmp_path / "sb", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env) as proc:
        _wait_for(systemd, "READY", proc)
        pings = 0
        while pings < 2:
            _wait_for(systemd, "WATCHDOG", proc, timeout=5)
            pings += 1
        proc.send_signal(signal.SIGHUP)
        reloading, _ = _wait_for(systemd, "RELOADING", proc)
        assert int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000
        _wait_for(systemd, "READY", proc)
        proc.send_signal(signal.SIGTERM)
        stopping, _ = _wait_for(systemd, "STOPPING", proc)
        assert stopping["STOPPING"] == "1"
        assert proc.wait(timeout=30) == 0


def test_a_refused_reload_tells_systemd_why(systemd: NotifySocket, tmp_path: Path) -> None:
    """SIGHUP with a listener whose port is taken: READY=1 (the relay runs on) with a
    STATUS saying the reload was refused and why; after a good one, the usual STATUS."""
    config = tmp_path / "config.yaml"
    config.write_text(RELAY_CONFIG)
    with sandbox_process(config, tmp_path / "sb", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL) as proc:
        ready, _ = _wait_for(systemd, "READY", proc)
        assert ready["STATUS"].startswith("accepting mail on 127.0.0.1:")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config.write_text(RELAY_CONFIG.replace(
                "listeners: [{address: 127.0.0.1, port: 0}]",
                f"listeners: [{{address: 127.0.0.1, port: 0}}, "
                f"{{address: 127.0.0.1, port: {port}}}]"))
            proc.send_signal(signal.SIGHUP)
            _wait_for(systemd, "RELOADING", proc)
            refused, _ = _wait_for(systemd, "READY", proc)
        assert refused["STATUS"].startswith(
            "reload refused, running the previous configuration: "
            f"cannot listen on 127.0.0.1:{port}: Address already in use"), refused
        proc.send_signal(signal.SIGHUP)             # the port is free now
        _wait_for(systemd, "RELOADING", proc)
        taken_now, _ = _wait_for(systemd, "READY", proc)
        assert taken_now["STATUS"].startswith("accepting mail on 127.0.0.1:")
        assert taken_now["STATUS"].endswith(f", 127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_failed_start_does_not_say_draining(systemd: NotifySocket, tmp_path: Path) -> None:
    """The SMTP port is taken: the relay exits 71 without ever telling systemd it is
    ready or draining (no STOPPING=1: it never ran)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(RELAY_CONFIG.replace("port: 0}]", f"port: {port}}}]"))
        res = subprocess.run(
            [sys.executable, "-m", "relay", "run", "--sandbox", "--config", str(config),
             "--sandbox-dir", str(tmp_path / "sb")],
            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 71, res.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr
    assert systemd.drain() == []
