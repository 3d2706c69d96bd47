"""What ``smtp-oauth-relay init`` writes: the config, the secret, and who may read them.

- :class:`Answers`: what the installer was asked (tenant, app, secret or certificate,
  mailbox, listeners, who may send); :func:`validate` checks one answer the way the config
  will; :func:`config_data` and :func:`config_text` turn the answers into the config;
- :class:`Planned`, :func:`plan`: every file with its content, mode and group;
  :func:`existing`: which of them are already there; :func:`write`: write them;
- :data:`SECRET_CREDENTIAL`: the credential name the shipped unit's ``LoadCredential=``
  and the written config share.

The files follow the shipped systemd files (``relay/data/``): the config is root's and
readable by the service's group (0640), as ``tmpfiles.conf`` sets it; the client secret is
root's alone (0600) and reaches the service through ``LoadCredential=``; a certificate's
private key, which the relay reads itself, is 0640 like the config. The config is checked
with the relay's own validation before anything is written, so ``check`` accepts it.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from relay.config import parse_config
from relay.config.values import Address, IPAddress, Name, Network, Port
from relay.core.secrets import Secret

# LoadCredential=client-secret:/etc/smtp-oauth-relay/client-secret in the shipped unit.
SECRET_CREDENTIAL = "client-secret"
SERVICE_GROUP = "smtp-oauth-relay"
PROFILE, CREDENTIAL = "system", "main"

_KINDS: dict[str, Any] = {"address": Address, "ip": IPAddress, "port": Port,
                          "network": Network, "name": Name}


def validate(kind: str, value: str) -> str:
    """``value`` as the config will read it (``address``, ``ip``, ``port``, ``network``,
    ``name``); ValueError says in one sentence what is wrong."""
    try:
        return str(TypeAdapter(_KINDS[kind]).validate_python(value))
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


@dataclass
class Answers:
    tenant_id: str
    client_id: str
    mailbox: str
    secret: Secret | None = None          # a client secret, or else:
    private_key: Path | None = None       # a certificate's PEM key, with
    thumbprint: str | None = None         # its thumbprint or
    public_certificate: Path | None = None  # its certificate
    secret_expires: dt.date | None = None
    cloud: str = "global"
    listeners: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 2525)])
    relay_networks: list[str] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)   # name: password hash

    def certificate_files(self) -> dict[str, Path]:
        """The certificate's files, by the name each gets beside the config."""
        files = {"app.key": self.private_key, "app.crt": self.public_certificate}
        return {name: path for name, path in files.items() if path is not None}


def config_data(a: Answers) -> dict[str, Any]:
    credential: dict[str, Any] = {"tenant_id": a.tenant_id, "client_id": a.client_id,
                                  "cloud": a.cloud}
    if a.secret is not None:
        credential["client_secret"] = {"credential": SECRET_CREDENTIAL}
    else:
        cert: dict[str, Any] = {"private_key_file": "app.key"}
        if a.thumbprint:
            cert["thumbprint"] = a.thumbprint
        if a.public_certificate is not None:
            cert["public_certificate_file"] = "app.crt"
        credential["certificate"] = cert
    if a.secret_expires is not None:
        credential["secret_expires"] = a.secret_expires.isoformat()
    loopback = ["127.0.0.0/8", "::1/128"]
    data: dict[str, Any] = {
        "server": {"listeners": [{"address": h, "port": p} for h, p in a.listeners],
                   "relay_networks": loopback + [n for n in a.relay_networks
                                                 if n not in loopback]},
        "users": {name: {"password_hash": h} for name, h in a.users.items()},
        "profiles": {PROFILE: {"mailbox": a.mailbox, "credential": CREDENTIAL}},
        "routing": {"system_profile": PROFILE},
        "credentials": {CREDENTIAL: credential},
    }
    parse_config(data, "init", check_secrets=False, check_files=False)  # ConfigError: a bug
    return data


_HEADER = """\
# smtp-oauth-relay configuration, written by `smtp-oauth-relay init`.
# Every setting, with its default and what it does: `smtp-oauth-relay example-config`.
# After a change: `smtp-oauth-relay check`, then `systemctl reload smtp-oauth-relay`.
"""
_COMMENTS = {
    "server": "# Where applications connect, and the networks that may send without a login.",
    "users": "# Local accounts for AUTH PLAIN/LOGIN (smtp-oauth-relay hash-password).",
    "profiles": "# The Exchange Online mailbox the mail is sent as.",
    "credentials": "# The Entra ID app. The client secret is the file client-secret beside "
                   "this config,\n# handed to the service by LoadCredential= (run by hand: "
                   "read from there).",
}


def config_text(a: Answers) -> str:
    parts = [_HEADER]
    for key, value in config_data(a).items():
        if key == "users" and not value:
            continue
        comment = _COMMENTS.get(key)
        dumped = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False,
                                allow_unicode=True)
        parts.append((comment + "\n" if comment else "") + dumped)
    return "\n".join(parts)


@dataclass(frozen=True)
class Planned:
    path: Path
    content: bytes
    mode: int
    group: bool   # True: the service's group, else the writer's own


def plan(config: Path, a: Answers) -> list[Planned]:
    directory = config.parent
    files = [Planned(config, config_text(a).encode(), 0o640, True)]
    if a.secret is not None:
        files.append(Planned(directory / SECRET_CREDENTIAL,
                             (a.secret.reveal() + "\n").encode(), 0o600, False))
    for name, source in a.certificate_files().items():
        files.append(Planned(directory / name, source.read_bytes(), 0o640, True))
    return files


def existing(files: list[Planned]) -> list[Path]:
    return [f.path for f in files if f.path.exists() or f.path.is_symlink()]


def write(files: list[Planned], gid: int) -> bool:
    """Write ``files`` (each replaced at once, never half-written); make their directory,
    root's and the group's (0750), when it is missing. Returns whether it was made.
    Raises PermissionError when the group cannot be given, OSError otherwise."""
    directory = files[0].path.parent
    made = not directory.exists()
    if made:
        directory.mkdir(parents=True, mode=0o750)
        os.chown(directory, -1, gid)
        directory.chmod(0o750)
    for f in files:
        tmp = f.path.with_name(f".{f.path.name}.init")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, f.mode)
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), f.mode)
                if f.group:
                    os.fchown(out.fileno(), -1, gid)
                out.write(f.content)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, f.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return made


def group_id(name: str) -> int | None:
    """The group's id, or None when there is no such group."""
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def describe(f: Planned, group: str) -> str:
    owner = f"{_user_name()}:{group if f.group else _own_group()}"
    return f"{f.path} ({f.mode:04o} {owner})"


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _own_group() -> str:
    import grp

    try:
        return grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        return str(os.getegid())
