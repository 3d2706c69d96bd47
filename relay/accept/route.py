"""Which mailbox profile a message is sent through.

Precedence mirrors how per-user settings override system ones elsewhere (a per-user
smtp.cfg over the system smtp.cfg): the authenticated user's own profile, then the first
routing rule that matches (in file order, so the operator controls overlaps), then the
system profile. Mail that matches nothing is refused with a reason the sender's admin can
act on, rather than silently sent as some default mailbox.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from relay.config import Config
from relay.core.errors import ReplyError
from relay.core.net import IPAddress, parse_ip
from relay.core.reply import Reply
from relay.core.text import truncate

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_UNSAFE_TEXT = re.compile(r"[^\x20-\x7e]")


class Unroutable(ReplyError):
    """No profile applies to a message; ``reply`` is the 550 to give the client."""


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    # fnmatch.translate anchors the pattern; IGNORECASE covers local part and domain alike
    # (SMTP servers treat local parts case-insensitively in practice, Exchange included).
    return re.compile(fnmatch.translate(pattern.strip()), re.IGNORECASE)


def normalize_address(address: str) -> str:
    """An envelope address without surrounding blanks or angle brackets."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address


def address_matches(address: str, patterns: Iterable[str]) -> bool:
    """True if ``address`` matches any of the glob ``patterns``, case-insensitively.

    The glob is applied to the whole address: ``*@sales.example.com`` matches a domain,
    ``crm@example.com`` one address. A pattern without ``@`` is not treated as a domain;
    it simply has to match the whole address. An empty address (the null sender) only
    matches a pattern that matches the empty string, such as ``*``.
    """
    address = normalize_address(address)
    return any(_compile(p).match(address) for p in patterns)


def _candidates(client_ip: str) -> tuple[IPAddress, ...]:
    """The client address in every form a configured network might be written in.

    An IPv4 client on a dual-stack listener shows up as ``::ffff:10.0.0.1``; an operator
    writes ``10.0.0.0/8``. Both spellings are tried, in both directions.
    """
    ip = parse_ip(client_ip.strip().strip("[]"))
    if ip is None:
        return ()
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return (ip, ip.ipv4_mapped)
        return (ip,)
    return (ip, ipaddress.IPv6Address(f"::ffff:{ip}"))


def _safe(text: str, limit: int = 200) -> str:
    text = _UNSAFE_TEXT.sub("?", text)
    return truncate(text, limit)


@dataclass(frozen=True)
class _Rule:
    index: int
    profile: str
    sender: re.Pattern[str] | None
    network: IPNetwork | None

    def matches(self, sender: str, ips: tuple[IPAddress, ...]) -> bool:
        if self.sender is not None:
            return self.sender.match(sender) is not None
        assert self.network is not None
        return any(ip.version == self.network.version and ip in self.network for ip in ips)


class Router:
    """Chooses a profile name for each message; built once per config (and per reload)."""

    def __init__(self, config: Config) -> None:
        self._user_profiles = {name: user.profile for name, user in config.users.items()
                               if user.profile is not None}
        self._known_users = frozenset(config.users)
        self._rules = tuple(
            _Rule(i, rule.profile,
                  _compile(rule.sender) if rule.sender is not None else None,
                  rule.network)
            for i, rule in enumerate(config.routing.rules))
        self._has_network_rules = any(r.network is not None for r in self._rules)
        self._system = config.routing.system_profile

    def select(self, *, user: str | None, sender: str, client_ip: str) -> str:
        """The profile name for one message; raises :class:`Unroutable`."""
        if user is not None and (profile := self._user_profiles.get(user)) is not None:
            return profile
        address = normalize_address(sender)
        ips = _candidates(client_ip) if self._has_network_rules else ()
        for rule in self._rules:
            if rule.matches(address, ips):
                log.debug("routing rule %d matched: profile %s", rule.index, rule.profile)
                return rule.profile
        if self._system is not None:
            return self._system
        raise Unroutable(self._unroutable_reply(user, address, client_ip))

    def _unroutable_reply(self, user: str | None, sender: str, client_ip: str) -> Reply:
        why = []
        if user is not None:
            why.append(f"user {_safe(user, 64)} has no profile"
                       if user in self._known_users else f"user {_safe(user, 64)} is unknown")
        why.append("no routing rule matched" if self._rules else "no routing rules are set")
        why.append("no routing.system_profile is set")
        where = f" from {_safe(client_ip, 64)}" if client_ip else ""
        return Reply(550, f"5.7.1 No mailbox profile for sender <{_safe(sender)}>{where} "
                          f"({', '.join(why[:-1])} and {why[-1]})")
