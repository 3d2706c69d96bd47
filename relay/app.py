"""The running relay: owns start-up, signals and shutdown of all the stages.

receive (SMTP server) -> route + policy -> spool -> queue -> deliver (token + upstream).
One object holds them so that start, stop and reload happen in one place and in the
right order: the spool is recovered before anything is accepted, and on shutdown the
listeners stop before the queue does, so nothing is accepted that cannot be stored.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import signal
import time
from collections.abc import Callable

from relay.accept.route import Router
from relay.config import Config, ConfigError, changed_keys
from relay.core import diskio
from relay.core.log import reconfigure
from relay.core.message import Outbound
from relay.core.net import host_port
from relay.core.reply import Reply
from relay.deliver.deliverer import Deliverer
from relay.oauth.registry import Tokens
from relay.ops import notify as notify
from relay.ops.http import HttpEndpoint
from relay.ops.metrics import RelayMetrics
from relay.queue.scheduler import Queue
from relay.receive.passwords import PasswordVerifier
from relay.receive.server import Receiver
from relay.spool.store import Spool

log = logging.getLogger(__name__)


class Relay:
    """All stages of one relay process, built from one :class:`Config`."""

    def __init__(self, config: Config, *,
                 on_reload: Callable[[Config], None] | None = None) -> None:
        self.config = config
        # Told of each configuration a reload takes, before any stage switches to it (the
        # sandbox's stand-ins follow the relay's credentials and permissions this way).
        self._on_reload = on_reload
        self.metrics = RelayMetrics()
        self.tokens = Tokens(config, hooks=self.metrics)
        self.deliverer = Deliverer(config, self.tokens, hooks=self.metrics)
        self.spool = Spool(config.spool.directory)
        self.queue = Queue(self.spool, self.deliverer, config, hooks=self.metrics)
        self.verifier = PasswordVerifier({n: u.password_hash for n, u in config.users.items()})
        self.receiver = Receiver(config, router=Router(config), verifier=self.verifier,
                                 submit=self.submit, writer=self.spool.writer)
        self.metrics.watch(self)
        self.http = HttpEndpoint(self, self.metrics) if config.http.enabled else None
        self._stopping = asyncio.Event()
        # One reload at a time; a SIGHUP while one runs queues one more (not one per signal).
        self._reload_lock = asyncio.Lock()
        self._reload_queued = False
        self._reloads: set[asyncio.Task[None]] = set()
        self._reloads_closed = False        # shutting down: SIGHUP starts no reload

    async def submit(self, msg: Outbound) -> Reply:
        """Spool an accepted message; the 250 goes out only once it is safely on disk."""
        profile = self.config.profiles.get(msg.profile)
        wait = ((profile.synchronous if profile else None) or msg.synchronous
                or self.config.delivery.synchronous)
        try:
            reply = await self.queue.submit(msg, wait=wait)
        except OSError as exc:
            log.error("cannot spool the message: %s", exc.strerror or exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                reply = Reply(452, "4.3.1 Insufficient system storage; try again later")
            else:
                reply = Reply(451, "4.3.0 Cannot store the message right now; try again later")
        self.metrics.received(msg.profile, reply)
        return reply

    @property
    def listening(self) -> list[tuple[str, int]]:
        return list(self.receiver.bound)

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where the HTTP endpoint listens (the bound port, also for ``port: 0``)."""
        return self.http.address if self.http is not None else None

    async def start(self) -> None:
        diskio.configure(self.config.spool.io_threads)
        self.spool.open(on_tmpfs=self.config.spool.on_tmpfs)
        self.spool.claim()
        try:
            # The HTTP endpoint comes first, so that probes get answers (live, not ready
            # yet) while a long spool is being recovered.
            if self.http is not None:
                await self.http.start()
            await self.queue.start()
            # Listeners before tokens: a port that cannot be bound ends the start before
            # any request to Entra ID is in flight (one the relay would only abandon).
            await self.receiver.start()
            self.tokens.start()
        except BaseException:
            if self.http is not None:
                await self.http.stop()      # a no-op if it never started
            self.spool.unclaim()
            raise
        log.info("listening on %s; spool %s", ", ".join(
            host_port(h, p) for h, p in self.listening), self.spool.root)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting (new clients get 421), let work in flight finish within ``grace``.

        What is not finished by then stays in the spool and is delivered after a restart.
        """
        deadline = time.monotonic() + grace
        try:
            await self._finish_reloads()
            await self.receiver.stop(grace=grace)
            await self.queue.stop(max(0.0, deadline - time.monotonic()))
            await self.deliverer.aclose()
            await self.tokens.aclose()
        finally:
            # Last, so that /readyz says "shutting down" for the whole drain.
            if self.http is not None:
                await self.http.stop()
            await self.metrics.close()
            self.spool.unclaim()

    def request_stop(self) -> None:
        self._stopping.set()

    async def reload(self, load: Callable[[], Config]) -> bool:
        """Swap in a new config; True if it was taken. See :meth:`_reload`."""
        async with self._reload_lock:
            if self._reloads_closed:
                log.warning("reload skipped: shutting down")
                return False
            return await self._reload(load) is None

    async def _reload(self, load: Callable[[], Config]) -> str | None:
        """Swap in a new config, or refuse it and keep the running one: all or nothing.

        First everything that can fail, changing nothing in use: the YAML and its
        validation, the TLS certificate, CA files (the deliverer's pools) and binding the
        sockets of new listeners, while the old listeners go on accepting. If any of it
        fails, what was bound for the new config is closed, the log says the reload was
        refused and why, and the reason is returned. Otherwise every stage switches, in
        steps that cannot fail, and None is returned. Open client connections are kept,
        and so are the sockets of listeners whose address and port did not change.

        The caller holds ``_reload_lock``: one reload at a time.
        """
        try:
            config = load()
            pools = self.deliverer.prepare(config)       # changes nothing yet
            change = await self.receiver.prepare(config, Router(config), self.verifier)
        except (ConfigError, ValueError, OSError) as exc:
            # The listener's OSError without "[Errno 98]": its text says it all.
            reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                      and exc.filename is None else str(exc))
            log.error("reload refused, keeping the running configuration:\n%s", reason)
            return reason
        except Exception as exc:
            log.exception("reload refused, keeping the running configuration: "
                          "unexpected error")
            return f"unexpected error: {exc!r}"
        # From here on nothing can fail: every stage switches.
        changed = changed_keys(self.config, config)
        config = self._running_until_restart(config)
        if self._on_reload is not None:
            self._on_reload(config)
        self.deliverer.apply(config, pools)
        await self.receiver.commit(change)
        if config.logging != self.config.logging:
            reconfigure(config.logging.level, config.logging.format)
        self.metrics.configure(config)
        self.queue.update(config)
        self.tokens.update(config)
        self.verifier.update({n: u.password_hash for n, u in config.users.items()})
        self.config = config
        applied = [key for key in changed if not _needs_restart(key)]
        waiting = [key for key in changed if _needs_restart(key)]
        if applied:
            log.info("reload applied: %s", ", ".join(applied))
        if waiting:
            log.warning("reload not applied until the relay restarts: %s", ", ".join(waiting))
        if not changed:
            log.info("reload: no setting changed")
        for line in change.summary():
            log.info("%s", line)
        log.info("configuration reloaded; SMTP listeners: %s", ", ".join(
            host_port(h, p) for h, p in self.listening))
        return None

    def _running_until_restart(self, config: Config) -> Config:
        """``config`` with the running values of what only a restart changes, so that
        ``self.config`` says what runs, and the next reload names them again."""
        http = config.http.model_copy(update={
            key: getattr(self.config.http, key) for key in ("enabled", "address", "port")})
        server = config.server.model_copy(
            update={"event_loop": self.config.server.event_loop})
        return config.model_copy(update={"spool": self.config.spool, "http": http,
                                         "server": server})

    async def serve(self, reload: Callable[[], Config] | None = None,
                    on_ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config when ``reload`` is given,
        SIGUSR1 makes every deferred message due now (like ``postqueue -f``).

        ``on_ready`` runs once every listener accepts connections (banner, readiness).
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, self.queue.flush)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: self._request_reload(reload))
        else:
            loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
                "SIGHUP ignored: this instance cannot reload its configuration"))
        watchdog: asyncio.Task[None] | None = None
        started = False
        try:
            await self.start()
            started = True
            notify.ready(self._status())
            watchdog = notify.start_watchdog(lambda: not self.queue.failed)
            if on_ready is not None:
                on_ready()
            await self._stopping.wait()
            log.info("stopping")
        finally:
            # The drain may take shutdown_timeout: ask systemd for that much (and a margin
            # for closing up) so that a short TimeoutStopSec= does not kill it half-way.
            # A relay that never started has nothing to drain: it only tidies up, and
            # its exit status and log line tell systemd and the operator why.
            if started:
                notify.stopping("draining: no new mail accepted",
                                timeout=self.config.delivery.shutdown_timeout + 15)
            # Keep handling signals until the drain is over: a default SIGHUP or SIGUSR1
            # handler would kill the process half-way through it.
            for sig in (signal.SIGHUP, signal.SIGUSR1):
                loop.add_signal_handler(sig, functools.partial(
                    log.warning, "%s ignored: shutting down", sig.name))
            try:
                await self.stop(grace=self.config.delivery.shutdown_timeout)
            finally:
                await notify.stop_watchdog(watchdog)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                    loop.remove_signal_handler(sig)

    def _request_reload(self, load: Callable[[], Config]) -> None:
        """SIGHUP: run :meth:`_reload_notifying` as a task. Signals that arrive while a
        reload is queued add nothing: that reload reads the file after them anyway."""
        if self._reload_queued or self._reloads_closed or self._stopping.is_set():
            return
        self._reload_queued = True
        task = asyncio.get_running_loop().create_task(self._reload_notifying(load),
                                                      name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload_notifying(self, load: Callable[[], Config]) -> None:
        """:meth:`_reload`, bracketed by RELOADING=1 and READY=1 for systemd; the READY's
        STATUS says whether the new configuration runs or was refused, and why."""
        async with self._reload_lock:
            self._reload_queued = False
            if self._reloads_closed:
                return                  # shutting down: systemd has had STOPPING=1
            notify.reloading("reloading configuration")
            refused = await self._reload(load)
            if refused is None:
                notify.ready(self._status())
                return
            reason = " ".join(refused.split())
            if len(reason) > 200:
                reason = reason[:199] + "\u2026"
            notify.ready(f"reload refused, running the previous configuration: {reason}")

    async def _finish_reloads(self) -> None:
        """Wait for a reload in progress (it never waits on anything slow) and allow no
        more, so that shutdown does not close listeners under a reload, nor a reload bind
        new ones after shutdown."""
        async with self._reload_lock:
            self._reloads_closed = True

    def _status(self) -> str:
        """One line for ``systemctl status``."""
        where = ", ".join(host_port(h, p) for h, p in self.listening) or "no listener"
        return f"accepting mail on {where}"


# What a reload cannot switch while the relay runs: the spool (its directory is locked
# and its disk threads started), where the HTTP endpoint listens, and the event loop.
_RESTART_ONLY = ("spool", "http.enabled", "http.address", "http.port", "server.event_loop")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``server.event_loop`` asks for: uvloop's (``auto`` when it is
    installed), or None for asyncio's own. ImportError if ``uvloop`` is asked for and
    missing."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def _needs_restart(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in _RESTART_ONLY)
