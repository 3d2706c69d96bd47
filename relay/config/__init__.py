"""The configuration: YAML in, one validated, frozen object out.

- :func:`load_config`, :func:`parse_config`: a file or a loaded document to a
  :class:`Config`, or a :class:`ConfigError` that names every wrong key and why
  (``profiles.sales.credential: unknown credential 'main2' (known: main)``);
- :class:`Config` and its sections (:class:`Server`, :class:`Profile`,
  :class:`Credential`, ...), :data:`CLOUDS`, :data:`DEFAULT_CONFIG_PATH`;
- :func:`changed_keys`: what differs between two configurations, by key (a reload's log).

Every stage, the ops side and the command line read their settings from one
:class:`Config`, so this package's face is those names, re-exported here: ``from
relay.config import Config, ConfigError, load_config``. Inside, one module per concern:
:mod:`~relay.config.values` (durations, sizes, addresses, networks),
:mod:`~relay.config.credentials` (clouds, secrets, app credentials),
:mod:`~relay.config.sections` (the sections and :class:`Config`),
:mod:`~relay.config.checks` (what spans sections), :mod:`~relay.config.errors` (problems
with their key paths), :mod:`~relay.config.loading` (YAML in, :class:`Config` out) and
:mod:`~relay.config.diff` (what differs between two, by key: :func:`changed_keys`).
"""

from relay.config.credentials import (
    CLOUDS,
    CertificateCredential,
    Cloud,
    CloudName,
    Credential,
    DelegatedAuth,
    SecretRef,
)
from relay.config.diff import changed_keys
from relay.config.errors import ConfigError
from relay.config.loading import DEFAULT_CONFIG_PATH, load_config, parse_config
from relay.config.sections import (
    AuthThrottle,
    Config,
    Delivery,
    Graph,
    Http,
    Listener,
    Logging,
    MailboxLimits,
    Profile,
    Route,
    Routing,
    Server,
    ServerTLS,
    SpoolSettings,
    Upstream,
    User,
)

__all__ = [
    "CLOUDS",
    "DEFAULT_CONFIG_PATH",
    "AuthThrottle",
    "CertificateCredential",
    "Cloud",
    "CloudName",
    "Config",
    "ConfigError",
    "Credential",
    "DelegatedAuth",
    "Delivery",
    "Graph",
    "Http",
    "Listener",
    "Logging",
    "MailboxLimits",
    "Profile",
    "Route",
    "Routing",
    "SecretRef",
    "Server",
    "ServerTLS",
    "SpoolSettings",
    "Upstream",
    "User",
    "changed_keys",
    "load_config",
    "parse_config",
]
