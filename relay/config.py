"""The configuration: YAML in, one validated, frozen object out.

Every option is parsed and checked once, at start-up (and on reload), so the rest of the
relay never sees a half-valid setting. Errors name the exact key path and what is wrong,
e.g. ``profiles.sales.credential: unknown credential 'main2' (known: main)``.
Relative file paths are taken relative to the directory of the config file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from relay.core import secrets as secrets
from relay.core.errors import RelayError
from relay.core.secrets import Secret

DEFAULT_CONFIG_PATH = Path("/etc/smtp-oauth-relay/config.yaml")


class ConfigError(RelayError):
    """The configuration cannot be used; ``problems`` lists (key path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}"
                 for path, msg in self.problems]
        return "\n".join(lines)


# --- value types -----------------------------------------------------------------------

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


def _check_password_hash(value: str) -> str:
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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- clouds ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cloud:
    """Endpoints of one Microsoft cloud (global, US GCC High, China operated by 21Vianet)."""

    authority_host: str
    scope: str
    smtp_host: str


CLOUDS: dict[str, Cloud] = {
    "global": Cloud("https://login.microsoftonline.com",
                    "https://outlook.office365.com/.default", "smtp.office365.com"),
    "gcc-high": Cloud("https://login.microsoftonline.us",
                      "https://outlook.office365.us/.default", "smtp.office365.us"),
    "china": Cloud("https://login.partner.microsoftonline.cn",
                   "https://partner.outlook.cn/.default", "smtp.partner.outlook.cn"),
}
CloudName = Literal["global", "gcc-high", "china"]


# --- sections ----------------------------------------------------------------------------

class SecretRef(_Model):
    """Where a secret comes from: exactly one of env, file, credential or value."""

    env: str | None = None
    file: Path | None = None
    credential: str | None = None
    value: str | None = Field(default=None, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(
                "give the secret as {env: VARIABLE}, {file: PATH}, {credential: NAME} "
                "(systemd LoadCredential=) or {value: ...}; plain strings are not accepted "
                "so that secrets do not end up in the YAML by accident")
        given = [k for k in ("env", "file", "credential", "value") if data.get(k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of env, file, credential, value")
        return data

    def describe(self) -> str:
        if self.env:
            return f"environment variable {self.env}"
        if self.file:
            return f"file {self.file}"
        if self.credential:
            return f"systemd credential {self.credential}"
        return "inline value"

    def resolve(self) -> Secret:
        """Read the secret now; raises :class:`relay.core.secrets.SecretSourceError`."""
        if self.env:
            return Secret(secrets.read_env(self.env))
        if self.file:
            return Secret(secrets.read_file(self.file))
        if self.credential:
            return Secret(secrets.read_credential(self.credential))
        assert self.value is not None
        return Secret(self.value)


class CertificateCredential(_Model):
    """An app certificate: PEM key + thumbprint, PEM key + public certificate, or PFX."""

    private_key_file: Path | None = None
    thumbprint: str | None = None
    public_certificate_file: Path | None = None
    pfx_file: Path | None = None
    passphrase: SecretRef | None = None

    @model_validator(mode="after")
    def _combination(self) -> CertificateCredential:
        if self.pfx_file:
            if self.private_key_file or self.thumbprint or self.public_certificate_file:
                raise ValueError("pfx_file cannot be combined with private_key_file, "
                                 "thumbprint or public_certificate_file")
        elif not self.private_key_file:
            raise ValueError("set private_key_file (with thumbprint or "
                             "public_certificate_file), or pfx_file")
        elif not (self.thumbprint or self.public_certificate_file):
            raise ValueError("private_key_file needs thumbprint or public_certificate_file")
        if self.thumbprint and not re.fullmatch(r"[0-9A-Fa-f]{40}",
                                                self.thumbprint.replace(":", "")):
            raise ValueError("thumbprint must be the certificate's SHA-1 hex digest "
                             "(40 hex digits, as shown in Entra ID)")
        return self


class Credential(_Model):
    """An Entra ID app registration used with the client-credentials flow."""

    tenant_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    cloud: CloudName = "global"
    authority: HttpsUrl | None = None
    scope: str | None = None
    client_secret: SecretRef | None = None
    certificate: CertificateCredential | None = None
    ca_file: Path | None = None
    refresh_before: Duration = 600.0
    secret_expires: dt.date | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Credential:
        if (self.client_secret is None) == (self.certificate is None):
            raise ValueError("set exactly one of client_secret or certificate")
        return self

    @property
    def authority_url(self) -> str:
        base = self.authority or CLOUDS[self.cloud].authority_host
        return f"{base}/{self.tenant_id}"

    @property
    def scopes(self) -> list[str]:
        return [self.scope or CLOUDS[self.cloud].scope]


class Upstream(_Model):
    """Where mail leaves: the Exchange Online SMTP submission endpoint by default."""

    host: str = "smtp.office365.com"
    port: Port = 587
    tls: Literal["starttls", "implicit"] = "starttls"
    ca_file: Path | None = None
    timeout: Duration = 60.0
    helo_name: str | None = None


class Profile(_Model):
    """A mailbox that mail is sent as, with the credential and upstream to use."""

    mailbox: Address
    credential: Name
    upstream: Name | None = None
    sender_policy: Literal["keep", "rewrite", "reject"] = "rewrite"
    send_as: list[str] = Field(default_factory=list)
    synchronous: Duration | None = None


class User(_Model):
    """A local SMTP account for AUTH PLAIN/LOGIN (hash from ``smtp-oauth-relay hash-password``)."""

    password_hash: Annotated[str, AfterValidator(_check_password_hash)]
    profile: Name | None = None


class Route(_Model):
    """Select a profile by envelope sender pattern or by client network."""

    profile: Name
    sender: str | None = None
    network: Network | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> Route:
        if (self.sender is None) == (self.network is None):
            raise ValueError("set exactly one of sender or network")
        return self


class Routing(_Model):
    system_profile: Name | None = None
    rules: list[Route] = Field(default_factory=list)


class Listener(_Model):
    address: IPAddress = "127.0.0.1"
    port: Port = 2525
    tls: Literal["none", "starttls", "implicit"] = "none"
    require_tls: bool = False
    synchronous: Duration | None = None


class ServerTLS(_Model):
    certificate_file: Path
    key_file: Path


class AuthThrottle(_Model):
    """Penalties for failed AUTH, per client address and per user name.

    The defaults follow Dovecot and fail2ban: Dovecot waits 2 s before answering a failed
    login (auth_failure_delay) and doubles its penalty per failure up to 15 s; fail2ban
    bans after 5 failures within 10 minutes, for 10 minutes. A person who mistypes a
    password twice waits 2 + 4 s; a script guessing from one address gets 5 tries per
    10 minutes instead of thousands. ``remember`` covers applications that log in once a
    day or once a week, so that an attack on their account does not lock them out.
    """

    delay: Duration = 2.0
    max_delay: Duration = 15.0
    lockout_after: int = Field(default=5, ge=1)
    window: Duration = 600.0
    lockout: Duration = 600.0
    remember: Duration = 7 * 86400.0


class Server(_Model):
    hostname: str = Field(default_factory=socket.getfqdn)
    listeners: list[Listener] = Field(default_factory=lambda: [Listener()], min_length=1)
    tls: ServerTLS | None = None
    relay_networks: list[Network] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8"),
                                 ipaddress.ip_network("::1/128")])
    max_message_size: Size = 35 * 1024 * 1024
    max_recipients: int = Field(default=500, ge=1)
    max_line_length: int = Field(default=65536, ge=1000)
    idle_timeout: Duration = 300.0
    # A byte every (idle_timeout - 1 s) would hold a connection for ever. A line,
    # once begun, must be complete within line_timeout (Postfix's smtpd_timeout with
    # smtpd_per_record_deadline, Exim's smtp_receive_timeout: 5 min), and a connection
    # lasts at most session_timeout (time the relay spends handing mail over is not
    # counted): 1 h carries a 150 MB message over a link of 340 kbit/s.
    line_timeout: Duration = 300.0
    session_timeout: Duration = 3600.0
    max_connections: int = Field(default=100, ge=1)
    # Unset: half of max_connections (rounded up), so that one address cannot take every
    # slot, while several applications behind one address (127.0.0.1) still fit.
    max_connections_per_client: int | None = Field(default=None, ge=1)
    max_auth_failures: int = Field(default=3, ge=1)
    # The header section is held in memory and parsed; the body only ever streams to disk.
    # 256 KiB is Exchange Online's own limit for a message's headers; 50 Received fields
    # is Postfix's hopcount_limit (a mail loop); address lists beyond a hundred are not
    # senders but abuse, and the email package's parser is quadratic in their length.
    max_header_size: Size = 256 * 1024
    max_header_fields: int = Field(default=1000, ge=10)
    max_received_headers: int = Field(default=50, ge=1)
    max_header_addresses: int = Field(default=100, ge=1)
    # Memory for message bytes held at once while receiving, over all connections: a
    # DATA waits for its share (then gets 452) rather than letting memory grow.
    buffer_memory: Size = 64 * 1024 * 1024
    auth_throttle: AuthThrottle = Field(default_factory=AuthThrottle)

    @property
    def connections_per_client(self) -> int:
        """The per-address connection limit in force (the setting or its default)."""
        if self.max_connections_per_client is not None:
            return self.max_connections_per_client
        return (self.max_connections + 1) // 2


def _default_spool() -> Path:
    """systemd's StateDirectory= (when set), else the FHS place for a daemon's state."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state or "/var/lib/smtp-oauth-relay") / "spool"


class SpoolSettings(_Model):
    directory: Path = Field(default_factory=_default_spool)
    on_tmpfs: Literal["refuse", "warn"] = "refuse"


class MailboxLimits(_Model):
    """Per-mailbox pacing; the defaults are Exchange Online's SMTP AUTH limits."""

    max_sessions: int = Field(default=3, ge=1)
    messages_per_minute: int = Field(default=30, ge=1)
    recipients_per_day: int = Field(default=10_000, ge=1)
    throttle_cooldown: Duration = 600.0


class Delivery(_Model):
    max_lifetime: Duration = 5 * 86400.0
    retry_initial: Duration = 60.0
    retry_max: Duration = 3600.0
    bounce: Literal["sender", "operator", "none"] = "sender"
    operator: Address | None = None
    window: int = Field(default=100, ge=1)
    synchronous: Duration | None = None
    shutdown_timeout: Duration = 30.0
    mailbox_limits: MailboxLimits = Field(default_factory=MailboxLimits)

    @model_validator(mode="after")
    def _operator(self) -> Delivery:
        if self.bounce == "operator" and self.operator is None:
            raise ValueError("bounce: operator needs delivery.operator (an address)")
        return self


class Logging(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Http(_Model):
    """The HTTP endpoint for probes and Prometheus: /healthz, /readyz, /metrics.

    Loopback by default: the pages name credentials, mailboxes and queue sizes, which is
    nothing for the network at large.
    """

    enabled: bool = True
    address: IPAddress = "127.0.0.1"
    port: Port = 8025
    request_timeout: Duration = 10.0
    cache_ttl: Duration = 5.0


class Config(_Model):
    server: Server = Field(default_factory=Server)
    users: dict[Name, User] = Field(default_factory=dict)
    profiles: dict[Name, Profile] = Field(default_factory=dict)
    routing: Routing = Field(default_factory=Routing)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    delivery: Delivery = Field(default_factory=Delivery)
    credentials: dict[Name, Credential] = Field(default_factory=dict)
    upstreams: dict[Name, Upstream] = Field(default_factory=dict)
    logging: Logging = Field(default_factory=Logging)
    http: Http = Field(default_factory=Http)

    def upstream_for(self, profile: Profile) -> Upstream:
        """The profile's named upstream, or the SMTP endpoint of its credential's cloud."""
        if profile.upstream is not None:
            return self.upstreams[profile.upstream]
        cloud = CLOUDS[self.credentials[profile.credential].cloud]
        return Upstream(host=cloud.smtp_host)


# --- loading -------------------------------------------------------------------------------

def _loc(loc: Iterable[Any]) -> str:
    """A key path as ``server.listeners.0.port``; a key that would not show (empty, or with
    blanks, quotes or control characters) is written as a JSON string."""
    return ".".join(_key(str(p)) for p in loc)


def _key(part: str) -> str:
    if part and part.isprintable() and not any(c in part for c in " \"'"):
        return part
    return json.dumps(part)


def _cross_references(cfg: Config) -> list[tuple[str, str]]:
    """Problems pydantic cannot see: names that point at things that do not exist."""
    problems: list[tuple[str, str]] = []

    def known(names: Iterable[str]) -> str:
        listed = ", ".join(sorted(names))
        return f" (known: {listed})" if listed else " (none defined)"

    for name, profile in cfg.profiles.items():
        if profile.credential not in cfg.credentials:
            problems.append((f"profiles.{name}.credential",
                             f"unknown credential {profile.credential!r}"
                             + known(cfg.credentials)))
        if profile.upstream is not None and profile.upstream not in cfg.upstreams:
            problems.append((f"profiles.{name}.upstream",
                             f"unknown upstream {profile.upstream!r}" + known(cfg.upstreams)))
    for name, user in cfg.users.items():
        if user.profile is not None and user.profile not in cfg.profiles:
            problems.append((f"users.{name}.profile",
                             f"unknown profile {user.profile!r}" + known(cfg.profiles)))
    if cfg.routing.system_profile is not None and cfg.routing.system_profile not in cfg.profiles:
        problems.append(("routing.system_profile",
                         f"unknown profile {cfg.routing.system_profile!r}"
                         + known(cfg.profiles)))
    for i, rule in enumerate(cfg.routing.rules):
        if rule.profile not in cfg.profiles:
            problems.append((f"routing.rules.{i}.profile",
                             f"unknown profile {rule.profile!r}" + known(cfg.profiles)))
    seen: set[tuple[str, int]] = set()
    for i, listener in enumerate(cfg.server.listeners):
        key = (listener.address, listener.port)
        if key in seen and listener.port != 0:
            problems.append((f"server.listeners.{i}",
                             f"{listener.address} port {listener.port} is listed twice"))
        seen.add(key)
        if listener.tls != "none" and cfg.server.tls is None:
            problems.append((f"server.listeners.{i}.tls",
                             f"tls: {listener.tls} needs server.tls.certificate_file "
                             "and server.tls.key_file"))
    return problems


def _limits(cfg: Config) -> list[tuple[str, str]]:
    """Settings that are valid one by one but contradict each other."""
    problems: list[tuple[str, str]] = []
    server = cfg.server
    per_client = server.max_connections_per_client
    if per_client is not None and per_client > server.max_connections:
        problems.append(("server.max_connections_per_client",
                         f"{per_client} must not exceed server.max_connections "
                         f"({server.max_connections})"))
    throttle = server.auth_throttle
    if throttle.max_delay < throttle.delay:
        problems.append(("server.auth_throttle.max_delay",
                         f"{throttle.max_delay:g} s must not be less than "
                         f"server.auth_throttle.delay ({throttle.delay:g} s)"))
    return problems


def _files(cfg: Config) -> list[tuple[str, Path]]:
    """Every file the config names, with its key path, so missing files are found at load."""
    out: list[tuple[str, Path]] = []
    if cfg.server.tls:
        out += [("server.tls.certificate_file", cfg.server.tls.certificate_file),
                ("server.tls.key_file", cfg.server.tls.key_file)]
    for name, cred in cfg.credentials.items():
        base = f"credentials.{name}"
        if cred.ca_file:
            out.append((f"{base}.ca_file", cred.ca_file))
        if cert := cred.certificate:
            for field in ("private_key_file", "public_certificate_file", "pfx_file"):
                if (p := getattr(cert, field)) is not None:
                    out.append((f"{base}.certificate.{field}", p))
    for name, up in cfg.upstreams.items():
        if up.ca_file:
            out.append((f"upstreams.{name}.ca_file", up.ca_file))
    return out


def _secret_refs(cfg: Config) -> list[tuple[str, SecretRef]]:
    out: list[tuple[str, SecretRef]] = []
    for name, cred in cfg.credentials.items():
        if cred.client_secret:
            out.append((f"credentials.{name}.client_secret", cred.client_secret))
        if cred.certificate and cred.certificate.passphrase:
            out.append((f"credentials.{name}.certificate.passphrase",
                        cred.certificate.passphrase))
    return out


class _Cycle(Exception):
    """A mapping or list of the document contains itself, at ``path``."""

    def __init__(self, path: tuple[Any, ...]) -> None:
        self.path = path


def _absolutise(data: Any, base: Path, key: str = "", path: tuple[Any, ...] = (),
                within: frozenset[int] = frozenset()) -> Any:
    """Make every ``*_file`` / ``file`` value absolute relative to the config's directory.

    Raises :class:`_Cycle` for a YAML alias inside its own anchor (``a: &x {b: *x}``),
    which would otherwise recurse until the interpreter gives up.
    """
    if isinstance(data, dict | list):
        if id(data) in within:
            raise _Cycle(path)
        within = within | {id(data)}
    if isinstance(data, dict):
        return {k: _absolutise(v, base, str(k), (*path, k), within) for k, v in data.items()}
    if isinstance(data, list):
        return [_absolutise(v, base, key, (*path, i), within) for i, v in enumerate(data)]
    if isinstance(data, str) and (key in ("file", "directory") or key.endswith("_file")):
        p = Path(data).expanduser()
        return str(p if p.is_absolute() else base / p)
    return data


def parse_config(data: Any, source: str = "config", base_dir: Path | None = None,
                 check_secrets: bool = True, check_files: bool = True) -> Config:
    """Validate an already-loaded YAML document; raises :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the top level must be a mapping of sections")])
    if base_dir is not None:
        try:
            data = _absolutise(data, base_dir)
        except _Cycle as exc:
            raise ConfigError(source, [(_loc(exc.path), "contains itself (a YAML alias "
                                                        "inside its own anchor)")]) from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling against config.example.yaml)"
            problems.append((_loc(err["loc"]), msg))
        raise ConfigError(source, problems) from None
    problems = _cross_references(cfg) + _limits(cfg)
    if check_files:
        for path, file in _files(cfg):
            if not file.is_file():
                problems.append((path, f"file {file} does not exist"))
    if check_secrets:
        for path, ref in _secret_refs(cfg):
            try:
                ref.resolve()
            except secrets.SecretSourceError as exc:
                problems.append((path, str(exc)))
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: Path | str, *, check_secrets: bool = True) -> Config:
    """Read and validate the YAML file at ``path``; raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), [("", "file not found (pass --config PATH)")]) from None
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        # PyYAML builds nested collections recursively: "[[[[..." a few thousand deep.
        raise ConfigError(str(p), [("", "invalid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        # One line: a ReaderError (a control character in the file) says where on a second.
        problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
        raise ConfigError(str(p), [("", f"invalid YAML: {where}{problem}")]) from None
    return parse_config(data, str(p), p.resolve().parent, check_secrets=check_secrets)
