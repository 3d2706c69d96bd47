"""How the relay's metrics are exposed to Prometheus.

- :data:`PREFIX`: every metric name starts with it (``smtp_relay_``);
- :data:`CONTENT_TYPE`: the text format the ``/metrics`` answer is in;
- :func:`render`: a registry in that format.

The counters (:mod:`relay.ops.metrics`) and the gauges read when scraped
(:mod:`relay.ops.gauges`) share these. Importing this module also turns off
prometheus_client's ``*_created`` series, before any counter exists.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

PREFIX = "smtp_relay_"
# Each counter and histogram would also export a *_created gauge (its creation time),
# doubling the series for nothing a dashboard uses.
disable_created_metrics()
# The text format every Prometheus version reads (prometheus_client's "latest" moved on).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)
