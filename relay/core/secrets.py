"""Secret values and where they come from.

Secrets (client secrets, certificate passphrases) are never taken only from the YAML: a
config names a *source* (environment variable, file, systemd credential) and the value is
read when the config is loaded, without the blanks and line breaks around it that files
and shells add (no Entra ID secret or passphrase is meant to begin or end with one). The
value is wrapped in :class:`Secret` so that it cannot leak through ``repr``, f-strings,
logging or exception messages by accident.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from relay.core.errors import RelayError

_MASK: Final = "********"


class Secret:
    """A string that refuses to show itself; call :meth:`reveal` where it is really needed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret values are not serialisable")


class SecretSourceError(RelayError):
    """A secret's source is configured but cannot be read (message is safe to show)."""


def read_env(name: str) -> str:
    """An environment variable's value without surrounding blanks and line breaks
    (``RELAY_CLIENT_SECRET="$(cat file)"`` and EnvironmentFile= lines keep them)."""
    value = os.environ.get(name)
    if value is None:
        raise SecretSourceError(f"environment variable {name} is not set")
    value = value.strip()
    if not value:
        raise SecretSourceError(f"environment variable {name} is set but empty")
    return value


def read_file(path: str | os.PathLike[str]) -> str:
    """Read a secret file: its first line, without surrounding blanks and line breaks
    (``echo secret > file`` and editors add a newline, a paste may add a blank)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretSourceError(f"file {p} does not exist") from None
    except PermissionError:
        raise SecretSourceError(f"file {p} is not readable by this user") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretSourceError(f"file {p} cannot be read: {exc.__class__.__name__}") from None
    lines = text.strip().splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        raise SecretSourceError(f"file {p} is empty")
    return value


def read_credential(name: str) -> str:
    """Read a systemd credential (``LoadCredential=``), found in $CREDENTIALS_DIRECTORY."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise SecretSourceError(
            f"systemd credential {name!r} requested but CREDENTIALS_DIRECTORY is not set "
            "(add LoadCredential= to the unit, or use {env: ...} / {file: ...})"
        )
    try:
        return read_file(Path(directory) / name)
    except SecretSourceError as exc:
        raise SecretSourceError(f"systemd credential {name!r}: {exc}") from None
