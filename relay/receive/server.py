"""The receiving side as a whole: its listeners, the connection gate, shutdown.

- :class:`Receiver`: binds the listeners, admits connections (limits overall and per
  client address), hands messages over as tasks it owns, reloads all or nothing, drains.

Everything runs on the caller's event loop (``loop.create_server`` with one aiosmtpd
protocol per connection, no Controller thread). Each new connection gets the settings
current at that moment, so a reload changes the rules for new sessions without touching
sessions in progress.

A reload is all or nothing. :meth:`Receiver.prepare` does everything that can fail — the
TLS context, binding the socket of every new listener — while the old listeners go on
accepting; :meth:`Receiver.commit` then switches in one step (nothing in it can fail), or
:meth:`Receiver.abandon` closes what was bound and the running configuration stays as it
was. A port that cannot be bound thus refuses the reload instead of leaving the relay
without a listener. Sockets of listeners that stay are never bound again: re-binding a
socket that is still held is what made a peer's SIGHUP reload exit (which listener is
"the same": :mod:`relay.receive.listeners`).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable

from relay.accept.route import Router
from relay.config import Config, ConfigError, Listener
from relay.core.log import message_context
from relay.core.message import Outbound
from relay.core.reply import Reply
from relay.receive import replies
from relay.receive.budget import MemoryBudget
from relay.receive.guard import AuthGuard, Clock, RefusalLog
from relay.receive.handler import OpenWriter, RelayHandler, Submit
from relay.receive.listeners import (
    BACKLOG,
    Bound,
    Identity,
    ListenerChange,
    describe,
    identities,
    listen,
    overlaps,
)
from relay.receive.passwords import PasswordVerifier
from relay.receive.session import (
    RelaySMTP,
    Settings,
    is_loopback,
)
from relay.receive.tls import SwitchableContext, server_context

log = logging.getLogger(__name__)

_DRAIN_POLL = 0.05
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
        self._bound: list[Bound] = []
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

    def admit(self, session: RelaySMTP) -> Reply | None:
        server = self._settings.config.server
        ip = session.client_ip
        if self._draining:
            refusal = replies.SHUTTING_DOWN
        elif len(self._sessions) >= server.max_connections:
            refusal = replies.TOO_MANY_CONNECTIONS
        elif self._per_client[ip] >= server.connections_per_client:
            refusal = replies.TOO_MANY_CONNECTIONS_FROM_CLIENT
        else:
            self._sessions.add(session)
            self._per_client[ip] += 1
            return None
        # A client that reconnects in a loop gets one line a minute, not one per attempt.
        held = self._refusals.hit(f"{ip} {refusal}")
        if held is not None:
            log.warning("connection refused: client=%s reply=%s%s", ip, refusal,
                        f" ({held} more since the last line)" if held else "",
                        extra={"event": "refused", "client": ip, "reply": str(refusal),
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
        """Configured listeners that accept no connections (readiness): still starting,
        stopped, or a listening socket closed under the relay."""
        serving = {b.identity for b in self._bound if b.server.is_serving()}
        listeners = self._settings.config.server.listeners
        return [listener for listener, identity in zip(listeners, identities(listeners),
                                                       strict=True)
                if identity not in serving]

    # --- listeners -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every configured listener; on any failure none stays bound."""
        if self._bound:
            raise RuntimeError("Receiver.start() called twice without stop()")
        self._draining = False
        settings = self._settings
        await self.commit(await self.prepare(settings.config, settings.router,
                                             settings.verifier, settings=settings))

    async def prepare(self, config: Config, router: Router, verifier: PasswordVerifier,
                      *, settings: Settings | None = None) -> ListenerChange:
        """Everything a switch to ``config`` needs that can fail; nothing in use changes.

        Raises :class:`relay.config.ConfigError` if the TLS certificate or key cannot be
        used, and :class:`OSError` naming the listener if a new one cannot be bound;
        whatever this call bound is closed again before it raises. The certificate is
        read again even if its file names did not change, so that a reload picks up a
        renewed certificate — also for implicit-TLS listeners, which stay bound. Follow
        with :meth:`commit` or :meth:`abandon`.
        """
        if settings is None:
            settings = self._settings_for(config, router, verifier)
        listeners = config.server.listeners
        switch = self._switch
        if (switch is None and settings.tls is not None and config.server.tls is not None
                and any(x.tls == "implicit" for x in listeners)):
            try:
                switch = SwitchableContext(config.server.tls, settings.tls)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError("configuration", [("server.tls", str(exc))]) from None
        change = ListenerChange(settings=settings, switch=switch)
        wanted = identities(listeners)
        current = {b.identity: b for b in self._bound}
        leaving = [b for b in self._bound if b.identity not in wanted]
        try:
            for i, (listener, identity) in enumerate(zip(listeners, wanted, strict=True)):
                old = current.get(identity)
                if old is None:
                    sock = self._bind(listener, leaving, f"server.listeners.{i}")
                    b = await self._serve(listener, identity, sock, settings, switch)
                    change.opened.append(b)
                elif (old.listener.tls == "implicit") != (listener.tls == "implicit"):
                    # TLS from the first byte belongs to the asyncio server, not to the
                    # session: a new server on a duplicate of the same listening socket,
                    # so that no connection waiting in its queue is lost.
                    [held] = old.server.sockets
                    b = await self._serve(listener, identity, held.dup(), settings, switch)
                    change.opened.append(b)
                    change.retired.append(old)
                else:
                    b = old
                    if listener != old.listener:
                        change.options.append((old, listener))
                change.bound.append(b)
        except BaseException:
            self.abandon(change)
            raise
        change.retired += leaving
        return change

    @staticmethod
    def _bind(listener: Listener, leaving: list[Bound], key: str) -> socket.socket:
        """:func:`_listen`, with an error that names the listener (``key``, its place in
        the config) and what to do: when the port is held by a listener this reload
        removes, why that cannot work; else which setting to change."""
        try:
            return listen(listener)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                holders = [b for b in leaving if b.port == listener.port
                           and overlaps(b.listener.address, listener.address)]
                if holders:
                    held = describe(holders[0].listener, holders[0].port)
                    hint = (f" (held by listener {held}, which "
                            "this configuration removes: new listeners are bound before "
                            "old ones close, so this change needs a restart)")
                else:
                    hint = (f" (another program has it, `ss -ltnp 'sport = :{listener.port}'` "
                            f"shows which: stop it, or change {key}.port)")
            elif exc.errno == errno.EADDRNOTAVAIL:
                hint = f" (no interface of this machine has it: change {key}.address)"
            elif exc.errno == errno.EACCES and listener.port < 1024:
                hint = (" (ports below 1024 need CAP_NET_BIND_SERVICE, see the systemd "
                        f"unit; or change {key}.port)")
            raise OSError(exc.errno, f"cannot listen on {describe(listener)}: "
                                     f"{exc.strerror or exc}{hint}") from exc

    async def _serve(self, listener: Listener, identity: Identity, sock: socket.socket,
                     settings: Settings, switch: SwitchableContext | None) -> Bound:
        """An asyncio server on ``sock`` (which it owns from now on), not accepting yet."""
        bound = Bound(listener, identity)

        def protocol() -> RelaySMTP:
            # Read at each connection: the settings and options current at that moment.
            return RelaySMTP(self._handler, settings=self._settings, listener=bound.listener,
                             gate=self, loopback_check=self._loopback_check)

        try:
            ssl_ctx: ssl.SSLContext | None = None
            if listener.tls == "implicit":
                if switch is None:
                    raise OSError(0, f"cannot listen on {describe(listener)}: "
                                     "tls: implicit needs server.tls")
                ssl_ctx = switch.front
            bound.server = await asyncio.get_running_loop().create_server(
                protocol, sock=sock, ssl=ssl_ctx, backlog=BACKLOG, start_serving=False,
                ssl_handshake_timeout=(
                    min(60.0, settings.config.server.idle_timeout) if ssl_ctx else None))
        except BaseException:
            sock.close()
            raise
        return bound

    def abandon(self, change: ListenerChange) -> None:
        """Undo :meth:`prepare`: close the servers (and sockets) it made. Sockets the
        running listeners hold stay open, even where a duplicate of one was made."""
        for b in change.opened:
            b.server.close()
        change.opened.clear()

    async def commit(self, change: ListenerChange) -> None:
        """Switch to what :meth:`prepare` made ready; nothing here can fail.

        New connections get the new settings and options from now on; open sessions keep
        theirs, also on a listener that is closed (closing stops only the accepting).
        """
        self._settings = change.settings
        self._apply_limits(change.settings.config)
        self._switch = change.switch
        if change.switch is not None and change.settings.tls is not None:
            change.switch.current = change.settings.tls
        for b, listener in change.options:
            b.listener = listener
        for b in change.retired:
            b.server.close()        # the port is free now; sessions on it are not touched
        self._bound = list(change.bound)
        self._refresh_bound()
        for b in change.opened:
            await b.server.start_serving()

    def update(self, config: Config, router: Router, verifier: PasswordVerifier) -> None:
        """Use ``config``'s settings for new sessions at once, leaving the listeners as
        they are (a reload uses :meth:`prepare` and :meth:`commit`, which also switch
        listeners). Raises :class:`relay.config.ConfigError`, changing nothing, if the
        TLS certificate or key cannot be used.
        """
        settings = self._settings_for(config, router, verifier)
        self._settings = settings
        self._apply_limits(config)
        if self._switch is not None and settings.tls is not None:
            self._switch.current = settings.tls

    def _apply_limits(self, config: Config) -> None:
        """The shared limits follow the config; what they hold (buffer shares taken,
        failed logins counted) carries over, so a SIGHUP gives no one a fresh start."""
        self._budget.update(config.server.buffer_memory)
        self.guard.configure(config.server.auth_throttle)

    async def _unbind(self, bound: list[Bound]) -> None:
        for b in bound:
            b.server.close()
            self._bound.remove(b)
        for b in bound:
            await b.server.wait_closed()

    def _refresh_bound(self) -> None:
        self.bound = [sock.getsockname()[:2] for b in self._bound
                      for sock in (b.server.sockets or ())]

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
                    session.shut(replies.SHUTTING_DOWN)
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
            session.shut(replies.SHUTTING_DOWN)
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
