"""The sections of the configuration file, and :class:`Config`, the whole.

- :class:`Config`: the validated, frozen configuration (``server``, ``users``, ``profiles``,
  ``routing``, ``spool``, ``delivery``, ``credentials``, ``upstreams``, ``graph``,
  ``logging``, ``http``); :meth:`Config.upstream_for` and :meth:`Config.graph_url_for`
  say where a profile's mail leaves;
- one class per section or entry: :class:`Server` (with :class:`Listener`,
  :class:`ServerTLS`, :class:`AuthThrottle`), :class:`User`, :class:`Profile`,
  :class:`Routing` and :class:`Route`, :class:`SpoolSettings`, :class:`Delivery` (with
  :class:`MailboxLimits`), :class:`Upstream`, :class:`Graph`, :class:`Logging`,
  :class:`Http`.

The defaults are here, with the reason for each where it is not obvious: a key left out of
the YAML gets exactly what these classes say. Names that point at other sections (a
profile's credential) are checked after validation, by :mod:`relay.config.checks`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from relay.config.credentials import CLOUDS, Credential
from relay.config.values import (
    Address,
    Duration,
    HttpsUrl,
    IPAddress,
    Name,
    Network,
    Port,
    Section,
    Size,
    check_password_hash,
)

# The SMTP endpoint of each Microsoft service an upstream can be (``service``), used when
# the upstream names no host of its own.
SERVICE_HOSTS = {"exchange": "smtp.office365.com", "hve": "smtp.hve.mx.microsoft",
                 "acs": "smtp.azurecomm.net"}


class Upstream(Section):
    """Where mail leaves: the Exchange Online SMTP submission endpoint by default.

    ``service`` says which Microsoft service it is: Exchange Online (``exchange``), High
    Volume Email (``hve``: the same XOAUTH2 login, internal recipients only) or Azure
    Communication Services Email (``acs``: AUTH LOGIN as ``username`` with the profile's
    client secret). ``limits``, when set, replace ``delivery.mailbox_limits`` for the
    mailboxes that send through this upstream: HVE and ACS have limits of their own.
    """

    service: Literal["exchange", "hve", "acs"] = "exchange"
    host: str = ""
    port: Port = 587
    tls: Literal["starttls", "implicit"] = "starttls"
    ca_file: Path | None = None
    timeout: Duration = 60.0
    helo_name: str | None = None
    username: str | None = None
    limits: MailboxLimits | None = None

    @model_validator(mode="after")
    def _service(self) -> Upstream:
        if not self.host:
            object.__setattr__(self, "host", SERVICE_HOSTS[self.service])
        if self.service == "acs" and not self.username:
            raise ValueError("service: acs needs username: the ACS SMTP username (an SMTP "
                             "Username resource, or <ACS resource name>.<app client "
                             "id>.<tenant id>)")
        if self.service != "acs" and self.username:
            raise ValueError("username is only for service: acs (the others log in with "
                             "XOAUTH2 as the profile's mailbox)")
        return self


class Graph(Section):
    """Microsoft Graph, for profiles with ``transport: graph``."""

    url: HttpsUrl | None = None     # the credential's cloud's Graph endpoint
    ca_file: Path | None = None
    timeout: Duration = 60.0


class Profile(Section):
    """A mailbox that mail is sent as, with the credential and upstream to use."""

    mailbox: Address
    credential: Name
    upstream: Name | None = None
    transport: Literal["smtp", "graph"] = "smtp"
    # transport: graph only: what Graph cannot take (over its request limit) goes over
    # SMTP through ``upstream`` instead of being refused.
    fallback_to_smtp: bool = False
    sender_policy: Literal["keep", "rewrite", "reject"] = "rewrite"
    send_as: list[str] = Field(default_factory=list)
    synchronous: Duration | None = None


class User(Section):
    """A local SMTP account for AUTH PLAIN/LOGIN (hash from ``smtp-oauth-relay hash-password``)."""

    password_hash: Annotated[str, AfterValidator(check_password_hash)]
    profile: Name | None = None


class Route(Section):
    """Select a profile by envelope sender pattern or by client network."""

    profile: Name
    sender: str | None = None
    network: Network | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> Route:
        if (self.sender is None) == (self.network is None):
            raise ValueError("set exactly one of sender or network")
        return self


class Routing(Section):
    system_profile: Name | None = None
    rules: list[Route] = Field(default_factory=list)


class Listener(Section):
    address: IPAddress = "127.0.0.1"
    port: Port = 2525
    tls: Literal["none", "starttls", "implicit"] = "none"
    require_tls: bool = False
    synchronous: Duration | None = None


class ServerTLS(Section):
    certificate_file: Path
    key_file: Path


class AuthThrottle(Section):
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


class Server(Section):
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
    # The event loop: uvloop where it is installed (about a tenth less CPU per message in
    # `make bench`), else asyncio's own; "asyncio" or "uvloop" to choose. Read at start.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

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


class SpoolSettings(Section):
    directory: Path = Field(default_factory=_default_spool)
    on_tmpfs: Literal["refuse", "warn"] = "refuse"
    # Threads for the spool's disk work (relay.core.diskio): 1 avoids contention for the
    # interpreter; more only where each fsync is slow and the filesystem merges them.
    io_threads: int = Field(default=1, ge=1, le=32)


class MailboxLimits(Section):
    """Per-mailbox pacing; the defaults are Exchange Online's SMTP AUTH limits."""

    max_sessions: int = Field(default=3, ge=1)
    messages_per_minute: int = Field(default=30, ge=1)
    recipients_per_day: int = Field(default=10_000, ge=1)
    throttle_cooldown: Duration = 600.0


class Delivery(Section):
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


class Logging(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Http(Section):
    """The HTTP endpoint for probes and Prometheus: /healthz, /readyz, /metrics.

    Loopback by default: the pages name credentials, mailboxes and queue sizes, which is
    nothing for the network at large.
    """

    enabled: bool = True
    address: IPAddress = "127.0.0.1"
    port: Port = 8025
    request_timeout: Duration = 10.0
    cache_ttl: Duration = 5.0


class Config(Section):
    server: Server = Field(default_factory=Server)
    users: dict[Name, User] = Field(default_factory=dict)
    profiles: dict[Name, Profile] = Field(default_factory=dict)
    routing: Routing = Field(default_factory=Routing)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    delivery: Delivery = Field(default_factory=Delivery)
    credentials: dict[Name, Credential] = Field(default_factory=dict)
    upstreams: dict[Name, Upstream] = Field(default_factory=dict)
    graph: Graph = Field(default_factory=Graph)
    logging: Logging = Field(default_factory=Logging)
    http: Http = Field(default_factory=Http)

    def upstream_for(self, profile: Profile) -> Upstream:
        """The profile's named upstream, or the SMTP endpoint of its credential's cloud."""
        if profile.upstream is not None:
            return self.upstreams[profile.upstream]
        cloud = CLOUDS[self.credentials[profile.credential].cloud]
        return Upstream(host=cloud.smtp_host)

    def graph_url_for(self, profile: Profile) -> str:
        """Microsoft Graph's endpoint for the profile: ``graph.url``, or its cloud's."""
        if self.graph.url is not None:
            return str(self.graph.url).rstrip("/")
        return CLOUDS[self.credentials[profile.credential].cloud].graph_url

