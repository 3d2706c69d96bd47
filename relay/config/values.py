"""The value types of the configuration: what a single setting may look like.

- :data:`Duration` (``30s``, ``5m``, ``1h``, ``5d`` or seconds, in float seconds),
  :data:`Size` (``35MiB``, ``10MB`` or bytes), :data:`Address` (an addr-spec),
  :data:`IPAddress`, :data:`Network` (``10.0.0.0/8``), :data:`HttpsUrl`, :data:`Port`,
  :data:`Name` (a profile, user, credential or upstream name), and the password hash check;
- :class:`Section`: the base of every section (frozen, unknown keys refused).

Each type is a pydantic ``Annotated`` type whose validator turns the YAML value into the
one the relay uses, or says in one sentence what was expected, so that the error names
the key and the mistake (``server.idle_timeout: expected a duration such as 30s ...``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 1000**2,
               "mb": 1000**2, "mib": 1024**2, "mi": 1024**2, "g": 1000**3, "gb": 1000**3,
               "gib": 1024**3, "gi": 1024**3}


def _parse_duration(value: Any) -> float:
    """Accept seconds as a number, or a string such as ``30s``, ``5m``, ``1h``, ``5d``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h or 5d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]
    else:
        raise ValueError(f"expected a duration such as 30s, 5m, 1h or 5d, got {value!r}")
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _parse_size(value: Any) -> int:
    """Accept bytes as a number, or a string such as ``35MiB`` or ``10MB``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 35MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    else:
        raise ValueError(f"expected a size such as 35MiB or 10MB, got {value!r}")
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


def _check_address(value: str) -> str:
    """An addr-spec: local@domain without spaces or angle brackets (no display name)."""
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c in value for c in " <>\t\r\n,;"):
        raise ValueError(f"{value!r} is not an e-mail address (expected name@domain)")
    return value


def _check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
    return value


def _check_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a network (expected e.g. 10.0.0.0/8)") from None


def check_password_hash(value: str) -> str:
    """A hash that ``smtp-oauth-relay hash-password`` made (relay.core.passhash)."""
    from relay.core.passhash import check_hash_format

    check_hash_format(value)
    return value


def _check_https(value: str) -> str:
    if not value.startswith("https://"):
        raise ValueError("must be an https:// URL (Entra ID refuses plain http)")
    return value.rstrip("/")


Duration = Annotated[float, BeforeValidator(_parse_duration)]
Size = Annotated[int, BeforeValidator(_parse_size)]
Address = Annotated[str, AfterValidator(_check_address)]
IPAddress = Annotated[str, AfterValidator(_check_ip)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network,
                    BeforeValidator(_check_network)]
HttpsUrl = Annotated[str, AfterValidator(_check_https)]
Port = Annotated[int, Field(ge=0, le=65535)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")]


class Section(BaseModel):
    """A part of the configuration: frozen once validated; a key it does not know is an
    error (a misspelt setting must not be ignored silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

