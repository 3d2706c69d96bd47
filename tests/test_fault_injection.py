"""The durability promise under a failing disk and crashes, at every spool system call.

Each *episode* is one message sent over real SMTP to an in-process relay whose upstream is
the sandbox's fake Exchange Online: ok@ accepts, slow@ answers 451 once and then accepts,
bad@ refuses for good (550). A probe run of the episode lists the system calls the spool
makes on its files (tests/faults.py); then, for every k, the episode runs again with the
k-th call failing with EIO, failing with ENOSPC, or crashing the relay (the disk is left
exactly as it was at that call, nothing more is said to anyone, and a new relay starts on
the same spool). The client behaves as applications do: it sends again after a 4xx or a
connection lost before the reply.

Once the queue has settled: every message answered 250 was delivered exactly once to each
recipient that accepts mail and reported in a delivery report for the others; nothing
answered 4xx or 5xx was delivered or reported on; nothing is left in tmp/, active/ or the
queue, and no data without its message. What a crash may repeat is listed in
tests/faults.check_accounting: a delivery whose upstream 250 the spool had not recorded yet
(the window the README names), and a delivery report.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.app import Relay
from relay.config import Config
from relay.queue import attempt
from relay.queue.pacing import GOVERNOR_FILE
from relay.sandbox.service import Sandbox
from relay.spool.records import State
from relay.spool.recovery import recover
from relay.spool.store import Spool
from tests.conftest import build_config
from tests.faults import (
    FAULTS,
    Client,
    Crash,
    SpoolCalls,
    Upstream,
    carry_token,
    check_accounting,
    expected_for,
    kill,
    spool_leftovers,
)

OK, SLOW, BAD = "ok@example.com", "slow@example.com", "bad@example.com"
SETTLE_WITHIN = 5.0


@dataclass(frozen=True)
class Episode:
    rcpts: tuple[str, ...]
    synchronous: bool = False

    @property
    def refused(self) -> bool:
        """The waiting client may be told 5xx: nobody can be reached."""
        return self.synchronous and set(self.rcpts) == {BAD}


EPISODES = {
    "delivered": Episode((OK,)),
    "deferred": Episode((SLOW,)),
    "split": Episode((OK, SLOW)),          # delivered to one now, to the other on retry
    "partial": Episode((OK, BAD)),         # delivered and reported in a DSN
    "bounced": Episode((BAD,)),
    "sync-delivered": Episode((OK,), synchronous=True),
    "sync-mixed": Episode((OK, SLOW, BAD), synchronous=True),
    "sync-refused": Episode((BAD,), synchronous=True),
}


def deliverable(rcpt: str) -> bool:
    return rcpt != BAD


def relay_config(sandbox: Sandbox, root: Path, synchronous: bool) -> Config:
    config = sandbox.apply(build_config({
        "delivery": {"synchronous": 10 if synchronous else None, "retry_initial": "10ms",
                     "retry_max": "20ms", "shutdown_timeout": "1s",
                     "mailbox_limits": {"messages_per_minute": 100_000}},
        "http": {"enabled": False}}))
    spool = config.spool.model_copy(update={"directory": root, "on_tmpfs": "warn"})
    return config.model_copy(update={"spool": spool})


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> SpoolCalls:
    monkeypatch.setattr(attempt, "BACKOFF_MIN_KEEP", 0.01)   # the pause after a refusal
    return SpoolCalls(monkeypatch)


def _settled(relay: Relay) -> bool:
    root = relay.spool.root
    return (relay.queue.in_flight == 0 and not relay.receiver._submissions
            and not any(any((root / s).iterdir())
                        for s in (State.INCOMING, State.ACTIVE, State.DEFERRED)))


@dataclass
class Run:
    """What one run of an episode did."""

    trace: list[str]
    fired: str | None
    crashed: bool
    problems: list[str]
    repeated: int = 0       # deliveries and reports beyond the first (allowed after a crash)


class Rig:
    """A relay on one spool, kept for run after run of an episode; a crash replaces it
    with a new one on the same spool, as a restart would."""

    def __init__(self, sandbox: Sandbox, calls: SpoolCalls, root: Path, name: str) -> None:
        self.sandbox, self.calls, self.root, self.name = sandbox, calls, root, name
        self.episode = EPISODES[name]
        self.config = relay_config(sandbox, root, self.episode.synchronous)
        calls.upstream_port = sandbox.exchange.port
        self.relay: Relay | None = None
        self.orphans: list[str] = []

    async def start(self) -> Relay:
        relay = Relay(self.config)
        if self.relay is not None:
            carry_token(self.relay, relay)
        await relay.start()
        self.relay = relay
        return relay

    async def close(self) -> list[str]:
        """Stop the relay, start it once more (recovery) and stop it again; what is
        left in its spool that should not be."""
        self.calls.disarm()
        if self.relay is None:
            return []
        await self.relay.stop()
        await self.start()
        await self.relay.stop()
        return spool_leftovers(self.root)

    async def run(self, fault: str | None = None, at: int | None = None) -> Run:
        episode, calls, exchange = self.episode, self.calls, self.sandbox.exchange
        exchange._faults.clear()
        exchange.fail_next("rcpt", 550, "5.1.1 User unknown", count=10**9, recipient=BAD)
        if SLOW in episode.rcpts:
            exchange.fail_next("rcpt", 451, "4.4.0 Try again later", recipient=SLOW)
        first = len(exchange.messages)
        before = (set(spool_leftovers(self.root, running=True)) if self.root.exists()
                  else set())
        relay = self.relay or await self.start()
        calls.arm(self.root, fault, at)
        client = Client(relay.listening[0])
        tag = f"{self.name}-{fault}-{at}"
        rcpts = {tag: list(episode.rcpts)}
        crashed = False
        problems: list[str] = []
        trace: list[str] | None = None
        for _ in range(5):
            sending = (asyncio.create_task(client.send(tag, rcpts[tag]))
                       if not client.settled(tag) else None)
            deadline = time.monotonic() + SETTLE_WITHIN
            while not calls.dead and not (
                    (sending is None or sending.done()) and _settled(relay)):
                if time.monotonic() > deadline:
                    problems.append("the queue did not settle: "
                                    + ", ".join(spool_leftovers(self.root, running=True)))
                    break
                await asyncio.sleep(0.002)
            if calls.dead:
                # kill -9, and the start after it.
                crashed = True
                trace = list(calls.trace)
                await kill(relay)
                if sending is not None:
                    await sending
                calls.disarm()
                relay = await self.start()
                client.address = relay.listening[0]
                continue
            if problems or client.settled(tag):
                break
            # A 4xx, or no reply: the application sends it again.
        else:
            problems.append("the client never got a final answer")
        fired, in_record, crashed_at = calls.fired, calls.fired_recording, calls.crashed_at
        if trace is None:
            trace = list(calls.trace)
        calls.disarm()
        if relay.queue.failed:
            problems.append("the queue's dispatcher died")
        final = [t for t in client.transactions if t.code][-1:]
        if final and final[0].code != 250 and not episode.refused:
            # (a refused one may also be 250: taking it for its attempt failed, so it
            # was queued, and its refusal goes out in a delivery report)
            problems.append(f"final reply {final[0].code} {final[0].text}")
        upstream = Upstream.of(exchange.messages[first:])
        # In flight at the crash: stored by the upstream after it (the data had all been
        # sent before), or stored just before while the spool was recording it.
        in_flight = Upstream.of([m for m in exchange.messages[first:]
                                 if crashed_at is not None and m.received_at >= crashed_at]).ids
        if crashed and in_record:
            in_flight |= upstream.ids
        problems += expected_for(client, rcpts, upstream, deliverable)
        problems += check_accounting(client, upstream, crashed=crashed, in_flight=in_flight)
        left = [f for f in spool_leftovers(self.root, running=True) if f not in before]
        if fired is not None and fired.endswith(" unlink data/ID.eml") and not crashed:
            # That very unlink failed: the data waits for the next start, whose recovery
            # removes orphans (checked by :meth:`close`).
            self.orphans += [f for f in left if f.startswith("data/")][:1]
            left = [f for f in left if f not in self.orphans]
        problems += left
        repeated = sum(n - 1 for seen in (upstream.deliveries, upstream.reports)
                       for n in seen.values())
        return Run(trace, fired, crashed, problems, repeated)


# Every episode with every fault in the default run would take over a minute: it runs
# the episodes that between them take every path (delivery, retry, partial refusal and
# report, synchronous delivery and refusal) with EIO and crashes; ENOSPC (which differs
# from EIO in the reply only) and the other episodes are marked slow.
FAST = {("delivered", "EIO"), ("delivered", "crash"), ("split", "EIO"), ("split", "crash"),
        ("partial", "EIO"), ("partial", "crash"), ("sync-mixed", "EIO"),
        ("sync-mixed", "crash"), ("sync-refused", "EIO"), ("sync-refused", "crash")}
CASES = [pytest.param(name, fault, id=f"{name}-{fault}",
                      marks=() if (name, fault) in FAST else pytest.mark.slow)
         for name in EPISODES for fault in FAULTS]


async def test_the_harness_sees_every_kind_of_spool_call(
        sandbox: Sandbox, calls: SpoolCalls, tmp_path: Path) -> None:
    rig = Rig(sandbox, calls, tmp_path / "spool", "split")
    try:
        run = await rig.run()
    finally:
        leftovers = await rig.close()
    assert run.problems == [] and leftovers == []
    assert {call.split()[0] for call in run.trace} == set(SpoolCalls.CALLS)
    assert not run.crashed and run.fired is None


@pytest.mark.parametrize(("name", "fault"), CASES)
async def test_fault_at_every_spool_call(sandbox: Sandbox, calls: SpoolCalls, tmp_path: Path,
                                         name: str, fault: str) -> None:
    rig = Rig(sandbox, calls, tmp_path / "spool", name)
    failures = []
    on_cue = repeats = 0
    started = time.monotonic()
    try:
        probe = await rig.run()
        assert probe.problems == []
        for k in range(len(probe.trace)):
            run = await rig.run(fault, k)
            # Concurrent steps (a report delivered while its message is settled) may
            # take turns differently from the probe's run; count how often.
            on_cue += run.fired == f"#{k} {probe.trace[k]}"
            repeats += run.repeated > 0
            if run.problems:
                failures.append(f"{fault} at {run.fired or f'#{k} (never reached)'}: "
                                + "; ".join(run.problems))
    finally:
        leftovers = await rig.close()
    print(f"{name} {fault}: {len(probe.trace)} cases in {time.monotonic() - started:.1f} s "
          f"({on_cue} faulted the probe's call of that number; {repeats} repeated a "
          "delivery or a report)")
    assert failures == [], "\n".join(failures)
    assert leftovers == [], "left in the spool after a restart"
    assert on_cue >= len(probe.trace) * 0.7


@pytest.mark.parametrize("fault", ["EIO", "crash"])
def test_saving_the_pacing_windows_fails_cleanly_at_every_call(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fault: str) -> None:
    """governor.json is whole or absent, old or new, and nothing stays in tmp/."""
    calls = SpoolCalls(monkeypatch, exclude=())
    spool = Spool(tmp_path / "spool")
    spool.open(on_tmpfs="warn")
    spool.save_state(GOVERNOR_FILE, b'{"old": 1}')
    calls.arm(spool.root)
    spool.save_state(GOVERNOR_FILE, b'{"new": 2}')
    steps = len(calls.trace)
    assert steps >= 4
    for k in range(steps):
        spool.save_state(GOVERNOR_FILE, b'{"old": 1}')
        calls.arm(spool.root, fault, k)
        with pytest.raises((OSError, Crash)):
            spool.save_state(GOVERNOR_FILE, b'{"new": 2}')
        calls.disarm()
        if fault == "crash":
            recover(spool)                  # the next start
        assert spool.load_state(GOVERNOR_FILE) in (b'{"old": 1}', b'{"new": 2}'), k
        assert list((spool.root / "tmp").iterdir()) == [], k
