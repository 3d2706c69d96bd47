"""What differs between two configurations, key by key: what a reload tells the log.

- :func:`changed_keys`: the dotted keys whose values differ (``server.max_recipients``),
  with entries of the named sections added or removed as such (``profiles.sales
  (added)``), in the order of the file's sections.

Only keys, never values: a value may be a secret (a ``client_secret``, a passphrase, a
password hash), and the key is what the operator edited and will recognise. A secret's
reference is one key (``credentials.main.client_secret``), whatever changed in it.
"""

from __future__ import annotations

from typing import Any

from relay.config.credentials import SecretRef
from relay.config.values import Section


def changed_keys(old: Section, new: Section, prefix: str = "") -> list[str]:
    """The keys of ``new`` that differ from ``old`` (two sections of one kind)."""
    keys: list[str] = []
    for name in type(new).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            keys += _changed(a, b, f"{prefix}{name}")
    return keys


def _changed(a: Any, b: Any, key: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys: list[str] = []
        for name in [*b, *(n for n in a if n not in b)]:
            if name not in a:
                keys.append(f"{key}.{name} (added)")
            elif name not in b:
                keys.append(f"{key}.{name} (removed)")
            elif a[name] != b[name]:
                keys += _changed(a[name], b[name], f"{key}.{name}")
        return keys
    if (isinstance(a, Section) and type(a) is type(b) and not isinstance(a, SecretRef)):
        return changed_keys(a, b, f"{key}.")
    return [key]            # a value, a list, a secret, or a section set or unset
