"""What the configuration's models cannot check one section at a time.

- :func:`cross_references`: names that point at things that do not exist (a profile's
  credential or upstream, a user's profile, a routing rule's profile, a listener's TLS);
- :func:`contradictions`: settings that are valid one by one but contradict each other;
- :func:`named_files`, :func:`secret_refs`: every file and secret the config names, with
  its key path, so that a missing one is found at load and not at the first message;
- :func:`secret_problems`: every secret read, and what is wrong with it (its source cannot
  be read, or a client secret is a Secret ID);
- :func:`advisories`: what is allowed but probably a mistake (``smtp-oauth-relay check``
  prints these as warnings).

Each returns (key path, message) pairs or texts, so that the loader reports every problem
of a file at once.
"""

from __future__ import annotations

from pathlib import Path

from relay.config.credentials import SecretRef, secret_id_problem
from relay.config.errors import known
from relay.config.sections import Config
from relay.core import secrets


def cross_references(cfg: Config) -> list[tuple[str, str]]:
    """Problems pydantic cannot see: names that point at things that do not exist."""
    problems: list[tuple[str, str]] = []
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


def contradictions(cfg: Config) -> list[tuple[str, str]]:
    """Settings that are valid one by one but contradict each other."""
    problems: list[tuple[str, str]] = []
    server = cfg.server
    per_client = server.max_connections_per_client
    if per_client is not None and per_client > server.max_connections:
        problems.append(("server.max_connections_per_client",
                         f"{per_client} must not exceed server.max_connections "
                         f"({server.max_connections})"))
    limits_of: dict[str, tuple[str, object]] = {}
    for name, profile in cfg.profiles.items():
        upstream = cfg.upstreams.get(profile.upstream or "")
        cred = cfg.credentials.get(profile.credential)
        if upstream is not None and upstream.service == "acs" and cred is not None \
                and cred.client_secret is None:
            problems.append((f"profiles.{name}.credential",
                             f"upstream {profile.upstream!r} is Azure Communication Services, "
                             "whose SMTP login is the app's client secret: the credential "
                             "needs client_secret"))
        if profile.transport == "smtp":
            own = upstream.limits if upstream is not None else None
            seen = limits_of.setdefault(profile.mailbox.lower(), (name, own))
            if seen[1] != own:
                problems.append((f"profiles.{name}.upstream",
                                 f"mailbox {profile.mailbox} is also sent as by profile "
                                 f"{seen[0]} through an upstream with other limits; one "
                                 "mailbox has one set of limits"))
        if profile.fallback_to_smtp and profile.transport != "graph":
            problems.append((f"profiles.{name}.fallback_to_smtp",
                             "only for transport: graph (an SMTP profile has nothing to "
                             "fall back from)"))
    throttle = server.auth_throttle
    if throttle.max_delay < throttle.delay:
        problems.append(("server.auth_throttle.max_delay",
                         f"{throttle.max_delay:g} s must not be less than "
                         f"server.auth_throttle.delay ({throttle.delay:g} s)"))
    return problems


def named_files(cfg: Config) -> list[tuple[str, Path]]:
    """Every file the config names, with its key path, so missing files are found at load."""
    out: list[tuple[str, Path]] = []
    if cfg.server.tls:
        out += [("server.tls.certificate_file", cfg.server.tls.certificate_file),
                ("server.tls.key_file", cfg.server.tls.key_file)]
    for name, cred in cfg.credentials.items():
        base = f"credentials.{name}"
        if cred.ca_file:
            out.append((f"{base}.ca_file", cred.ca_file))
        if cred.federated_token_file:
            out.append((f"{base}.federated_token_file", cred.federated_token_file))
        if cert := cred.certificate:
            for field in ("private_key_file", "public_certificate_file", "pfx_file"):
                if (p := getattr(cert, field)) is not None:
                    out.append((f"{base}.certificate.{field}", p))
    for name, up in cfg.upstreams.items():
        if up.ca_file:
            out.append((f"upstreams.{name}.ca_file", up.ca_file))
    if cfg.graph.ca_file:
        out.append(("graph.ca_file", cfg.graph.ca_file))
    return out


def secret_refs(cfg: Config) -> list[tuple[str, SecretRef]]:
    """Every secret the config names, with its key path, so that each is read at load."""
    out: list[tuple[str, SecretRef]] = []
    for name, cred in cfg.credentials.items():
        if cred.client_secret:
            out.append((f"credentials.{name}.client_secret", cred.client_secret))
        if cred.certificate and cred.certificate.passphrase:
            out.append((f"credentials.{name}.certificate.passphrase",
                        cred.certificate.passphrase))
    return out


def secret_problems(cfg: Config) -> list[tuple[str, str]]:
    """Read every secret now: a source that cannot be read, or a client secret that is
    surely not one, is found at load rather than by Entra ID at the first message."""
    problems: list[tuple[str, str]] = []
    for path, ref in secret_refs(cfg):
        try:
            secret = ref.resolve()
        except secrets.SecretSourceError as exc:
            problems.append((path, str(exc)))
            continue
        if path.endswith(".client_secret") and (
                why := secret_id_problem(secret, ref.describe())):
            problems.append((path, why))
    return problems


def advisories(cfg: Config) -> list[str]:
    """Settings that work but are probably not meant: an inline secret, a config that
    routes no mail at all."""
    out: list[str] = []
    for name, cred in cfg.credentials.items():
        if cred.client_secret and cred.client_secret.value is not None:
            out.append(f"credentials.{name}.client_secret is inline in the YAML; "
                       "prefer {env: ...}, {file: ...} or {credential: ...}")
    if cfg.routing.system_profile is None and not cfg.routing.rules and not any(
            u.profile for u in cfg.users.values()):
        out.append("no routing.system_profile, rules or user profiles: every message "
                   "will be refused as unroutable")
    return out
