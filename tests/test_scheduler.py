"""The dispatcher driven pass by pass (Queue.dispatch_once) with an injected clock: pacing,
due times, the deferred files' mtimes and a message's lifetime all follow that clock, so
no test here waits for real time to pass."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.core.message import new_message_id
from relay.core.reply import Reply
from relay.queue.scheduler import Queue
from relay.spool.records import Entry, State
from relay.spool.store import Spool
from tests.conftest import build_config, wait_until
from tests.test_queue_durability import MESSAGE, ScriptedDeliverer, outbound, scripted_queue

T = 2_000_000_000.0        # far from the real time: only the injected clock can reach it


class Clock:
    def __init__(self, now: float = T) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rig(tmp_path: Path, deliverer: ScriptedDeliverer, clock: Clock,
        **delivery: object) -> tuple[Queue, Spool]:
    config = build_config({"delivery": {"synchronous": None, **delivery}})
    spool = Spool(tmp_path / "spool")
    spool.open(on_tmpfs="warn")
    return Queue(spool, deliverer, config, clock=clock), spool  # type: ignore[arg-type]


def arrive(queue: Queue, spool: Spool, clock: Clock) -> Entry:
    """A message placed in incoming/ behind the queue's back (as recovery or an operator
    command does), and the queue told to look."""
    entry = Entry(id=new_message_id(), profile="system", mail_from="app@contoso.com",
                  rcpt_tos=["a@example.com"], size=len(MESSAGE), received_at=clock(),
                  mailbox="relay@contoso.com")
    spool.add(entry, MESSAGE)
    queue.wake()
    return entry


async def run_pass(queue: Queue) -> float:
    next_due = await queue.dispatch_once()
    await wait_until(lambda: queue.in_flight == 0)
    return next_due


async def test_paced_mail_waits_on_disk_until_the_clock_says(tmp_path: Path) -> None:
    clock, deliverer = Clock(), ScriptedDeliverer()
    queue, spool = rig(tmp_path, deliverer, clock, mailbox_limits={"messages_per_minute": 2})
    try:
        arrive(queue, spool, clock)
        await run_pass(queue)
        clock.now = T + 10
        arrive(queue, spool, clock)
        await run_pass(queue)
        assert len(deliverer.calls) == 2            # the minute's two, at T and T + 10
        for _ in range(3):
            arrive(queue, spool, clock)
        await run_pass(queue)
        assert len(deliverer.calls) == 2
        waiting = sorted(spool.read(State.DEFERRED, n).next_attempt
                         for n in spool.names(State.DEFERRED))
        # Each waits for its own place in the window: as each of the minute's sends
        # becomes a minute old, and the third for the place the first of them takes.
        assert waiting == [T + 60, T + 70, T + 120]
        assert all(spool.read(State.DEFERRED, n).attempts == 0
                   for n in spool.names(State.DEFERRED))
        clock.now = T + 59
        assert await run_pass(queue) == T + 60      # nothing due yet; when to look again
        assert len(deliverer.calls) == 2
        clock.now = T + 60
        await run_pass(queue)
        assert len(deliverer.calls) == 3
        clock.now = T + 70
        await run_pass(queue)
        assert len(deliverer.calls) == 4
        clock.now = T + 120
        await run_pass(queue)
        assert len(deliverer.calls) == 5
        assert sum(spool.count(s) for s in State) == 0
    finally:
        await queue.stop(1)


async def test_the_lifetime_runs_out_on_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    deliverer = ScriptedDeliverer(Reply(451, "4.4.0 try later"))
    queue, spool = rig(tmp_path, deliverer, clock, max_lifetime="1h", retry_initial="10m",
                       retry_max="10m", bounce="none")
    msg = arrive(queue, spool, clock)
    try:
        await run_pass(queue)
        retry = spool.read(State.DEFERRED, f"{msg.id}.json")
        assert retry.attempts == 1 and T + 480 <= retry.next_attempt <= T + 600
        clock.now = T + 3600                        # due, and its hour is up
        await run_pass(queue)
        assert len(deliverer.calls) == 2
        failed = spool.read(State.FAILED, f"{msg.id}.json")
        assert failed.attempts == 2
        assert failed.failed == {"a@example.com": Reply.parse("451 4.4.0 try later")}
    finally:
        await queue.stop(1)


async def test_a_waiting_client_waits_even_when_every_session_is_busy(tmp_path: Path) -> None:
    """Synchronous mode under load: with the mailbox's sessions all taken, a client that
    asked to wait still gets its own message's answer (here the 5xx), not "queued"."""
    deliverer = ScriptedDeliverer(Reply(550, "5.1.1 User unknown"), delay=0.3)
    queue, spool = scripted_queue(tmp_path, deliverer,
                                  mailbox_limits={"max_sessions": 1})
    await queue.start()
    try:
        busy = asyncio.ensure_future(queue.submit(outbound(), wait=5))
        await wait_until(lambda: queue.in_flight == 1)
        reply = await asyncio.wait_for(queue.submit(outbound(), wait=5), 4)
        assert reply.code == 550, reply
        assert (await busy).code == 550
        assert sum(spool.count(s) for s in State) == 0     # refused, so nothing queued
    finally:
        await queue.stop(1)
