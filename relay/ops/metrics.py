"""Prometheus metrics of one relay: the counters of what happens, and what feeds them.

- :class:`RelayMetrics`: the :class:`relay.core.events.Hooks` of a running relay, in its
  own registry. Events are counted where they happen (a message accepted, the outcome of
  a delivery attempt, a refused upstream login, a failed token fetch): the queue, the
  deliverer and the token providers call the hooks, which do nothing by default, so the
  CLI commands and the unit tests of one component need no registry. The calls become
  counters and a histogram, and feed the per-profile readiness
  (:class:`relay.ops.profilehealth.ProfileHealth`) that /readyz and a gauge report;
- :meth:`RelayMetrics.refresh`: the state that needs the disk (the spool's counts, the
  certificates' expiry dates), read in a worker thread at most once per
  ``http.cache_ttl``; the gauges (:mod:`relay.ops.gauges`) show the result when scraped;
- :func:`reply_class`: a reply's label value (``2xx``, ``4xx``, ``5xx``).

The queue is on disk and may be long: counting it means listing directories, which must
not happen on the event loop nor for every scrape. Every relay owns its own
:class:`CollectorRegistry`, not prometheus_client's global one, so that two relays in one
process (tests, an embedding application) do not share counts or collide on registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from relay.config import Config, SecretRef
from relay.core.events import Hooks
from relay.core.reply import Reply
from relay.oauth.certificates import load_certificate
from relay.ops.exposition import PREFIX, render
from relay.ops.gauges import Snapshot, StateCollector, scan_spool
from relay.ops.profilehealth import ProfileHealth
from relay.ops.view import RelayView

log = logging.getLogger(__name__)

# An upstream attempt is a TLS handshake, a login and a transaction when no session is
# pooled, a single transaction when one is; timeouts are 60 s per command.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def reply_class(reply: Reply) -> str:
    """``2xx``/``4xx``/``5xx``: few enough label values to keep every series cheap."""
    return f"{reply.code // 100}xx" if 200 <= reply.code < 600 else "other"


# --- certificate expiry, read off the loop ---------------------------------------------

class _CertificateDates:
    """Expiry of the certificates the config names, re-read only when a file changes."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], float | None] = {}

    def read(self, config: Config) -> dict[str, float]:
        out: dict[str, float] = {}
        wanted: list[tuple[str, Path, bool, SecretRef | None]] = []
        if config.server.tls is not None:
            wanted.append(("server.tls", config.server.tls.certificate_file, False, None))
        for name, cred in config.credentials.items():
            cert = cred.certificate
            if cert is None:
                continue
            source = f"credentials.{name}.certificate"
            if cert.public_certificate_file is not None:
                wanted.append((source, cert.public_certificate_file, False, None))
            elif cert.pfx_file is not None:
                wanted.append((source, cert.pfx_file, True, cert.passphrase))
            # private_key_file + thumbprint: no certificate to read; Entra ID knows it.
        cache: dict[tuple[str, int, int], float | None] = {}
        for source, path, pfx, passphrase in wanted:
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (str(path), st.st_mtime_ns, st.st_size)
            if key in self._cache:
                cache[key] = self._cache[key]
            else:
                cache[key] = _not_after(path, pfx, passphrase)
            if (when := cache[key]) is not None:
                out[source] = when
        self._cache = cache
        return out


def _not_after(path: Path, pfx: bool, passphrase: SecretRef | None) -> float | None:
    """The leaf certificate's notAfter; None (logged at debug) if it cannot be read."""
    try:
        leaf = load_certificate(path, "certificate", pfx=pfx, passphrase=passphrase)
        return leaf.not_valid_after_utc.timestamp()
    except Exception as exc:
        log.debug("cannot read the expiry date of %s (%s)", path, exc.__class__.__name__)
        return None


# --- the metrics ------------------------------------------------------------------------

class RelayMetrics(Hooks):
    """The counters of one relay and the collector of its state, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._received = Counter(
            PREFIX + "messages_received",
            "Messages clients handed over, by the class of the reply they got (2xx: "
            "accepted into the spool).", ["profile", "reply_class"], registry=r)
        self._delivered = Counter(
            PREFIX + "messages_delivered",
            "Delivery attempts that delivered a message to (some of) its recipients.",
            ["profile", "reply_class"], registry=r)
        self._deferred = Counter(
            PREFIX + "messages_deferred",
            "Delivery attempts after which recipients were left for a retry.",
            ["profile", "reply_class"], registry=r)
        self._bounced = Counter(
            PREFIX + "messages_bounced",
            "Delivery attempts after which recipients failed for good.",
            ["profile", "reply_class"], registry=r)
        self._latency = Histogram(
            PREFIX + "upstream_delivery_seconds",
            "Duration of one delivery attempt through the upstream (token, session, "
            "transaction).", ["reply_class"], buckets=LATENCY_BUCKETS, registry=r)
        self._token_errors = Counter(
            PREFIX + "token_errors", "Failed token fetches from Entra ID.",
            ["credential"], registry=r)
        self._logins_refused = Counter(
            PREFIX + "upstream_logins_refused",
            "Delivery attempts that ended with the upstream refusing the relay's login for "
            "the profile's mailbox (535 5.7.3, 5.7.139, 430 4.2.0 mailbox logon failure, "
            "530 5.7.57, ...; a refusal that a fresh token cured is not counted).",
            ["profile"], registry=r)
        # What delivery attempts showed about each profile's setup: /readyz and the
        # profile_ready gauge read it.
        self.profiles = ProfileHealth()
        self._known_series: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}
        self._configured_profiles: set[str] = set()
        self._relay: RelayView | None = None
        self._dates = _CertificateDates()
        self._snapshot: Snapshot | None = None
        self._scan: asyncio.Task[None] | None = None

    # --- hooks -----------------------------------------------------------------------------

    def _series(self, metric: Counter | Histogram, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: prometheus_client's lookup (a str() of
        each value, a lock) cost 1.5 % of the relay's CPU at four per message. Only for
        the per-message series below, which are never removed; their number is bounded
        by the profiles configured and the few reply classes."""
        key = (metric, values)
        series = self._known_series.get(key)
        if series is None:
            series = self._known_series[key] = metric.labels(*values)
        return series

    def received(self, profile: str, reply: Reply) -> None:
        self._series(self._received, profile, reply_class(reply)).inc()

    def delivered(self, profile: str, reply: Reply) -> None:
        self._series(self._delivered, profile, reply_class(reply)).inc()

    def deferred(self, profile: str, reply: Reply) -> None:
        self._series(self._deferred, profile, reply_class(reply)).inc()

    def bounced(self, profile: str, reply: Reply) -> None:
        self._series(self._bounced, profile, reply_class(reply)).inc()

    def attempt(self, reply: Reply, seconds: float) -> None:
        self._series(self._latency, reply_class(reply)).observe(seconds)

    def token_error(self, credential: str) -> None:
        self._token_errors.labels(credential).inc()

    def sign_in_needed(self, profile: str, reason: str) -> None:
        self.profiles.sign_in_needed(profile, reason)

    def login_refused(self, profile: str, mailbox: str, reply: Reply, *,
                      fresh_token: bool) -> None:
        if profile in self.profiles:          # no series for a profile no longer configured
            self._logins_refused.labels(profile).inc()
        self.profiles.login_refused(profile, mailbox, reply, fresh_token=fresh_token)

    def logged_in(self, profile: str, mailbox: str, *, delivered: bool) -> None:
        self.profiles.logged_in(profile, mailbox, delivered=delivered)

    def send_as_denied(self, profile: str, mailbox: str, reply: Reply) -> None:
        self.profiles.send_as_denied(profile, mailbox, reply)

    # --- state -----------------------------------------------------------------------------

    def watch(self, relay: RelayView) -> None:
        """Start reporting ``relay``'s state (call once its components exist)."""
        self._relay = relay
        self.registry.register(StateCollector(relay, self.profiles, lambda: self._snapshot))
        self.configure(relay.config)

    def configure(self, config: Config) -> None:
        """Show a zero for every profile and credential, so rates and alerts work from
        the first scrape instead of from the first event; track the readiness of exactly
        the configured profiles (a reload forgets removed ones, and their series)."""
        for profile in config.profiles:
            self._received.labels(profile, "2xx")
            self._logins_refused.labels(profile)
        for gone in self._configured_profiles - set(config.profiles):
            with contextlib.suppress(KeyError):
                self._logins_refused.remove(gone)
        self._configured_profiles = set(config.profiles)
        for credential in config.credentials:
            self._token_errors.labels(credential)
        self.profiles.configure(config)

    async def refresh(self, ttl: float, wait: float) -> None:
        """Rescan the spool and certificate files if the last scan is older than ``ttl``.

        One scan at a time, in a worker thread; a scan that takes longer than ``wait``
        (a huge queue, a hung disk) goes on in the background and the scrape is served
        from the previous one.
        """
        relay = self._relay
        if relay is None:
            return
        snapshot = self._snapshot
        if snapshot is not None and time.monotonic() - snapshot.taken < ttl:
            return
        if self._scan is None or self._scan.done():
            self._scan = asyncio.ensure_future(self._rescan(relay))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await asyncio.shield(self._scan)

    async def _rescan(self, relay: RelayView) -> None:
        config = relay.config

        def scan() -> Snapshot:
            return Snapshot(time.monotonic(), scan_spool(relay.spool), self._dates.read(config))

        try:
            self._snapshot = await asyncio.to_thread(scan)
        except Exception:
            log.warning("metrics: cannot scan the spool", exc_info=True)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return render(self.registry)

    async def close(self) -> None:
        if self._scan is not None and not self._scan.done():
            self._scan.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan

