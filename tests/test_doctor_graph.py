"""``doctor`` for profiles with ``transport: graph``, against the sandbox's fake Graph."""

from __future__ import annotations

from typing import Any

import pytest

from relay.sandbox.service import Sandbox
from tests.test_doctor import CHAIN, CLIENT, MAILBOX, SECRET, TENANT, Env, _isolation, env

__all__ = ["_isolation", "env"]       # the fixtures of tests/test_doctor.py

GRAPH_CHAIN = ["config", "graph-token", "graph-claims", "graph", "expiry"]


def graph(env: Env, **profile: Any) -> dict[str, Any]:
    return {"profiles": {"system": {"transport": "graph", **profile}},
            "graph": {"url": env.sandbox.graph.url, "ca_file": str(env.ca_file)}}


def grant(sandbox: Sandbox, *roles: str) -> None:
    sandbox.entra.add_app(TENANT, CLIENT, secret=SECRET, roles=roles)
    sandbox.graph.add_mailbox(MAILBOX)


async def test_a_good_graph_profile_passes_and_nothing_is_sent(env: Env) -> None:
    grant(env.sandbox, "Mail.Send")
    res = await env.run(overrides=graph(env))
    assert res.code == 0, res.out
    assert list(res.steps) == GRAPH_CHAIN
    assert res.status() == {"config": "ok", "graph-token": "ok", "graph-claims": "ok",
                            "graph": "ok", "expiry": "info"}
    assert "https://graph.microsoft.com" in res.steps["graph-token"]["detail"]
    assert "nothing was sent" in res.steps["graph"]["detail"]
    assert env.sandbox.graph.messages == [] and env.sandbox.graph.requests == 1
    assert env.sandbox.exchange.commands == []          # no SMTP at all


async def test_send_to_goes_over_graph(env: Env) -> None:
    grant(env.sandbox, "Mail.Send")
    res = await env.run("--send-to", "you@example.com", overrides=graph(env))
    assert res.code == 0, res.out
    assert res.steps["send"]["status"] == "ok"
    [msg] = env.sandbox.graph.messages
    assert msg.mailbox == MAILBOX and msg.recipients == ["you@example.com"]


@pytest.mark.parametrize(("rbac", "claims", "graph_status", "words"), [
    (True, "info", "ok", "RBAC for Applications"),      # least privilege: works
    (False, "info", "fail", "RBAC for Applications"),   # neither grant: the fix is named
])
async def test_without_mail_send_the_rbac_assignment_decides(
        env: Env, rbac: bool, claims: str, graph_status: str, words: str) -> None:
    grant(env.sandbox)
    if rbac:
        env.sandbox.graph.rbac.add(MAILBOX)
    res = await env.run(overrides=graph(env))
    assert res.status()["graph-claims"] == claims
    assert words in res.steps["graph-claims"]["detail"]
    assert res.status()["graph"] == graph_status
    assert res.code == (0 if rbac else 1)
    if not rbac:
        assert "RBAC for Applications" in (res.steps["graph"]["fix"] or "")


async def test_a_mailbox_not_in_exchange_online_is_named(env: Env) -> None:
    grant(env.sandbox, "Mail.Send")
    env.sandbox.graph.rest_disabled.add(MAILBOX)
    res = await env.run(overrides=graph(env))
    assert res.code == 1 and res.status()["graph"] == "fail"
    assert "MailboxNotEnabledForRESTAPI" in res.steps["graph"]["detail"]


async def test_with_fallback_the_smtp_path_is_checked_too(env: Env) -> None:
    grant(env.sandbox, "Mail.Send", "SMTP.SendAsApp")
    res = await env.run(overrides=graph(env, fallback_to_smtp=True))
    assert res.code == 0, res.out
    assert list(res.steps) == [*GRAPH_CHAIN[:-1], *CHAIN[1:]]
