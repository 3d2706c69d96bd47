"""Profile selection: user profile > first matching rule (file order) > system profile."""

from __future__ import annotations

from typing import Any

import pytest

from relay.accept.route import Router, Unroutable, address_matches
from relay.config import Config, parse_config
from relay.core.passhash import hash_password

_HASH = hash_password("secret-pw", ln=10)


def make_config(rules: list[dict[str, Any]], system: str | None = "system",
                users: dict[str, str | None] | None = None) -> Config:
    users = {"alice": "personal", "bob": None} if users is None else users
    return parse_config({
        "credentials": {"main": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "c",
                                 "client_secret": {"value": "x"}}},
        "profiles": {name: {"mailbox": f"{name}@contoso.com", "credential": "main"}
                     for name in ("system", "personal", "sales", "lab", "v6", "crm")},
        "users": {name: {"password_hash": _HASH, **({"profile": p} if p else {})}
                  for name, p in users.items()},
        "routing": {"system_profile": system, "rules": rules},
    }, check_secrets=False, check_files=False)


RULES = [
    {"sender": "crm@example.com", "profile": "crm"},
    {"sender": "*@sales.example.com", "profile": "sales"},
    {"network": "10.20.0.0/16", "profile": "lab"},
    {"network": "2001:db8::/32", "profile": "v6"},
]


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(make_config(RULES))


@pytest.mark.parametrize(("user", "sender", "ip", "expected"), [
    # 1. the authenticated user's own profile beats every rule
    ("alice", "crm@example.com", "10.20.1.1", "personal"),
    ("alice", "", "192.0.2.1", "personal"),
    # a user without a profile (or unknown after a reload) is routed like anyone else
    ("bob", "x@sales.example.com", "192.0.2.1", "sales"),
    ("ghost", "x@sales.example.com", "192.0.2.1", "sales"),
    # 2. sender rules: exact address and domain glob, case-insensitive
    (None, "crm@example.com", "192.0.2.1", "crm"),
    (None, "CRM@Example.COM", "192.0.2.1", "crm"),
    (None, "<crm@example.com>", "192.0.2.1", "crm"),
    (None, "Invoices@SALES.example.com", "192.0.2.1", "sales"),
    (None, "x@sub.sales.example.com", "192.0.2.1", "system"),  # glob is not a suffix match
    (None, "x@sales.example.com.evil.test", "192.0.2.1", "system"),
    # sender rules come first in the file, so they beat a matching network
    (None, "x@sales.example.com", "10.20.1.1", "sales"),
    # network rules: IPv4, IPv6, IPv4-mapped IPv6 against an IPv4 network
    (None, "printer@contoso.com", "10.20.255.254", "lab"),
    (None, "printer@contoso.com", "::ffff:10.20.0.7", "lab"),
    (None, "printer@contoso.com", "::FFFF:10.20.0.7", "lab"),
    (None, "printer@contoso.com", "2001:db8:1::5", "v6"),
    (None, "printer@contoso.com", "10.21.0.1", "system"),
    (None, "printer@contoso.com", "::ffff:10.21.0.1", "system"),
    # 3. system profile; also for the null sender and an unparsable client address
    (None, "", "192.0.2.1", "system"),
    (None, "someone@else.test", "", "system"),
    (None, "someone@else.test", "not-an-ip", "system"),
])
def test_precedence(router: Router, user: str | None, sender: str, ip: str,
                    expected: str) -> None:
    assert router.select(user=user, sender=sender, client_ip=ip) == expected


def test_first_matching_rule_in_file_order_wins() -> None:
    sender_first = Router(make_config([{"sender": "*@example.com", "profile": "sales"},
                                       {"network": "10.0.0.0/8", "profile": "lab"}]))
    network_first = Router(make_config([{"network": "10.0.0.0/8", "profile": "lab"},
                                        {"sender": "*@example.com", "profile": "sales"}]))
    kwargs = {"user": None, "sender": "app@example.com", "client_ip": "10.1.2.3"}
    assert sender_first.select(**kwargs) == "sales"
    assert network_first.select(**kwargs) == "lab"
    # Two overlapping networks: the first listed wins even if the second is narrower.
    overlap = Router(make_config([{"network": "10.0.0.0/8", "profile": "lab"},
                                  {"network": "10.1.0.0/16", "profile": "sales"}]))
    assert overlap.select(user=None, sender="", client_ip="10.1.2.3") == "lab"


def test_ipv4_client_matches_ipv4_mapped_network() -> None:
    router = Router(make_config([{"network": "::ffff:10.0.0.0/104", "profile": "lab"}]))
    assert router.select(user=None, sender="", client_ip="10.9.9.9") == "lab"
    assert router.select(user=None, sender="", client_ip="::ffff:10.9.9.9") == "lab"
    assert router.select(user=None, sender="", client_ip="11.0.0.1") == "system"


def test_scoped_ipv6_client() -> None:
    router = Router(make_config([{"network": "fe80::/10", "profile": "lab"}]))
    assert router.select(user=None, sender="", client_ip="fe80::1%eth0") == "lab"


def test_unroutable_gives_550_with_reason() -> None:
    router = Router(make_config([{"sender": "*@sales.example.com", "profile": "sales"}],
                                system=None))
    with pytest.raises(Unroutable) as err:
        router.select(user=None, sender="x@other.test", client_ip="10.1.2.3")
    reply = err.value.reply
    assert reply.code == 550 and reply.permanent
    assert reply.text == ("5.7.1 No mailbox profile for sender <x@other.test> from 10.1.2.3 "
                          "(no routing rule matched and no routing.system_profile is set)")
    assert str(err.value) == str(reply)


def test_unroutable_names_the_user_without_profile() -> None:
    router = Router(make_config([], system=None))
    with pytest.raises(Unroutable) as err:
        router.select(user="bob", sender="", client_ip="::1")
    text = err.value.reply.text
    assert text.startswith("5.7.1 No mailbox profile for sender <> from ::1 (")
    assert "user bob has no profile" in text
    assert "no routing rules are set" in text and "routing.system_profile" in text


def test_unroutable_reply_cannot_be_injected() -> None:
    router = Router(make_config([], system=None))
    with pytest.raises(Unroutable) as err:
        router.select(user=None, sender="a@b\r\n250 ok" + "x" * 1000, client_ip="10.0.0.1")
    text = err.value.reply.text
    assert "\r" not in text and "\n" not in text
    assert len(text) < 400
    assert "\n250" not in err.value.reply.as_smtp()


def test_router_keeps_no_reference_to_mutable_rule_text() -> None:
    """Patterns are compiled once in __init__; selecting does not re-read the config."""
    cfg = make_config(RULES)
    router = Router(cfg)
    object.__setattr__(cfg, "routing", None)  # a per-message read would now fail
    assert router.select(user=None, sender="x@sales.example.com", client_ip="") == "sales"
    assert router.select(user=None, sender="", client_ip="10.20.0.1") == "lab"
    assert router.select(user=None, sender="", client_ip="192.0.2.1") == "system"


@pytest.mark.parametrize(("address", "patterns", "expected"), [
    ("crm@example.com", ["crm@example.com"], True),
    ("CRM@EXAMPLE.COM", ["crm@example.com"], True),
    ("crm@example.com", ["CRM@Example.Com"], True),
    ("a@sales.example.com", ["*@sales.example.com"], True),
    ("a@Sales.Example.com", ["*@sales.example.com"], True),
    ("a@x.sales.example.com", ["*@sales.example.com"], False),
    ("a@x.sales.example.com", ["*@*.sales.example.com"], True),
    ("scanner-7@contoso.com", ["scanner-?@contoso.com"], True),
    ("scanner-17@contoso.com", ["scanner-?@contoso.com"], False),
    # a pattern without "@" is not a domain shorthand: it must match the whole address
    ("a@example.com", ["example.com"], False),
    ("example.com", ["example.com"], True),
    ("a@example.com", ["*example.com"], True),
    ("", ["*@example.com"], False),
    ("", [], False),
    ("a@example.com", [], False),
    ("<a@example.com>", ["a@example.com"], True),
    ("a@example.com\nx", ["a@example.com"], False),
    ("a@example.com", ["nope@example.com", "a@*"], True),
])
def test_address_matches(address: str, patterns: list[str], expected: bool) -> None:
    assert address_matches(address, patterns) is expected
