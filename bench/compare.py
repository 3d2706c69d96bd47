"""``make bench``: the relay beside sending direct and beside the libraries' floor, one run.

    .venv/bin/python bench/compare.py [--messages 600] [--concurrency 8] [--size 5000]
                                      [--smoke] [--only direct,floor,queued,sync,...]

The same clients send the same messages (one connection per message, no AUTH towards a
relay, loopback) along each path, to the same fake Exchange Online (STARTTLS, then XOAUTH2
with a JWT the fake Entra ID signed and the fake checks), and a message counts when the
fake has it:

- direct: each client does what a rewritten application would: connect, STARTTLS,
  AUTH XOAUTH2 with a token, send;
- floor: bench/bare_relay.py, the least relay aiosmtpd and aiosmtplib make (fsync before
  250, three reused upstream sessions, nothing else);
- queued / sync: the relay, ``python -m relay run``, with ``delivery.synchronous`` off and
  on. Its CPU time per message is read from /proc, as the floor's is.

Then the relay's memory: idle, with 1,000 idle client connections, and its peak during the
runs above; bench/queue_memory.py and bench/memory.py add 100,000 queued messages and a
30 MB message, bench/drain.py the drain of a backlog at Exchange's limits, and
bench/data_input.py what reading DATA costs per kind of body, hostile ones included.
``--smoke`` runs everything tiny, to show that it runs (CI); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import data_input, drain  # noqa: E402
from bench.memory import fetch_token, measure, start_bare, status  # noqa: E402
from tests.relayproc import MAILBOX, Harness, RelayProcess  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
FLOOR = "floor (bare aiosmtpd -> aiosmtplib)"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


@dataclass
class Row:
    path: str
    messages: int
    seconds: float          # first connection to the last message in the fake's hands
    latencies: list[float]  # per message, as the client saw it (connect to QUIT)
    cpu: float | None       # the relay process's CPU seconds for the run, if measured
    system: float | None    # ... of which in the kernel (system calls: fsync, sockets, TLS)
    floor: Row | None = None  # the floor's turn just before this one (Bench.pairs)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


@dataclass
class Summary:
    """The median of each figure over the rounds of one path (noise on a shared machine
    moves single runs by 10-20 %; the paths take turns, so it moves them alike)."""

    path: str
    rounds: int
    rate: float
    p50: float
    p99: float
    cpu_ms: float | None      # per message
    kernel_ms: float | None
    # CPU per message against the floor's: the median of the ratios of turns taken one
    # after the other (Bench.pairs), so
    # that a machine that is slower for a while (a busy neighbour of a virtual machine)
    # moves both sides of a ratio alike; the median of ratios is steadier than the ratio
    # of medians.
    vs_floor: float | None = None
    spread: tuple[float, float, int] | None = None    # the ratios' quartiles, and how many

    @classmethod
    def of(cls, rows: list[Row]) -> Summary:
        med = statistics.median
        cpu = [r.cpu * 1000 / r.messages for r in rows if r.cpu is not None]
        kernel = [r.system * 1000 / r.messages for r in rows if r.system is not None]
        ratios = [(r.cpu / r.messages) / (f.cpu / f.messages)
                  for r in rows if (f := r.floor) is not None and r.cpu is not None and f.cpu]
        spread = None
        if len(ratios) >= 4:
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            spread = (q1, q3, len(ratios))
        return cls(rows[0].path, len(rows), med(r.rate for r in rows),
                   med(r.p(0.5) for r in rows), med(r.p(0.99) for r in rows),
                   med(cpu) if cpu else None, med(kernel) if kernel else None,
                   med(ratios) if ratios else None, spread)


def message(size: int, i: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    return (f"From: {MAILBOX}\r\nTo: r{i}@example.com\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench.{i}.{time.time_ns()}@app.test>\r\n\r\n").encode() + body


class Direct:
    """What an application rewritten for OAuth does, per message."""

    def __init__(self, port: int, ca_file: Path, token: str) -> None:
        self.port = port
        self.tls = ssl.create_default_context(cafile=str(ca_file))
        self.auth = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode())

    async def send(self, i: int, data: bytes) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=True,
                               tls_context=self.tls, local_hostname="app.test")
        await smtp.connect()
        await smtp.ehlo()
        reply = await smtp.execute_command(b"AUTH", b"XOAUTH2", self.auth)
        if reply.code != 235:
            raise RuntimeError(f"direct login refused: {reply}")
        await smtp.sendmail(MAILBOX, [f"r{i}@example.com"], data)
        await smtp.quit()


class Plain:
    """A legacy application: plain SMTP from loopback, no AUTH."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def send(self, i: int, data: bytes) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False,
                               local_hostname="app.test", timeout=60)
        await smtp.connect()
        await smtp.sendmail(MAILBOX, [f"r{i}@example.com"], data)
        await smtp.quit()


# One side of a comparison: the path's name, the client that sends along it, and the
# process whose CPU time counts.
Side = tuple[str, Direct | Plain, int]


async def load(client: Direct | Plain, first: int, messages: int, concurrency: int,
               size: int) -> list[float]:
    latencies: list[float] = []
    numbers = iter(range(first, first + messages))

    async def worker() -> None:
        for i in numbers:
            data = message(size, i)
            t0 = time.perf_counter()
            await client.send(i, data)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


class Bench:
    def __init__(self, h: Harness, ns: argparse.Namespace) -> None:
        self.h, self.ns = h, ns
        self.sent = 0

    def run(self, path: str, client: Direct | Plain, pid: int | None) -> Row:
        self._warm_up(client)
        return self._measure(path, client, pid, self.ns.messages)

    def pairs(self, floor: Side, relay: Side) -> tuple[list[Row], list[Row]]:
        """The floor and the relay, both running, in turns of ``--batch`` messages: a
        stretch in which the machine is slower (a virtual machine's busy neighbour, which
        moves the CPU time per message by up to 40 % here) then falls on both sides of a
        pair alike, and the median of many pairs' ratios is steady where the ratio of
        two long runs, minutes apart, is not."""
        ns = self.ns
        for _, client, _ in (floor, relay):
            self._warm_up(client)
        rows: tuple[list[Row], list[Row]] = ([], [])
        for _ in range(max(1, ns.messages // ns.batch)):
            for (path, client, pid), out in zip((floor, relay), rows, strict=True):
                out.append(self._measure(path, client, pid, min(ns.batch, ns.messages)))
            rows[1][-1].floor = rows[0][-1]
        return rows

    def _warm_up(self, client: Direct | Plain) -> None:
        """Sessions opened, token fetched, code paths taken once."""
        self._send(client, max(self.ns.concurrency, self.ns.messages // 20))

    def _measure(self, path: str, client: Direct | Plain, pid: int | None, n: int) -> Row:
        cpu0 = cpu_seconds(pid) if pid else None
        delivered0 = len(self.h.exchange.messages)
        started = time.perf_counter()
        latencies = self._send(client, n)
        self._wait_delivered(delivered0 + n)
        seconds = time.perf_counter() - started
        if pid and cpu0 is not None:
            cpu1 = cpu_seconds(pid)
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            return Row(path, n, seconds, latencies, user + system, system)
        return Row(path, n, seconds, latencies, None, None)

    def _send(self, client: Direct | Plain, n: int) -> list[float]:
        first, self.sent = self.sent, self.sent + n
        before = len(self.h.exchange.messages)
        latencies = asyncio.run(load(client, first, n, self.ns.concurrency, self.ns.size))
        self._wait_delivered(before + n)
        return latencies

    def _wait_delivered(self, count: int) -> None:
        deadline = time.monotonic() + 300
        while len(self.h.exchange.messages) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(self.h.exchange.messages)} of {count} messages "
                                 "reached the fake Exchange within 5 minutes")
            time.sleep(0.002)


def idle_connections(port: int, pid: int, count: int) -> float:
    """The relay's RSS (MiB) with ``count`` clients connected, greeted and silent."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 200)), hard))
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(s)
        for s in socks:
            if not s.recv(512).startswith(b"220"):
                raise SystemExit("a client was not greeted with 220")
        time.sleep(0.5)
        return status(pid, "VmRSS")
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def profiled(target: str | None, pid: int) -> Any:
    """py-spy's flame graph of ``pid`` while the block runs, written to ``target``."""
    if not target:
        yield
        return
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-o",
                            target, "--pid", str(pid), "--rate", "250", "--gil",
                            *_spy_format(target)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        yield
    finally:
        spy.send_signal(2)
        spy.wait(60)


def _spy_format(target: str) -> list[str]:
    """py-spy's output format from the file's name (a flame graph unless told otherwise)."""
    formats = {".json": "speedscope", ".txt": "raw"}
    suffix = Path(target).suffix
    return ["--format", formats[suffix]] if suffix in formats else []


def main(ns: argparse.Namespace) -> None:
    runs: dict[str, list[Row]] = {}
    memory: dict[str, float] = {}
    tokens: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        directory = Path(tmp)
        idle = ns.idle_connections
        h = Harness(directory, {
            "server": {"max_message_size": f"{ns.big_mb + 10}MiB",
                       "max_connections": max(100, idle + 50),
                       "max_connections_per_client": max(100, idle + 50)},
            "delivery": {"mailbox_limits": {"messages_per_minute": 10**6,
                                            "recipients_per_day": 10**8}},
            "http": {"enabled": False}})
        try:
            bench = Bench(h, ns)
            token = fetch_token(h)
            for n in range(ns.rounds):
                one_round(ns, h, bench, token, directory, runs, memory, tokens,
                          first=n == 0)
        finally:
            with contextlib.redirect_stdout(io.StringIO()):     # the relay's log tail
                h.close()
    if "queue" in ns.only:
        memory.update(queued_memory(ns.queued))
    drained = drain.run(argparse.Namespace(
        mailboxes=ns.drain_mailboxes, per_minute=ns.drain_per_minute,
        backlog=ns.drain_backlog)) if "drain" in ns.only else None
    report(ns, [Summary.of(rows) for rows in runs.values()], memory, tokens, drained)
    if "data" in ns.only:
        data_input.table(0.01 if ns.smoke else 1.0)


def one_round(ns: argparse.Namespace, h: Harness, bench: Bench, token: str, directory: Path,
              runs: dict[str, list[Row]], memory: dict[str, float],
              tokens: dict[str, int], *, first: bool) -> None:
    """Every path once, in turn; the memory figures in the ``first`` round only."""
    def add(row: Row) -> None:
        runs.setdefault(row.path, []).append(row)

    if "direct" in ns.only:
        add(bench.run("direct (TLS + XOAUTH2 per message)",
                      Direct(h.exchange.port, h.fakes.pki.ca_file, token), None))
    floor: Side | None = None
    if "floor" in ns.only:
        process, port = start_bare(h, directory)
        floor = (FLOOR, Plain(port), process.pid)
    try:
        relay_round(ns, h, bench, add, floor, memory, tokens, first=first)
    finally:
        if floor is not None:
            process.terminate()
            process.wait(10)


def relay_round(ns: argparse.Namespace, h: Harness, bench: Bench, add: Callable[[Row], None],
                floor: Side | None, memory: dict[str, float], tokens: dict[str, int], *,
                first: bool) -> None:
    """The relay's turn in a round (the floor's too: beside each relay, in pairs)."""
    def beside(relay: Side) -> None:
        if floor is None:
            add(bench.run(*relay))
            return
        for rows in bench.pairs(floor, relay):
            for row in rows:
                add(row)

    if floor is not None and not {"queued", "sync"} & ns.only:
        add(bench.run(*floor))
    if "queued" in ns.only or (first and {"memory", "big"} & ns.only):
        h.config["delivery"].pop("synchronous", None)
        h.write_config()
        requests0 = h.fakes.entra.token_requests
        relay = h.start()
        time.sleep(1.0)
        if first:
            memory["idle"] = status(relay.pid, "VmRSS")
        if first and "big" in ns.only:
            # First, so that the high-water mark is this message's alone.
            big = measure("relay", relay.pid, relay.port, h, 1, big_message(ns.big_mb))
            memory[f"peak while relaying one {ns.big_mb} MB message"] = big["peak"]
        if "queued" in ns.only:
            with profiled(ns.profile if first else None, relay.pid):
                beside(("relay, queued", Plain(relay.port), relay.pid))
            if first:
                memory["after the queued run"] = status(relay.pid, "VmRSS")
        if first and "memory" in ns.only:
            memory[f"{ns.idle_connections} idle connections"] = idle_connections(
                relay.port, relay.pid, ns.idle_connections)
        if first:
            memory["peak of all the above"] = status(relay.pid, "VmHWM")
        tokens["queued"] = tokens.get("queued", 0) + h.fakes.entra.token_requests - requests0
        relay.terminate()
        relay.wait()
    if "sync" in ns.only:
        h.config["delivery"]["synchronous"] = "30s"
        h.write_config()
        requests0 = h.fakes.entra.token_requests
        relay = h.start()
        beside(("relay, synchronous", Plain(relay.port), relay.pid))
        tokens["sync"] = tokens.get("sync", 0) + h.fakes.entra.token_requests - requests0
        relay.terminate()
        relay.wait()


def big_message(mb: int) -> bytes:
    line = b"x" * 998 + b"\r\n"
    return (f"From: {MAILBOX}\r\nTo: a@example.com\r\nSubject: big\r\n\r\n".encode()
            + line * (mb * 1024 * 1024 // len(line)))


def queued_memory(count: int, seconds: float = 10.0) -> dict[str, float]:
    """The relay process started on ``count`` due messages (filled in beforehand, by
    another process) with the upstream unreachable: every attempt fails at once and the
    message is deferred again, the queue manager's worst case. Its resident memory once it
    takes mail, and the most it reaches while it retries."""
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        spool = Path(tmp) / "spool"
        subprocess.run([sys.executable, "-c", "import sys; sys.path[:0] = sys.argv[1:2]; "
                        "from bench.queue_memory import fill; from relay.spool.store import "
                        "Spool; from pathlib import Path; s = Spool(Path(sys.argv[2])); "
                        "s.open(on_tmpfs='warn'); "
                        "fill(s, int(sys.argv[3]))", str(ROOT), str(spool), str(count)],
                       check=True)
        config = Path(tmp) / "config.yaml"
        config.write_text(json.dumps({
            "server": {"listeners": [{"address": "127.0.0.1", "port": 0}]},
            "profiles": {"system": {"mailbox": MAILBOX, "credential": "main",
                                    "upstream": "down"}},
            "routing": {"system_profile": "system"},
            "spool": {"directory": str(spool), "on_tmpfs": "warn"},
            "delivery": {"retry_initial": "1s", "retry_max": "1s",
                         "mailbox_limits": {"max_sessions": 100,
                                            "messages_per_minute": 1_000_000,
                                            "recipients_per_day": 1_000_000_000}},
            "upstreams": {"down": {"host": "127.0.0.1", "port": 9, "timeout": "2s"}},
            "credentials": {"main": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "c",
                                     "authority": "https://127.0.0.1:9",
                                     "client_secret": {"value": "x"}}},
            "http": {"enabled": False}}))          # JSON is YAML
        relay = RelayProcess(config).start(timeout=300)
        try:
            ready = status(relay.pid, "VmRSS")
            time.sleep(seconds)
            peak = status(relay.pid, "VmHWM")
        finally:
            relay.terminate()
            relay.wait()
    return {f"with {count:,} queued, once it takes mail": ready,
            f"with {count:,} queued, peak while retrying them": peak}


def report(ns: argparse.Namespace, rows: list[Summary], memory: dict[str, float],
           tokens: dict[str, int], drained: dict[str, Any] | None) -> None:
    print(f"# {ns.messages} messages of ~{ns.size} bytes, {ns.concurrency} concurrent clients, "
          f"one connection per message; medians of {ns.rounds} rounds, the paths in turn "
          f"(x floor: the median ratio of the floor's and the relay's turns of "
          f"{min(ns.batch, ns.messages)} messages, both running); "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs")
    direct = next((r for r in rows if r.path.startswith("direct")), None)
    print(f"{'path':38} {'msg/s':>7} {'x direct':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'CPU ms/msg':>10} {'in kernel':>9} {'x floor':>7}")
    for r in rows:
        vs_direct = f"{r.rate / direct.rate:.2f}" if direct else "-"
        vs_floor = f"{r.vs_floor:.2f}" if r.vs_floor is not None else "-"
        cpu = f"{r.cpu_ms:.2f}" if r.cpu_ms is not None else "-"
        kernel = f"{r.kernel_ms:.2f}" if r.kernel_ms is not None else "-"
        print(f"{r.path:38} {r.rate:7.0f} {vs_direct:>8} {r.p50:7.1f} {r.p99:7.1f} "
              f"{cpu:>10} {kernel:>9} {vs_floor:>7}")
    for r in rows:
        if r.spread is not None:
            q1, q3, n = r.spread
            print(f"x floor, {r.path}: quartiles {q1:.2f}-{q3:.2f} of {n} pairs of turns")
    sync = next((r for r in rows if r.path.endswith("synchronous")), None)
    if sync and direct:
        print(f"synchronous p50 over direct: {sync.p50 - direct.p50:+.1f} ms")
    for phase, count in tokens.items():
        print(f"token requests by the {phase} relay processes ({ns.rounds}, from start to "
              f"stop): {count}")
    for what, mib in memory.items():
        print(f"relay RSS, {what}: {mib:.0f} MiB")
    if drained is not None:
        print(f"drain at Exchange's limits ({ns.drain_mailboxes} mailboxes x "
              f"{ns.drain_backlog} at {ns.drain_per_minute}/min, 3 sessions): "
              f"{drained['seconds']:.1f} s, least possible {drained['least']:.1f} s, "
              f"{drained['seconds'] / max(drained['least'], 1e-3):.3f}x; "
              f"432s {drained['refusals']}, "
              f"bounced {drained['bounced']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=5000, help="approximate message bytes")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each path this many times, in turn; medians are printed")
    parser.add_argument("--batch", type=int, default=300,
                        help="messages per turn when the floor and the queued relay take "
                             "turns (x floor: the median of the turns' ratios)")
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument("--only",
                        default="direct,floor,queued,sync,memory,big,queue,data,drain",
                        help="comma-separated parts to run")
    parser.add_argument("--big-mb", type=int, default=30)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--drain-mailboxes", type=int, default=4)
    parser.add_argument("--drain-per-minute", type=int, default=100)
    parser.add_argument("--drain-backlog", type=int, default=200)
    parser.add_argument("--profile", metavar="FILE",
                        help="record the relay's queued run with py-spy (.svg flame graph, "
                             ".txt collapsed stacks)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: shows that the benchmark runs (CI)")
    args = parser.parse_args()
    if min(args.messages, args.batch, args.rounds, args.concurrency) < 1:
        parser.error("--messages, --batch, --rounds and --concurrency must be 1 or more")
    if args.smoke:
        args.messages, args.concurrency, args.idle_connections, args.rounds = 20, 4, 20, 1
        args.big_mb, args.queued = 2, 200
        args.drain_mailboxes, args.drain_per_minute, args.drain_backlog = 2, 5, 5
    args.only = set(args.only.split(","))
    main(args)
