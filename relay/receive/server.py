"""The listening side: sockets, the connection limit, reload and shutdown.

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
socket that is still held is what made a peer's SIGHUP reload exit.

Which new listener is "the same" as a bound one (:func:`identities`): the one with the
same address and port. Listeners on port 0 (any free port, as in tests) are matched by
position: the n-th port-0 listener on an address in the new configuration is the n-th one
on that address in the old. A listener that keeps its identity keeps its socket even when
its other options (tls, require_tls, synchronous) change: new connections get the new
options, open sessions keep theirs.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.accept.route import Router
from relay.config import Config, ConfigError, Listener
from relay.core.log import message_context
from relay.core.message import Outbound
from relay.core.net import host_port
from relay.core.reply import Reply
from relay.receive.data import MemoryBudget
from relay.receive.guard import AuthGuard, Clock, RefusalLog
from relay.receive.handler import OpenWriter, RelayHandler, Submit
from relay.receive.passwords import PasswordVerifier
from relay.receive.session import (
    SHUTTING_DOWN,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_CONNECTIONS_FROM_CLIENT,
    RelaySMTP,
    Settings,
    is_loopback,
)
from relay.receive.tls import SwitchableContext, server_context

log = logging.getLogger(__name__)

_DRAIN_POLL = 0.05
_BACKLOG = 100                # asyncio's default for create_server

# Who a listener is across a reload: (normalised address, port, position); see identities().
Identity = tuple[str, int, int]


@dataclass(eq=False)
class _Bound:
    """One listening socket and the asyncio server that accepts on it.

    ``listener`` holds the options that new connections accepted by ``server`` get; a
    reload that changes only options replaces it in place, keeping server and socket.
    """

    listener: Listener
    identity: Identity
    server: asyncio.Server = field(init=False)

    @property
    def port(self) -> int:
        """The port actually bound (the kernel's choice for ``port: 0``)."""
        sockets = self.server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else self.listener.port


@dataclass(eq=False)
class ListenerChange:
    """A switch of the receiver to a new configuration, made ready by
    :meth:`Receiver.prepare`: every step that could fail is done, nothing in use changed.

    New sockets are bound and listening already (the kernel queues connections to them),
    but nothing accepts on them until :meth:`Receiver.commit`.
    """

    settings: Settings
    switch: SwitchableContext | None
    bound: list[_Bound] = field(default_factory=list)     # after the commit, config order
    options: list[tuple[_Bound, Listener]] = field(default_factory=list)  # kept sockets
    opened: list[_Bound] = field(default_factory=list)    # servers made for this change
    retired: list[_Bound] = field(default_factory=list)   # servers the commit closes

    def summary(self) -> list[str]:
        """One line per listener that changes, for the log."""
        replaced = {b.identity for b in self.retired} & {b.identity for b in self.opened}
        lines = [f"listener {_describe(b.listener)} closed (its open connections go on)"
                 for b in self.retired if b.identity not in replaced]
        lines += [f"listener {_describe(b.listener)} "
                  + (f"keeps its socket, new connections get: {_options(b.listener)}"
                     if b.identity in replaced else f"added: {_options(b.listener)}")
                  for b in self.opened]
        lines += [f"listener {_describe(new)} keeps its socket, new connections get: "
                  f"{_options(new)}" for _, new in self.options]
        return lines


def _describe(listener: Listener, port: int | None = None) -> str:
    return host_port(listener.address, listener.port if port is None else port)


def _options(listener: Listener) -> str:
    sync = f", synchronous {listener.synchronous:g}s" if listener.synchronous else ""
    return f"tls {listener.tls}, require_tls {str(listener.require_tls).lower()}{sync}"


def identities(listeners: list[Listener]) -> list[Identity]:
    """Who each listener is across a reload: (address, port, n).

    The address is normalised (``::1`` and ``0:0::1`` are one address). ``n`` numbers the
    listeners with the same address and port in their order; a fixed port may be listed
    only once per address, so ``n`` is 0 except for port-0 listeners, which are thereby
    matched by position.
    """
    seen: dict[tuple[str, int], int] = {}
    out: list[Identity] = []
    for listener in listeners:
        key = (ipaddress.ip_address(listener.address).compressed, listener.port)
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append((key[0], key[1], n))
    return out


def _overlaps(a: str, b: str) -> bool:
    """Whether sockets on addresses ``a`` and ``b`` compete for the same ports."""
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return ia.version == ib.version and (ia == ib or ia.is_unspecified or ib.is_unspecified)


def _listen(listener: Listener) -> socket.socket:
    """A bound, listening, non-blocking TCP socket for ``listener``.

    Made here rather than by ``loop.create_server`` so that it holds the port and queues
    connections before anything accepts on it: a reload binds first and starts accepting
    only once nothing can fail any more.
    """
    ip = ipaddress.ip_address(listener.address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # As asyncio does: "::" is IPv6 only; IPv4 needs a listener of its own.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.address, listener.port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


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
            for listener, identity in zip(listeners, wanted, strict=True):
                old = current.get(identity)
                if old is None:
                    sock = self._bind(listener, leaving)
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
    def _bind(listener: Listener, leaving: list[_Bound]) -> socket.socket:
        """:func:`_listen`, with an error that names the listener and, when the port is
        held by a listener this reload removes, says why that cannot work."""
        try:
            return _listen(listener)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                holders = [b for b in leaving if b.port == listener.port
                           and _overlaps(b.listener.address, listener.address)]
                if holders:
                    held = _describe(holders[0].listener, holders[0].port)
                    hint = (f" (held by listener {held}, which "
                            "this configuration removes: new listeners are bound before "
                            "old ones close, so this change needs a restart)")
            raise OSError(exc.errno, f"cannot listen on {_describe(listener)}: "
                                     f"{exc.strerror or exc}{hint}") from exc

    async def _serve(self, listener: Listener, identity: Identity, sock: socket.socket,
                     settings: Settings, switch: SwitchableContext | None) -> _Bound:
        """An asyncio server on ``sock`` (which it owns from now on), not accepting yet."""
        bound = _Bound(listener, identity)

        def protocol() -> RelaySMTP:
            # Read at each connection: the settings and options current at that moment.
            return RelaySMTP(self._handler, settings=self._settings, listener=bound.listener,
                             gate=self, loopback_check=self._loopback_check)

        try:
            ssl_ctx: ssl.SSLContext | None = None
            if listener.tls == "implicit":
                if switch is None:
                    raise OSError(0, f"cannot listen on {_describe(listener)}: "
                                     "tls: implicit needs server.tls")
                ssl_ctx = switch.front
            bound.server = await asyncio.get_running_loop().create_server(
                protocol, sock=sock, ssl=ssl_ctx, backlog=_BACKLOG, start_serving=False,
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

    async def _unbind(self, bound: list[_Bound]) -> None:
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
