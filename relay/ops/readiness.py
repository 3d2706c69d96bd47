"""What ``/readyz`` answers: whether the relay can take and deliver mail, and if not, why.

- :class:`ReadinessCheck`: decides it for one relay (through :class:`relay.ops.view.RelayView`);
- :class:`Readiness`, :class:`Check`: the result, one check per line, what is not ready
  first (``listeners: NOT READY: not bound: 127.0.0.1:2525``).

Ready means: every listener bound and not shutting down, the queue running, the spool
writable (a probe file written, fsynced and removed in a worker thread), a token
obtainable for every credential (the cached one while valid, else a fetch with a short
timeout), and no profile whose mail the upstream keeps refusing (its login, or SendAs:
see :mod:`relay.ops.profilehealth`; judged from delivery attempts, never by contacting
Exchange). The answer names the upstream's reply and the fix. The spool and token
results are reused for ``http.cache_ttl``, so probes cannot hammer Entra ID or the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from relay.core.net import host_port
from relay.oauth.provider import MIN_USABLE, TokenProvider
from relay.oauth.token import TokenError
from relay.ops.metrics import RelayMetrics
from relay.ops.view import RelayView

# Readiness is a page of the HTTP endpoint: its log lines carry the endpoint's name.
log = logging.getLogger("relay.ops.http")

TOKEN_TIMEOUT = 2.0           # readiness waits this long for a token fetch (it goes on)
SPOOL_TIMEOUT = 2.0           # ... and this long for the spool probe


@dataclass(frozen=True)
class Check:
    """One line of the answer: what was checked, whether it is ready, and the detail."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Readiness:
    checks: list[Check]

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    def render(self) -> str:
        """What is not ready first: a probe's log usually shows only the first lines."""
        ordered = sorted(self.checks, key=lambda c: c.ok)
        lines = [f"{c.name}: {'ok' if c.ok else 'NOT READY'}: {c.detail}" for c in ordered]
        return ("ready" if self.ready else "not ready") + "\n" + "\n".join(lines) + "\n"


class ReadinessCheck:
    """Decides /readyz. Cheap checks (listeners, shutdown, queue) are made for every
    probe; the spool probe and the tokens at most once per ``http.cache_ttl``, with one
    evaluation in flight however many probes arrive."""

    def __init__(self, relay: RelayView, metrics: RelayMetrics) -> None:
        self._relay = relay
        self._metrics = metrics
        self._cached: tuple[float, list[Check]] | None = None
        self._evaluating: asyncio.Task[list[Check]] | None = None
        self._spool_probe: asyncio.Future[None] | None = None
        self._spool_probe_started = 0.0
        self._probe_numbers = itertools.count(1)

    async def result(self) -> Readiness:
        checks = self._live_checks()
        ttl = self._relay.config.http.cache_ttl
        cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < ttl:
            return Readiness(checks + cached[1])
        if self._evaluating is None or self._evaluating.done():
            self._evaluating = asyncio.ensure_future(self._evaluate())
        # Shielded: a probe that gives up does not cancel the evaluation for the others.
        return Readiness(checks + await asyncio.shield(self._evaluating))

    def _live_checks(self) -> list[Check]:
        relay = self._relay
        receiver = relay.receiver
        if receiver.draining:
            listeners = Check("listeners", False, "shutting down: new connections get 421")
        elif unbound := receiver.unbound:
            where = ", ".join(host_port(x.address, x.port) for x in unbound)
            listeners = Check("listeners", False, f"not bound: {where}")
        else:
            listeners = Check("listeners", True, "bound: " + ", ".join(
                host_port(h, p) for h, p in relay.listening))
        if relay.queue.failed:
            queue = Check("queue", False, "the dispatcher stopped unexpectedly (see the log)")
        elif not relay.queue.running:
            queue = Check("queue", False, "not running (recovering the spool, or stopping)")
        else:
            queue = Check("queue", True, f"{relay.queue.in_flight} attempt(s) in flight")
        # From memory, so never cached: a profile shows ready again with the attempt
        # that logged in, not up to cache_ttl later.
        profiles = [Check(f"profile {s.profile}", s.ready, s.detail)
                    for s in self._metrics.profiles.statuses()]
        return [listeners, queue, *profiles]

    async def _evaluate(self) -> list[Check]:
        relay = self._relay
        try:
            providers = list(relay.tokens)
            results = await asyncio.gather(
                self._spool(), *(self._token(name, p) for name, p in providers))
            checks = list(results)
        except Exception:
            log.exception("readiness check failed")
            checks = [Check("readiness", False, "the check itself failed (see the log)")]
        self._cached = (time.monotonic(), checks)
        return checks

    async def _spool(self) -> Check:
        relay = self._relay
        if not relay.queue.running:
            # Recovery empties spool/tmp; a probe file there could vanish under it.
            return Check("spool", False, "not checked while the queue is not running")
        root = relay.spool.root
        probe = self._spool_probe
        if probe is not None and not probe.done():
            stuck = time.monotonic() - self._spool_probe_started
            return Check("spool", False, f"{root}: the previous write probe has not finished "
                                         f"after {stuck:.0f} s (is the disk hung?)")
        path = root / "tmp" / f".readyz-{os.getpid()}-{next(self._probe_numbers)}"
        self._spool_probe_started = time.monotonic()
        probe = self._spool_probe = asyncio.ensure_future(asyncio.to_thread(_write_probe,
                                                                             path))
        try:
            async with asyncio.timeout(SPOOL_TIMEOUT):
                await asyncio.shield(probe)
        except TimeoutError:
            return Check("spool", False, f"{root}: writing a probe file took more than "
                                         f"{SPOOL_TIMEOUT:g} s")
        except OSError as exc:
            return Check("spool", False, f"{root} is not writable: {exc.strerror or exc}")
        return Check("spool", True, f"{root} is writable")

    async def _token(self, name: str, provider: TokenProvider) -> Check:
        what = f"credential {name}"
        token = provider.current
        if token is not None and token.expires_in() > MIN_USABLE:
            return Check(what, True, f"token valid for {token.expires_in():.0f} s")
        try:
            async with asyncio.timeout(TOKEN_TIMEOUT):
                token = await provider.get()
        except TimeoutError:
            return Check(what, False, f"no valid token, and Entra ID did not answer within "
                                      f"{TOKEN_TIMEOUT:g} s (the relay keeps trying)")
        except TokenError as exc:
            return Check(what, False, f"no valid token: {exc.message}")
        return Check(what, True, f"token valid for {token.expires_in():.0f} s")

    async def close(self) -> None:
        for task in (self._evaluating, self._spool_probe):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _write_probe(path: Path) -> None:
    """What accepting a message needs from the spool: create, write, fsync, remove."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"ready?\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
