"""The relay's state as Prometheus gauges: read off the loop, shown when scraped.

- :func:`scan_spool` and :class:`SpoolStats`: the messages per spool state and the
  arrival of the oldest queued one, counted by listing the spool (in a worker thread);
- :class:`Snapshot`: that scan and the certificates' expiry dates, with when it was taken;
- :class:`StateCollector`: the gauges (sessions, tokens, profile readiness, expiry dates,
  queue depth), computed from the relay and the latest snapshot at each scrape.

No code path keeps these gauges up to date, so no value can drift from the truth; and
nothing here blocks the event loop at scrape time: what needs the disk is in the
snapshot, which :meth:`relay.ops.metrics.RelayMetrics.refresh` renews at most once per
``http.cache_ttl``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import __version__
from relay.ops.exposition import PREFIX
from relay.ops.profilehealth import ProfileHealth
from relay.ops.view import RelayView
from relay.spool.store import Spool, State

# States whose messages are still waiting to go out (hold is the operator's business).
_QUEUED = ("incoming", "active", "deferred")


@dataclass(frozen=True)
class SpoolStats:
    """Messages per state, and when the oldest still-queued one arrived (epoch seconds)."""

    counts: dict[str, int]
    oldest_received: float | None


def scan_spool(spool: Spool) -> SpoolStats:
    """Count the spool's states by listing them (streamed: memory does not grow with the
    queue). A message's arrival time is its data file's mtime: written once, at
    acceptance, never touched again (deferred/ files' mtimes are due times instead)."""
    counts: dict[str, int] = {}
    oldest: float | None = None
    for state in State:
        n = 0
        with contextlib.suppress(OSError):
            for name in spool.names(state):
                n += 1
                mid = spool.id_from_name(name)
                if state.value not in _QUEUED or mid is None:
                    continue
                try:
                    arrived = os.stat(spool.data_path(mid)).st_mtime
                except OSError:
                    continue               # delivered or moved meanwhile
                if oldest is None or arrived < oldest:
                    oldest = arrived
        counts[state.value] = n
    n = 0
    with contextlib.suppress(OSError), os.scandir(spool.root / "corrupt") as it:
        for item in it:
            n += item.name.endswith(".json")    # a message's data may lie beside it
    counts["corrupt"] = n
    return SpoolStats(counts, oldest)

@dataclass(frozen=True)
class Snapshot:
    """What was read off the loop: the spool's counts and the certificates' notAfter."""

    taken: float                       # time.monotonic()
    spool: SpoolStats
    certificates: dict[str, float]     # source (its key in the config) -> epoch seconds


class StateCollector(Collector):
    """Gauges read from the relay when scraped (on the event loop: nothing here blocks)."""

    def __init__(self, relay: RelayView, profiles: ProfileHealth,
                 snapshot: Callable[[], Snapshot | None]) -> None:
        self._relay = relay
        self._profiles = profiles
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        relay = self._relay
        now = time.time()
        info = GaugeMetricFamily(PREFIX + "build_info", "The relay's version.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(PREFIX + "client_sessions",
                                "Client SMTP connections open now.",
                                value=relay.receiver.sessions)
        upstream = GaugeMetricFamily(
            PREFIX + "upstream_sessions",
            "Upstream SMTP sessions per mailbox (idle, in use, opening or closing): what "
            "Exchange counts against its per-mailbox connection limit.", labels=["mailbox"])
        for mailbox, count in sorted(relay.deliverer.upstream_sessions().items()):
            upstream.add_metric([mailbox], count)
        yield upstream
        ready = GaugeMetricFamily(
            PREFIX + "profile_ready",
            "1 while the profile's mail goes through as far as delivery attempts show, 0 "
            "while the upstream refuses its login or refuses its messages SendAsDenied "
            "(/readyz says why).", labels=["profile"])
        for status in self._profiles.statuses():
            ready.add_metric([status.profile], 1 if status.ready else 0)
        yield ready
        yield from self._tokens(now)
        yield from self._expiries(now)
        yield from self._queue(now)

    def _tokens(self, now: float) -> Iterator[Metric]:
        age = GaugeMetricFamily(PREFIX + "token_age_seconds",
                                "Age of the cached access token per credential.",
                                labels=["credential"])
        left = GaugeMetricFamily(PREFIX + "token_expires_in_seconds",
                                 "Seconds until the cached access token expires (negative: "
                                 "expired); absent while there is no token.",
                                 labels=["credential"])
        for name, provider in self._relay.tokens:
            token = provider.current
            if token is None:
                continue
            if token.obtained_at:
                age.add_metric([name], max(0.0, now - token.obtained_at))
            left.add_metric([name], token.expires_in(now))
        yield age
        yield left

    def _expiries(self, now: float) -> Iterator[Metric]:
        config = self._relay.config
        kinds = GaugeMetricFamily(
            PREFIX + "credential_info",
            "1 for each credential, labelled with what proves it: client_secret, "
            "certificate, federated_token or managed_identity.",
            labels=["credential", "kind"])
        for name, cred in config.credentials.items():
            kinds.add_metric([name, cred.kind_key], 1)
        yield kinds
        secrets = GaugeMetricFamily(
            PREFIX + "client_secret_expires_in_days",
            "Days until a client secret expires (credentials.<name>.secret_expires).",
            labels=["credential"])
        for name, cred in config.credentials.items():
            if cred.secret_expires is not None and cred.client_secret is not None:
                expires = dt.datetime.combine(cred.secret_expires, dt.time.min, dt.UTC)
                secrets.add_metric([name], (expires.timestamp() - now) / 86400)
        yield secrets
        certs = GaugeMetricFamily(
            PREFIX + "certificate_expires_in_days",
            "Days until a certificate expires; source is its key in the configuration "
            "(server.tls, credentials.<name>.certificate).", labels=["source"])
        snapshot = self._snapshot()
        if snapshot is not None:
            for source, not_after in sorted(snapshot.certificates.items()):
                certs.add_metric([source], (not_after - now) / 86400)
        yield certs

    def _queue(self, now: float) -> Iterator[Metric]:
        snapshot = self._snapshot()
        if snapshot is None:
            return
        depth = GaugeMetricFamily(
            PREFIX + "queue_messages",
            "Messages in the spool per state (corrupt: files set aside for an operator).",
            labels=["state"])
        for state, count in snapshot.spool.counts.items():
            depth.add_metric([state], count)
        yield depth
        oldest = snapshot.spool.oldest_received
        yield GaugeMetricFamily(
            PREFIX + "queue_oldest_message_age_seconds",
            "Age of the oldest message waiting for delivery (incoming, active, deferred); "
            "0 when none is.", value=max(0.0, now - oldest) if oldest is not None else 0.0)
        yield GaugeMetricFamily(
            PREFIX + "queue_scan_age_seconds",
            "How old the spool scan behind the queue metrics is.",
            value=max(0.0, time.monotonic() - snapshot.taken))
