"""What the operations side reads of a running relay, as a protocol.

- :class:`RelayView`: the stages and settings that the probes (:mod:`relay.ops.http`) and
  the metrics (:mod:`relay.ops.metrics`) look at; :class:`relay.app.Relay` is one.

The relay owns the ops side (it starts the HTTP endpoint and feeds the metrics), so ops
must not import it back: they read it through this view, and the dependencies point one
way (stages <- ops <- app).
"""

from __future__ import annotations

from typing import Protocol

from relay.config import Config
from relay.deliver.deliverer import Deliverer
from relay.oauth.registry import Tokens
from relay.queue.scheduler import Queue
from relay.receive.server import Receiver
from relay.spool.store import Spool


class RelayView(Protocol):
    """A running relay, read-only."""

    @property
    def config(self) -> Config: ...

    @property
    def receiver(self) -> Receiver: ...

    @property
    def queue(self) -> Queue: ...

    @property
    def spool(self) -> Spool: ...

    @property
    def tokens(self) -> Tokens: ...

    @property
    def deliverer(self) -> Deliverer: ...

    @property
    def listening(self) -> list[tuple[str, int]]:
        """Where the SMTP listeners accept connections (host, port)."""
