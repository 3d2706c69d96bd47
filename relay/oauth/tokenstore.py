"""A user's refresh token, kept encrypted on disk.

- :class:`TokenStore`: :meth:`~TokenStore.load` and :meth:`~TokenStore.save` the refresh
  token of a delegated credential (``credentials.<name>.delegated``), encrypted with
  Fernet (AES-128-CBC and HMAC-SHA256, from ``cryptography``) under the key the config
  names, written atomically (a new file, fsynced, renamed over the old) and readable by
  the relay's user only;
- :func:`new_key`: a key for ``smtp-oauth-relay authorize`` to write when the key file
  does not exist yet.

A refresh token lets whoever holds it send mail as the user for months, so neither it
nor its key is ever in the config, a log line or an error message. Each refresh replaces
it (Entra rotates refresh tokens), so a file left half-written by a crash would lose the
user's sign-in: the rename makes the switch all or nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from relay.config import DelegatedAuth
from relay.core.log import redact
from relay.core.secrets import SecretSourceError
from relay.oauth.token import TokenError


def new_key() -> bytes:
    from cryptography.fernet import Fernet

    return Fernet.generate_key()


_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class TokenStore:
    """The encrypted refresh token of credential ``name``. :attr:`lock` is held around a
    load, its use and the save of its successor: two token providers of one credential
    (its SMTP and its Graph tokens) must not both redeem the same refresh token."""

    def __init__(self, name: str, settings: DelegatedAuth) -> None:
        self.name = name
        self.path = settings.token_file
        self._key_ref = settings.key
        with _LOCKS_GUARD:
            self.lock = _LOCKS.setdefault(self.path.resolve(), threading.Lock())

    def _fernet(self) -> Any:
        from cryptography.fernet import Fernet

        where = f"credentials.{self.name}.delegated.key"
        try:
            key = self._key_ref.resolve().reveal()
        except SecretSourceError as exc:
            raise TokenError(f"credential {self.name!r}: {where}: {exc}") from None
        redact(key)
        try:
            return Fernet(key.encode())
        except ValueError:
            raise TokenError(f"credential {self.name!r}: {where} is not a key made by "
                             "`smtp-oauth-relay authorize` (32 url-safe base64 bytes)") from None

    def load(self) -> dict[str, Any] | None:
        """``{"refresh_token", "user", "saved_at"}``, or None before the first sign-in."""
        from cryptography.fernet import InvalidToken

        try:
            sealed = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenError(f"credential {self.name!r}: cannot read "
                             f"{self.path}: {exc.strerror or exc}", transient=True) from None
        try:
            data: dict[str, Any] = json.loads(self._fernet().decrypt(sealed))
        except (InvalidToken, ValueError):
            raise TokenError(f"credential {self.name!r}: {self.path} cannot be decrypted "
                             "with the configured key (another key, or a damaged file): "
                             f"run `smtp-oauth-relay authorize --credential {self.name}` "
                             "again") from None
        redact(str(data.get("refresh_token", "")))
        return data

    def save(self, refresh_token: str, user: str) -> None:
        redact(refresh_token)
        sealed = self._fernet().encrypt(json.dumps(
            {"refresh_token": refresh_token, "user": user, "saved_at": time.time()}).encode())
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _keep_owner(fd, self.path if self.path.exists() else self.path.parent)
            os.write(fd, sealed)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _keep_owner(fd: int, like: Path) -> None:
    """Run as root (``sudo smtp-oauth-relay authorize``), give the file the owner of
    ``like`` (the file it replaces, or its directory): the relay's user, in its state
    directory, must go on reading and renewing it."""
    if os.geteuid() == 0:
        st = like.stat()
        os.fchown(fd, st.st_uid, st.st_gid)


def write_key(path: Path) -> None:
    """A new key at ``path`` (0600, owned like its directory when run as root), for a
    first ``authorize``; an existing one is kept."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _keep_owner(fd, path.parent)
        os.write(fd, new_key() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
