"""Network addresses as the relay writes them.

- :func:`host_port`: ``host:port``, with an IPv6 address in brackets (``[::1]:2525``), as
  in URLs (RFC 3986) and as every log line, reply and status page of the relay shows an
  endpoint.

Without the brackets ``::1:2525`` reads as an address with no port, so the form lives in
one place instead of at each call site.
"""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` when ``host`` is an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
