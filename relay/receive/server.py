"""The listening side: sockets, the connection limit, reload and shutdown.

Everything runs on the caller's event loop (``loop.create_server`` with one aiosmtpd
protocol per connection, no Controller thread). Each new connection gets the settings
current at that moment, so :meth:`Receiver.update` changes the rules for new sessions
without touching bound sockets or sessions in progress — re-binding a socket that is
still held is what made a peer's SIGHUP reload exit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import Config, Listener
from relay.log import message_context
from relay.message import Outbound, Reply
from relay.passwords import PasswordVerifier
from relay.receive.data import MemoryBudget
from relay.receive.guard import AuthGuard, Clock, RefusalLog
from relay.receive.handler import OpenWriter, RelayHandler, Submit
from relay.receive.session import (
    SHUTTING_DOWN,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_CONNECTIONS_FROM_CLIENT,
    RelaySMTP,
    Settings,
    is_loopback,
)
from relay.route import Router
from relay.tlsconfig import SwitchableContext, server_context

log = logging.getLogger(__name__)

_DRAIN_POLL = 0.05


@dataclass
class _Bound:
    listener: Listener
    server: asyncio.Server


def _describe(listener: Listener) -> str:
    host = f"[{listener.address}]" if ":" in listener.address else listener.address
    return f"{host}:{listener.port}"


class Receiver:
    """All SMTP listeners of the relay and the sessions on them.

    ``loopback_check`` decides which client addresses count as this machine (AUTH is
    offered over plaintext only to those); tests replace it to play a remote client.
    ``clock`` drives the failed-AUTH penalties and the refusal log (tests move it on).
    """

    def __init__(self, config: Config, *, router: Router, verifier: PasswordVerifier,
                 submit: Submit, writer: OpenWriter,
                 loopback_check: Callable[[str], bool] = is_loopback,
                 clock: Clock = time.monotonic) -> None:
        self._submit = submit
        self._loopback_check = loopback_check
        self._settings = self._settings_for(config, router, verifier)
        # Kept across reloads: a SIGHUP must not give a password guesser a fresh start.
        self.guard = AuthGuard(config.server.auth_throttle, clock=clock)
        self._refusals = RefusalLog(clock=clock)
        self._per_client: collections.Counter[str] = collections.Counter()
        self._handler = RelayHandler(self._spawn, writer)
        self._budget = MemoryBudget(config.server.buffer_memory)
        self._bound: list[_Bound] = []
        self._sessions: set[RelaySMTP] = set()
        self._submissions: set[asyncio.Task[Reply]] = set()
        self._switch: SwitchableContext | None = None
        self._draining = False
        self.bound: list[tuple[str, int]] = []

    @staticmethod
    def _settings_for(config: Config, router: Router, verifier: PasswordVerifier
                      ) -> Settings:
        tls: ssl.SSLContext | None = None
        if config.server.tls is not None:
            tls = server_context(config.server.tls)
        return Settings(config=config, router=router, verifier=verifier, tls=tls)

    @property
    def settings(self) -> Settings:
        return self._settings

    # --- Gate (used by every session) --------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def budget(self) -> MemoryBudget:
        return self._budget

    def admit(self, session: RelaySMTP) -> str | None:
        server = self._settings.config.server
        ip = session.client_ip
        if self._draining:
            refusal = SHUTTING_DOWN
        elif len(self._sessions) >= server.max_connections:
            refusal = TOO_MANY_CONNECTIONS
        elif self._per_client[ip] >= server.connections_per_client:
            refusal = TOO_MANY_CONNECTIONS_FROM_CLIENT
        else:
            self._sessions.add(session)
            self._per_client[ip] += 1
            return None
        # A client that reconnects in a loop gets one line a minute, not one per attempt.
        held = self._refusals.hit(f"{ip} {refusal}")
        if held is not None:
            log.warning("connection refused: client=%s reply=%s%s", ip, refusal,
                        f" ({held} more since the last line)" if held else "",
                        extra={"event": "refused", "client": ip, "reply": refusal,
                               "not_logged": held})
        return refusal

    def release(self, session: RelaySMTP) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            ip = session.client_ip
            self._per_client[ip] -= 1
            if self._per_client[ip] <= 0:
                del self._per_client[ip]

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def unbound(self) -> list[Listener]:
        """Configured listeners without a bound socket (readiness: still starting, or a
        reload added one that could not be bound)."""
        missing = list(self._settings.config.server.listeners)
        for b in self._bound:
            if b.listener in missing:
                missing.remove(b.listener)
        return missing

    # --- listeners -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every configured listener; on any failure none stays bound."""
        if self._bound:
            raise RuntimeError("Receiver.start() called twice without stop()")
        self._draining = False
        try:
            for listener in self._settings.config.server.listeners:
                await self._bind(listener)
        except BaseException:
            await self._unbind(list(self._bound))
            raise
        self._refresh_bound()

    async def _bind(self, listener: Listener) -> None:
        settings = self._settings
        ssl_ctx: ssl.SSLContext | None = None
        if listener.tls == "implicit":
            if settings.tls is None or settings.config.server.tls is None:
                raise OSError(0, f"cannot listen on {_describe(listener)}: "
                                 "tls: implicit needs server.tls")
            if self._switch is None:
                self._switch = SwitchableContext(settings.config.server.tls, settings.tls)
            ssl_ctx = self._switch.front
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: RelaySMTP(self._handler, settings=self._settings, listener=listener,
                                  gate=self, loopback_check=self._loopback_check),
                host=listener.address, port=listener.port, ssl=ssl_ctx,
                ssl_handshake_timeout=(
                    min(60.0, settings.config.server.idle_timeout) if ssl_ctx else None),
                reuse_address=True)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {_describe(listener)}: "
                                     f"{exc.strerror or exc}") from exc
        self._bound.append(_Bound(listener, server))

    async def _unbind(self, bound: list[_Bound]) -> None:
        for b in bound:
            b.server.close()
            self._bound.remove(b)
        for b in bound:
            await b.server.wait_closed()

    def _refresh_bound(self) -> None:
        self.bound = [sock.getsockname()[:2] for b in self._bound
                      for sock in (b.server.sockets or ())]

    def update(self, config: Config, router: Router, verifier: PasswordVerifier) -> None:
        """Use ``config`` for new sessions; running sessions keep what they started with.

        Raises :class:`relay.config.ConfigError` (changing nothing) if the TLS
        certificate or key cannot be used. The certificate is read again even if its
        file names did not change, so a renewed certificate is picked up by a reload —
        also by implicit-TLS listeners, which stay bound. Listener changes need
        :meth:`sync_listeners`.
        """
        settings = self._settings_for(config, router, verifier)
        self._settings = settings
        self._budget.update(config.server.buffer_memory)
        self.guard.configure(config.server.auth_throttle)
        if self._switch is not None and settings.tls is not None:
            self._switch.current = settings.tls

    async def sync_listeners(self) -> None:
        """Bind listeners added since start and close removed ones; keep the rest bound."""
        wanted = list(self._settings.config.server.listeners)
        gone: list[_Bound] = []
        for b in self._bound:
            if b.listener in wanted:
                wanted.remove(b.listener)
            else:
                gone.append(b)
        await self._unbind(gone)
        for listener in wanted:
            await self._bind(listener)
        self._refresh_bound()

    # --- submissions ---------------------------------------------------------------------

    def _spawn(self, outbound: Outbound) -> asyncio.Task[Reply]:
        task = asyncio.ensure_future(self._submit(outbound))
        self._submissions.add(task)
        task.add_done_callback(self._submitted)
        return task

    def _submitted(self, task: asyncio.Task[Reply]) -> None:
        self._submissions.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:        # also marks it retrieved
            log.debug("submission ended with %r", task.exception())

    # --- shutdown --------------------------------------------------------------------------

    async def drain(self, grace: float) -> bool:
        """Finish what is in flight, then close; True if everything finished in time.

        New connections are answered ``421 4.3.2 Service shutting down``; sessions
        between transactions are closed with that reply; a transaction under way may
        complete (its MAIL FROM got a 250, so the client expects to finish).
        """
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            for session in list(self._sessions):
                if session.idle:
                    session.shut(SHUTTING_DOWN)
            if not self._sessions and not self._submissions:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_DRAIN_POLL)

    async def stop(self, grace: float = 0.0) -> None:
        """Close the listeners and every session; wait up to ``grace`` s for work in flight.

        Submissions still running after that are cancelled: their clients have had no
        final reply, so they keep the message and send it again.
        """
        if grace > 0:
            await self.drain(grace)
        self._draining = True
        bound = list(self._bound)
        for b in bound:
            b.server.close()
        sessions = list(self._sessions)
        for session in sessions:
            session.shut(SHUTTING_DOWN)
        tasks = [t for s in sessions if (t := s.handler_task) is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        pending = set(self._submissions)
        if pending:
            with message_context("-"):
                log.warning("stopping: cancelling %d message hand-over(s) in flight",
                            len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._unbind(bound)
        self._refresh_bound()
