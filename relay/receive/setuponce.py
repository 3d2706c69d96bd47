"""aiosmtpd's per-connection setup, done once per protocol class instead.

- :func:`install`: make aiosmtpd look up a protocol's ``auth_*`` methods from a table
  kept per class, instead of with :func:`inspect.getmembers` on every new connection.

aiosmtpd's ``SMTP.__init__`` finds the AUTH mechanisms by calling ``inspect.getmembers``
on the new protocol object and on the handler, for every connection. That reads every
attribute of both, properties included, and was about a twelfth of the relay's CPU per
message. The ``auth_*`` methods are the class's, so the names are collected once per
class and only they are looked up on the object: the mechanisms offered, and the methods
called, are the same. The module aiosmtpd calls it through is the only thing replaced;
tests/test_library_contract.py checks that aiosmtpd still uses ``inspect.getmembers``
only there and that the mechanisms come out the same.
"""

from __future__ import annotations

import inspect
from typing import Any

import aiosmtpd.smtp

_AUTH_NAMES: dict[type, tuple[str, ...]] = {}      # one entry per protocol/handler class


def _auth_names(cls: type) -> tuple[str, ...]:
    names = _AUTH_NAMES.get(cls)
    if names is None:
        names = _AUTH_NAMES[cls] = tuple(n for n in dir(cls) if n.startswith("auth_"))
    return names


class _Inspect:
    """:mod:`inspect` as aiosmtpd.smtp sees it: ``getmembers`` from the per-class table."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def getmembers(obj: object) -> list[tuple[str, Any]]:
        names = set(_auth_names(type(obj)))
        names.update(n for n in getattr(obj, "__dict__", {}) if n.startswith("auth_"))
        return [(name, getattr(obj, name)) for name in sorted(names)]


def install() -> None:
    """Idempotent; called when the receiving side is imported."""
    if not isinstance(aiosmtpd.smtp.inspect, _Inspect):
        aiosmtpd.smtp.inspect = _Inspect()  # type: ignore[assignment]
