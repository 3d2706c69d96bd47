"""Run the relay as a real process, the way systemd or a container would.

In-process tests (tests/conftest.py) cannot show what happens on SIGKILL, SIGTERM, SIGHUP or
SIGUSR1, or whether a spool written by one process is picked up by the next: those need
``python -m relay run`` in its own process with a production-style YAML file. The stand-ins
stay in the test process on real sockets: FakeEntra serves HTTPS from its own thread, and
FakeExchange runs on an event loop in a background thread (:class:`ExchangeThread`), so
that the tests themselves can be plain blocking code (smtplib, subprocess, polling).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import re
import secrets
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import yaml

from relay.sandbox.entra import FakeEntra
from relay.sandbox.exchange import FakeExchange, ReceivedMessage
from relay.sandbox.pki import LocalPKI, create_pki

ROOT = Path(__file__).resolve().parent.parent
TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "relay-app"
MAILBOX = "relay@contoso.com"
LISTENING_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
QUEUED_RE = re.compile(r"queued as ([0-9A-Za-z]+)")
SUBJECT_RE = re.compile(rb"^Subject: ([^\r\n]*)", re.MULTILINE | re.IGNORECASE)

T = TypeVar("T")



@contextlib.contextmanager
def sandbox_process(config: Path, sandbox_dir: Path, *extra: str,
                    **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """``run --sandbox`` as ``make run`` starts it; killed at the end if it still runs
    (a test that stops it itself checks how it stopped)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "run", "--sandbox", "--config", str(config),
         "--sandbox-dir", str(sandbox_dir), *extra], text=True, cwd=ROOT, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             interval: float = 0.05) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def subject_of(data: bytes) -> str | None:
    m = SUBJECT_RE.search(data.split(b"\r\n\r\n", 1)[0])
    return m.group(1).decode("utf-8", "replace").strip() if m else None


def make_message(subject: str, *, sender: str = "app@contoso.com",
                 to: Iterable[str] = ("someone@example.com",), body: str = "hello\r\n") -> bytes:
    head = [f"From: {sender}", f"To: {', '.join(to)}", f"Subject: {subject}",
            f"Date: {email.utils.formatdate()}",
            f"Message-ID: {email.utils.make_msgid(domain='app.test')}"]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


# --- the stand-ins ----------------------------------------------------------------------------

class ExchangeThread:
    """FakeExchange instances on an event loop of their own, in a daemon thread.

    FakeExchange needs a running loop; giving it one here keeps the tests free to block.
    Stopping and starting again makes a *new* fake on a new port (as a reboot of the
    upstream would); ``messages`` gathers what all of them accepted.
    """

    def __init__(self, pki: LocalPKI, entra: FakeEntra) -> None:
        self._pki = pki
        self._entra = entra
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-exchange",
                                        daemon=True)
        self._thread.start()
        self._retired: list[ReceivedMessage] = []
        self.current: FakeExchange | None = None
        self.port = 0

    def _call(self, coro: Any, timeout: float = 15) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def start(self) -> int:
        """Start a fresh fake (the previous one must be stopped); returns its port."""
        assert self.current is None, "stop the running fake first"
        fake = FakeExchange(self._pki, self._entra.validate_token)
        self._call(fake.start())
        self.current, self.port = fake, fake.port
        return fake.port

    def stop(self) -> None:
        fake, self.current = self.current, None
        if fake is not None:
            self._call(fake.stop())
            self._retired.extend(fake.messages)

    def later(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the fakes' event loop: FakeExchange is changed (fail_next,
        drop_next, ...) only there, never from another thread while it serves."""
        self._loop.call_soon_threadsafe(fn, *args)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Block the fakes' event loop: the kernel still accepts connections, but nothing
        is answered until the block ends (a stalled upstream, for attempts in flight)."""
        release = threading.Event()
        self._loop.call_soon_threadsafe(release.wait, 30)
        try:
            yield
        finally:
            release.set()

    @property
    def messages(self) -> list[ReceivedMessage]:
        live = list(self.current.messages) if self.current is not None else []
        return self._retired + live

    def subjects(self) -> list[str]:
        return [s for m in self.messages if (s := subject_of(m.data)) is not None]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


class Fakes:
    """FakeEntra (with the relay's app registered) and a restartable FakeExchange."""

    def __init__(self, directory: Path) -> None:
        self.pki = create_pki(directory / "pki")
        self.entra = FakeEntra(self.pki).start()
        self.client_secret = secrets.token_urlsafe(24)
        self.entra.add_app(TENANT, CLIENT_ID, secret=self.client_secret)
        self.exchange = ExchangeThread(self.pki, self.entra)
        self.exchange.start()

    def close(self) -> None:
        self.exchange.close()
        self.entra.stop()


# --- the relay process -------------------------------------------------------------------------

class SendError(Exception):
    """The relay did not answer 250 to a message (``code`` 0: the connection broke)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


def send_on(client: smtplib.SMTP, subject: str, *, sender: str = "app@contoso.com",
            to: Iterable[str] = ("someone@example.com",), body: str = "hello\r\n") -> str:
    """One transaction on an open connection; returns the queue id from the 250 reply."""
    rcpts = list(to)
    client.ehlo_or_helo_if_needed()
    code, text = client.mail(sender)
    if code != 250:
        raise SendError(code, text.decode())
    for rcpt in rcpts:
        code, text = client.rcpt(rcpt)
        if code not in (250, 251):
            raise SendError(code, text.decode())
    code, text = client.data(make_message(subject, sender=sender, to=rcpts, body=body))
    if code != 250:
        raise SendError(code, text.decode())
    m = QUEUED_RE.search(text.decode())
    return m.group(1) if m else ""


class RelayProcess:
    """One ``python -m relay run --config PATH`` process; its stderr is kept line by line."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30, *, ready: bool = True) -> RelayProcess:
        """Spawn the relay; with ``ready``, return once it accepts connections."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, cwd=ROOT, env=env)
        # A pipe that nobody reads fills up and blocks the relay's logging: always drain it.
        self._reader = threading.Thread(target=self._read, args=(self.proc,),
                                        name=f"relay-stderr-{self.proc.pid}", daemon=True)
        self._reader.start()
        if not ready:
            return self
        m = self.wait_for_log(LISTENING_RE, timeout)
        self.port = int(m.group(1))
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would: no clean-up of any kind."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def hup(self) -> None:
        self.signal(signal.SIGHUP)

    def usr1(self) -> None:
        self.signal(signal.SIGUSR1)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        """Make sure the process is gone (fixture finalizer); never raises."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    # --- the log -----------------------------------------------------------------------

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def mark(self) -> int:
        """A position in the log, for :meth:`wait_for_log` to look only at what follows."""
        with self._cond:
            return len(self._lines)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10,
                     since: int = 0) -> re.Match[str]:
        """The first line after ``since`` that matches; fails with the log if none comes."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        checked = since
        with self._cond:
            while True:
                for line in self._lines[checked:]:
                    if m := regex.search(line):
                        return m
                checked = max(checked, len(self._lines))
                exited = self.proc is not None and self.proc.poll() is not None
                left = deadline - time.monotonic()
                if left <= 0 or (exited and (self._reader is None
                                             or not self._reader.is_alive())):
                    state = (f"exited with {self.proc.returncode}" if exited and self.proc
                             else "still running")
                    raise AssertionError(
                        f"relay log has no line matching {regex.pattern!r} ({state}); "
                        f"log:\n{chr(10).join(self._lines[-60:])}")
                self._cond.wait(min(left, 0.2))

    # --- talking to it ------------------------------------------------------------------

    def connect(self, timeout: float = 10) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="app.test",
                              timeout=timeout)
        client.ehlo()
        return client

    def send(self, subject: str, *, sender: str = "app@contoso.com",
             to: Iterable[str] = ("someone@example.com",), body: str = "hello\r\n",
             login: tuple[str, str] | None = None, timeout: float = 10) -> str:
        """Send one message on a new connection; returns the queue id of the 250 reply."""
        with self.connect(timeout) as client:
            if login is not None:
                client.login(*login)
            return send_on(client, subject, sender=sender, to=to, body=body)


# --- a test's whole set-up ---------------------------------------------------------------------

def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Config overrides: dicts merge key by key, everything else replaces."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


class Harness:
    """Stand-ins, a config file in ``directory`` pointing at them, and relay processes.

    ``config`` is the YAML document as a dict: change it and call :meth:`write_config`
    (or write any text with :meth:`write_raw`) before :meth:`start` or a SIGHUP.
    """

    def __init__(self, directory: Path, overrides: dict[str, Any] | None = None) -> None:
        self.directory = directory
        self.fakes = Fakes(directory / "fakes")
        self.spool = directory / "spool"
        self.config_path = directory / "config.yaml"
        self.processes: list[RelayProcess] = []
        self.config: dict[str, Any] = {
            "server": {"hostname": "relay.test",
                       "listeners": [{"address": "127.0.0.1", "port": 0}]},
            "profiles": {"system": {"mailbox": MAILBOX, "credential": "main",
                                    "upstream": "exchange"}},
            "routing": {"system_profile": "system"},
            "spool": {"directory": str(self.spool)},
            "delivery": {"retry_initial": "0.5s", "retry_max": "1s",
                         "shutdown_timeout": "5s",
                         "mailbox_limits": {"messages_per_minute": 100000,
                                            "max_sessions": 3}},
            "credentials": {"main": {
                "tenant_id": TENANT, "client_id": CLIENT_ID,
                "authority": self.fakes.entra.url,
                "client_secret": {"value": self.fakes.client_secret},
                "ca_file": str(self.fakes.pki.ca_file)}},
            "upstreams": {"exchange": {"host": "127.0.0.1", "port": self.fakes.exchange.port,
                                       "ca_file": str(self.fakes.pki.ca_file),
                                       "timeout": "10s"}},
            "logging": {"level": "info"},
            "http": {"port": 0},
        }
        merge(self.config, overrides or {})
        self.write_config()

    @property
    def exchange(self) -> ExchangeThread:
        return self.fakes.exchange

    def write_config(self) -> None:
        self.write_raw(yaml.safe_dump(self.config, sort_keys=False))

    def write_raw(self, text: str) -> None:
        """Replace the file atomically, as config management tools do."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def start(self, timeout: float = 30, *, ready: bool = True) -> RelayProcess:
        proc = RelayProcess(self.config_path)
        self.processes.append(proc)
        return proc.start(timeout, ready=ready)

    def upstream_down(self) -> None:
        self.exchange.stop()

    def upstream_up(self) -> int:
        """A new FakeExchange (new port) and the config rewritten to use it."""
        port = self.exchange.start()
        self.config["upstreams"]["exchange"]["port"] = port
        self.write_config()
        return port

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``smtp-oauth-relay ARGS --config PATH``, as an operator runs it."""
        script = Path(sys.executable).with_name("smtp-oauth-relay")
        command = [str(script)] if script.is_file() else [sys.executable, "-m", "relay"]
        return subprocess.run([*command, *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              check=False)

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("queue", *args)

    def queue_list(self) -> list[dict[str, Any]]:
        res = self.queue("list", "--json")
        assert res.returncode == 0, res.stderr
        rows: list[dict[str, Any]] = json.loads(res.stdout)
        return rows

    def spool_files(self, state: str) -> list[Path]:
        return sorted((self.spool / state).iterdir()) if (self.spool / state).is_dir() else []

    def delivered(self) -> list[str]:
        return self.exchange.subjects()

    def close(self) -> None:
        for i, proc in enumerate(self.processes):
            proc.close()
            # Shown by pytest only when the test failed: the relay's side of the story.
            print(f"--- relay process {i} (pid {proc.pid if proc.proc else '-'}) log tail:")
            print("\n".join(proc.lines[-80:]))
        self.fakes.close()


@contextlib.contextmanager
def harness(directory: Path, overrides: dict[str, Any] | None = None) -> Iterator[Harness]:
    h = Harness(directory, overrides)
    try:
        yield h
    finally:
        h.close()
