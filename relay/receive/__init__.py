"""The SMTP receiving side, where legacy applications connect.

- :mod:`relay.receive.server`: :class:`Receiver`, the listeners, connection limit,
  reload and shutdown;
- :mod:`relay.receive.session`: :class:`RelaySMTP`, one connection (AUTH, TLS, limits);
- :mod:`relay.receive.handler`: :class:`RelayHandler`, the MAIL/RCPT/DATA decisions;
- :mod:`relay.receive.guard`: failed-AUTH penalties and lockouts, the refusal log.
"""

from relay.receive.handler import RelayHandler, address_problem
from relay.receive.server import Receiver
from relay.receive.session import (
    RelayEnvelope,
    RelaySession,
    RelaySMTP,
    Settings,
    client_address,
    is_loopback,
)

__all__ = [
    "Receiver",
    "RelayEnvelope",
    "RelayHandler",
    "RelaySMTP",
    "RelaySession",
    "Settings",
    "address_problem",
    "client_address",
    "is_loopback",
]
