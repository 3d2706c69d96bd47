"""Network addresses as the relay reads and writes them.

- :func:`host_port`: ``host:port``, with an IPv6 address in brackets (``[::1]:2525``), as
  in URLs (RFC 3986) and as every log line, reply and status page of the relay shows an
  endpoint;
- :func:`parse_ip`: a client's address as text, parsed once.

Without the brackets ``::1:2525`` reads as an address with no port, so the form lives in
one place instead of at each call site.
"""

from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=1024)
def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an IP address, or None if it is not one; remembered. Each message asks
    this several times of its client's address (the network checks, the route, the
    Received field) and the same few clients send most mail: parsing costs more than the
    lookup. Bounded, and the values are immutable."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_port(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` when ``host`` is an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
