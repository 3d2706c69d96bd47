"""Listening sockets and how a reload changes them, all or nothing.

- :class:`ListenerChange`: a switch to a new set of listeners, prepared (every socket
  bound) before anything in use changes;
- :func:`identities`: which new listener is "the same" as a running one;
- :func:`listen`: a bound, listening socket for one listener, before anything accepts on it;
- :func:`describe`, :func:`overlaps`: a listener for the log; whether two addresses
  compete for the same ports.

Which new listener is "the same" as a bound one (:func:`identities`): the one with the
same address and port. Listeners on port 0 (any free port, as in tests) are matched by
position: the n-th port-0 listener on an address in the new configuration is the n-th one
on that address in the old. A listener that keeps its identity keeps its socket even when
its other options (tls, require_tls, synchronous) change: new connections get the new
options, open sessions keep theirs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field

from relay.config import Listener
from relay.core.net import host_port
from relay.receive.session import Settings
from relay.receive.tls import SwitchableContext

BACKLOG = 100                # asyncio's default for create_server

# Who a listener is across a reload: (normalised address, port, position); see identities().
Identity = tuple[str, int, int]


@dataclass(eq=False)
class Bound:
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
    bound: list[Bound] = field(default_factory=list)     # after the commit, config order
    options: list[tuple[Bound, Listener]] = field(default_factory=list)  # kept sockets
    opened: list[Bound] = field(default_factory=list)    # servers made for this change
    retired: list[Bound] = field(default_factory=list)   # servers the commit closes

    def summary(self) -> list[str]:
        """One line per listener that changes, for the log."""
        replaced = {b.identity for b in self.retired} & {b.identity for b in self.opened}
        lines = [f"listener {describe(b.listener)} closed (its open connections go on)"
                 for b in self.retired if b.identity not in replaced]
        lines += [f"listener {describe(b.listener)} "
                  + (f"keeps its socket, new connections get: {_options(b.listener)}"
                     if b.identity in replaced else f"added: {_options(b.listener)}")
                  for b in self.opened]
        lines += [f"listener {describe(new)} keeps its socket, new connections get: "
                  f"{_options(new)}" for _, new in self.options]
        return lines


def describe(listener: Listener, port: int | None = None) -> str:
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


def overlaps(a: str, b: str) -> bool:
    """Whether sockets on addresses ``a`` and ``b`` compete for the same ports."""
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return ia.version == ib.version and (ia == ib or ia.is_unspecified or ib.is_unspecified)


def listen(listener: Listener) -> socket.socket:
    """A bound, listening, non-blocking TCP socket for ``listener``.

    Made here rather than by ``loop.create_server`` so that it holds the port and queues
    connections before anything accepts on it: a reload binds first and starts accepting
    only once nothing can fail any more.
    """
    ip = ipaddress.ip_address(listener.address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # that say they are TCP, and accepted sockets inherit this. With Nagle on, the lines of
    # a multi-line reply after the first wait for the client's delayed ACK: 40 ms per EHLO.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # As asyncio does: "::" is IPv6 only; IPv4 needs a listener of its own.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.address, listener.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
