"""Profiles with ``transport: graph``: legacy app -> relay -> fake Microsoft Graph sendMail.

Over real sockets: the app speaks SMTP to the relay, the relay fetches a token for Graph
from the fake Entra and posts the message to the fake Graph, which checks the token's
audience and roles, the mailbox, its RBAC scope and Send As, and takes recipients only
from the message's header fields, as Graph does.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.config import ConfigError
from relay.core.graphsize import GRAPH_REQUEST_LIMIT, graph_request_size
from relay.deliver.classify import Action, Problem, classify
from relay.deliver.graph import graph_reply
from relay.sandbox.service import Sandbox
from relay.spool.records import State
from tests.conftest import RelayFactory, build_config, wait_until
from tests.test_end_to_end import MESSAGE, send

GRAPH: dict[str, Any] = {"profiles": {"system": {"transport": "graph"}}}
FALLBACK: dict[str, Any] = {"profiles": {"system": {"transport": "graph",
                                                    "fallback_to_smtp": True}}}


def graph_token_requests(sandbox: Sandbox) -> int:
    claims = [sandbox.entra.validate_token(t) for t in sandbox.entra.issued_tokens]
    return sum(1 for c in claims if c["aud"] == "https://graph.microsoft.com")


async def test_delivered_over_sendmail_with_a_graph_token_and_the_envelope_as_bcc(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(GRAPH)
    response = await send(relay, "billing@contoso.com",
                          ["customer@example.com", "auditor@example.com"])

    assert response.code == 250 and "delivered as" in response.message
    [got] = sandbox.graph.messages
    assert got.mailbox == "relay@contoso.com"
    # Graph sends to the header's addresses: the Bcc-only envelope recipient was added.
    assert sorted(got.recipients) == ["auditor@example.com", "customer@example.com"]
    assert got.mime.startswith(b"Bcc: <auditor@example.com>\r\nReceived: from ")
    assert got.mime.endswith(b"\r\n\r\nPlease find the invoice.\r\n")
    assert b"From: Billing <relay@contoso.com>" in got.mime     # the sender policy ran
    assert sandbox.exchange.messages == []
    assert graph_token_requests(sandbox) == 1
    assert sandbox.graph.tokens_refused == 0


async def test_hundreds_of_blind_recipients_stay_within_the_line_limit(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(GRAPH)
    blind = [f"reader{i:03d}@example.com" for i in range(300)]
    response = await send(relay, "billing@contoso.com", ["customer@example.com", *blind])
    assert response.code == 250
    [got] = sandbox.graph.messages
    assert sorted(got.recipients) == sorted(["customer@example.com", *blind])
    assert max(len(line) for line in got.mime.split(b"\r\n")) <= 998


async def test_a_to_or_cc_outside_the_envelope_cannot_go_over_graph(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """Graph would deliver to every address in To: a client that names one it did not
    send to gets a permanent answer, or its message goes over SMTP when allowed."""
    relay = await start_relay(GRAPH)
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await send(relay, "billing@contoso.com", ["someone-else@example.com"])
    assert err.value.code == 554 and "customer@example.com" in err.value.message
    assert "fallback_to_smtp" in err.value.message
    assert sandbox.graph.messages == [] and sandbox.graph.requests == 0

    await relay.stop()
    relay = await start_relay(FALLBACK)
    response = await send(relay, "billing@contoso.com", ["someone-else@example.com"])
    assert response.code == 250
    [got] = sandbox.exchange.messages
    assert got.rcpt_tos == ["someone-else@example.com"] and sandbox.graph.messages == []


def big_message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return MESSAGE + line * (size // len(line))


async def test_over_graphs_limit_is_refused_at_data_or_sent_over_smtp(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    data = big_message(3_200_000)
    assert graph_request_size(len(data)) > GRAPH_REQUEST_LIMIT
    relay = await start_relay(GRAPH)
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await send(relay, "billing@contoso.com", ["customer@example.com"], data)
    assert err.value.code == 552 and "Microsoft Graph" in err.value.message
    assert relay.spool.count(State.DEFERRED) == 0 and sandbox.graph.requests == 0

    await relay.stop()
    relay = await start_relay(FALLBACK)
    response = await send(relay, "billing@contoso.com", ["customer@example.com"], data)
    assert response.code == 250
    [got] = sandbox.exchange.messages
    assert got.data.endswith(data[-1000:]) and sandbox.graph.messages == []


async def test_a_message_just_under_the_limit_goes_over_graph(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    data = big_message(3_000_000)
    relay = await start_relay(GRAPH)
    response = await send(relay, "billing@contoso.com", ["customer@example.com"], data)
    assert response.code == 250
    [got] = sandbox.graph.messages
    assert got.mime.endswith(data[-1000:])


async def test_429_holds_the_whole_mailbox_for_retry_after_and_bounces_nothing(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(GRAPH)
    sandbox.graph.fail_next(429, "ApplicationThrottled",
                            "Application is over its MailboxConcurrency limit.",
                            retry_after=1)
    response = await send(relay, "billing@contoso.com", ["customer@example.com"])
    assert response.code == 250 and "queued as" in response.message
    held = relay.queue.governor.snapshot("relay@contoso.com", time.time())
    assert held["paused_until"] is not None
    # The next message of the mailbox waits behind the pause too, and both arrive.
    response = await send(relay, "billing@contoso.com", ["customer@example.com"])
    assert response.code == 250 and "queued as" in response.message
    await wait_until(lambda: len(sandbox.graph.messages) == 2, within=15)
    assert relay.spool.count(State.FAILED) == 0


async def test_a_refused_token_is_replaced_once(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(GRAPH)
    sandbox.graph.fail_next(401, "InvalidAuthenticationToken",
                            "Access token has expired or is not yet valid.")
    response = await send(relay, "billing@contoso.com", ["customer@example.com"])
    assert response.code == 250 and "delivered as" in response.message
    assert len(sandbox.graph.messages) == 1
    assert graph_token_requests(sandbox) == 2


@pytest.mark.parametrize(("setup", "code", "words"), [
    ("scope", 550, "RBAC for Applications"),
    ("rest", 550, "Exchange Online mailbox"),
    ("role", 550, "Mail.Send application permission"),
])
async def test_setup_problems_are_permanent_and_name_the_fix(
        start_relay: RelayFactory, sandbox: Sandbox, setup: str, code: int,
        words: str) -> None:
    relay = await start_relay(GRAPH)
    if setup == "rest":
        sandbox.graph.rest_disabled.add("relay@contoso.com")
    else:       # no Mail.Send role: only RBAC for Applications, for another mailbox or none
        await regrant(relay, sandbox, ("SMTP.SendAsApp",))
        if setup == "scope":
            sandbox.graph.rbac.add("someone@contoso.com")
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await send(relay, "billing@contoso.com", ["customer@example.com"])
    assert err.value.code == code and words in err.value.message
    assert sandbox.graph.messages == []


async def test_rbac_for_applications_alone_is_enough(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """The least privilege that works: no Mail.Send in the token, the mailbox in the
    app's RBAC scope."""
    relay = await start_relay(GRAPH)
    await regrant(relay, sandbox, ())
    sandbox.graph.rbac.add("relay@contoso.com")
    response = await send(relay, "billing@contoso.com", ["customer@example.com"])
    assert response.code == 250 and len(sandbox.graph.messages) == 1


async def regrant(relay: Relay, sandbox: Sandbox, roles: tuple[str, ...]) -> None:
    """The app's roles in Entra changed; the relay's Graph token is one issued after."""
    provider = relay.tokens.provider("main", graph=True)
    before = await provider.get()
    secret = relay.config.credentials["main"].client_secret
    assert secret is not None and secret.value is not None
    sandbox.entra.add_app("contoso.onmicrosoft.com", "relay-app", secret=secret.value,
                          roles=roles)
    after = await provider.refresh(stale=before)
    assert sandbox.entra.validate_token(after.access_token.reveal())["roles"] == list(roles)


async def test_send_as_refused_by_graph_is_permanent(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"profiles": {"system": {"transport": "graph",
                                                       "sender_policy": "keep"}}})
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await send(relay, "billing@contoso.com", ["customer@example.com"])
    assert err.value.code == 550 and "SendAsDenied" in err.value.message
    assert sandbox.graph.messages == []


def test_graphs_answers_become_replies_the_queue_acts_on() -> None:
    def act(status: int, code: str = "", retry_after: str | None = None) -> Action:
        reply, _ = graph_reply(status, (code, "words"), retry_after, "m@contoso.com")
        return classify(reply).action

    assert act(202) is Action.DELIVERED
    for status in (429, 503, 504, 500, 502, 408, 409):
        assert act(status) is Action.RETRY, status       # nothing transient is bounced
    assert act(401) is Action.AUTH
    assert act(403, "ErrorSendAsDenied") is Action.BOUNCE
    assert act(400, "ErrorMimeContentInvalid") is Action.BOUNCE
    # The app may not use the mailbox: permanent as Graph says, and the profile's setup.
    for status, code in ((403, "ErrorAccessDenied"), (404, "MailboxNotEnabledForRESTAPI")):
        verdict = classify(graph_reply(status, (code, "words"), None, "m@contoso.com")[0])
        assert verdict.action is Action.BOUNCE and verdict.alert
        assert verdict.problem is Problem.LOGIN
    assert graph_reply(429, ("", ""), "7", "m")[1] == 7.0
    assert graph_reply(429, ("", ""), None, "m")[1] == 60.0
    assert graph_reply(503, ("", ""), "999999", "m")[1] == 3600.0
    assert graph_reply(429, ("", ""), "Wed, 21 Oct 2015 07:28:00 GMT", "m")[1] == 1.0


def test_fallback_is_only_for_graph_profiles() -> None:
    with pytest.raises(ConfigError, match=r"profiles\.system\.fallback_to_smtp"):
        build_config({"profiles": {"system": {"fallback_to_smtp": True}}})
    with pytest.raises(ConfigError, match=r"graph\.url"):
        build_config({"graph": {"url": "http://graph.example"}})


async def test_the_graph_token_is_never_logged(
        start_relay: RelayFactory, sandbox: Sandbox,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    relay = await start_relay(GRAPH)
    sandbox.graph.fail_next(401, "InvalidAuthenticationToken", "expired")
    await send(relay, "billing@contoso.com", ["customer@example.com"])
    tokens = sandbox.entra.issued_tokens
    assert tokens
    text = caplog.text
    for token in tokens:
        assert token not in text and token[-40:] not in text
    assert not re.search(r"Bearer [A-Za-z0-9._-]{20,}", text)
    assert base64.b64encode(b"Bearer") not in text.encode()
