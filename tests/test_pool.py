"""Upstream session reuse against the fake Exchange Online, with tokens from the fake Entra ID.

What matters here: one connection and one AUTH carry many messages; a new token means a
new session; a connection that died while idle never costs a message; the number of
connections per mailbox (idle ones included, as Exchange counts them) stays within the
cap; and a session that saw anything but a clean verdict is never reused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from relay.config import Config
from relay.core.message import Content, Outbound, new_message_id
from relay.deliver.deliverer import Deliverer
from relay.deliver.pool import SessionPool
from relay.deliver.upstream import UpstreamClient
from relay.oauth.provider import TokenProvider
from relay.oauth.registry import Tokens
from relay.sandbox.exchange import FakeExchange
from relay.sandbox.service import SANDBOX_UPSTREAM, Sandbox
from tests.conftest import build_config, wait_until

MAILBOX = "relay@contoso.com"
OTHER = "alice@contoso.com"
BODY = (b"From: Relay <relay@contoso.com>\r\n"
        b"To: someone@example.com\r\n"
        b"Subject: pooled\r\n"
        b"\r\n"
        b"Sent over a reused session.\r\n")


def message(mailbox: str = MAILBOX, rcpt: str = "someone@example.com",
            mail_from: str | None = None) -> Outbound:
    data = BODY.replace(b"relay@contoso.com", mailbox.encode())
    return Outbound(id=new_message_id(), profile="system", mail_from=mail_from or mailbox,
                    rcpt_tos=[rcpt], content=Content.from_bytes(data))


@dataclass
class Env:
    sandbox: Sandbox
    config: Config
    tokens: Tokens
    pools: list[SessionPool]

    @property
    def exchange(self) -> FakeExchange:
        return self.sandbox.exchange

    @property
    def provider(self) -> TokenProvider:
        return self.tokens.provider("main")

    def pool(self, **kw: Any) -> SessionPool:
        upstream = self.config.upstreams[SANDBOX_UPSTREAM].model_copy(update={"timeout": 5})
        pool = SessionPool(UpstreamClient(upstream, "relay.test"), **kw)
        self.pools.append(pool)
        return pool


@pytest.fixture
async def env(sandbox: Sandbox) -> AsyncIterator[Env]:
    config = sandbox.apply(build_config())
    tokens = Tokens(config)
    env = Env(sandbox, config, tokens, [])
    try:
        yield env
    finally:
        for pool in env.pools:
            await pool.close()
        await tokens.aclose()


def count(exchange: FakeExchange, verb: str) -> int:
    return sum(1 for c in exchange.commands if c.split(" ")[0] == verb)


async def kill_server_side(exchange: FakeExchange) -> list[asyncio.Task[None]]:
    """Cut every connection from the server's side, as Exchange's idle timeout or a
    network failure would (the fake has no public switch for idle sessions)."""
    tasks: list[asyncio.Task[None]] = []
    for conn in list(exchange._connections):
        tasks.extend(conn.abort())
    return tasks


# --- reuse ---------------------------------------------------------------------------------

async def test_ten_sequential_messages_use_one_session_and_one_auth(env: Env) -> None:
    pool = env.pool()
    token = await env.provider.get()
    for i in range(10):
        result = await pool.send(message(rcpt=f"r{i}@example.com"), MAILBOX, token)
        assert result.reply.code == 250, result.reply

    ex = env.exchange
    assert len(ex.messages) == 10
    assert [m.rcpt_tos for m in ex.messages] == [[f"r{i}@example.com"] for i in range(10)]
    assert (ex.sessions, ex.auth_ok, count(ex, "AUTH"), count(ex, "STARTTLS")) == (1, 1, 1, 1)
    assert count(ex, "QUIT") == 0 and count(ex, "RSET") == 0   # back to back: no extra trips
    assert (pool.open_sessions(MAILBOX), pool.idle_sessions(MAILBOX)) == (1, 1)

    await pool.close()
    assert count(ex, "QUIT") == 1
    assert pool.open_sessions(MAILBOX) == 0
    await wait_until(lambda: ex.open_sessions == 0)


async def test_token_change_opens_exactly_one_new_session(env: Env) -> None:
    pool = env.pool()
    first = await env.provider.get()
    assert (await pool.send(message(), MAILBOX, first)).reply.ok
    second = await env.provider.refresh(stale=first)
    assert second.access_token != first.access_token
    for _ in range(3):
        assert (await pool.send(message(), MAILBOX, second)).reply.ok

    ex = env.exchange
    assert (ex.sessions, ex.auth_ok) == (2, 2)
    assert len(ex.messages) == 4
    # The old token's idle session was closed, not kept next to the new one.
    await wait_until(lambda: ex.open_sessions == 1 and pool.open_sessions(MAILBOX) == 1)
    assert count(ex, "QUIT") == 1


async def test_idle_session_with_an_old_token_is_not_reused_by_concurrent_callers(
        env: Env) -> None:
    pool = env.pool(max_sessions=2)
    first = await env.provider.get()
    await asyncio.gather(*(pool.send(message(), MAILBOX, first) for _ in range(2)))
    assert pool.idle_sessions(MAILBOX) == 2
    second = await env.provider.refresh(stale=first)
    results = await asyncio.gather(*(pool.send(message(), MAILBOX, second) for _ in range(4)))
    assert all(r.reply.ok for r in results)
    ex = env.exchange
    assert ex.auth_ok == 4          # two per token, never more
    # The old sessions hold their slots until they are closed: never more than the cap.
    assert ex.max_concurrent_sessions == 2
    await wait_until(lambda: ex.open_sessions == 2)


# --- dead connections ----------------------------------------------------------------------

async def test_session_closed_by_upstream_while_idle_is_replaced(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.deliver.pool")
    pool = env.pool()
    token = await env.provider.get()
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    await env.exchange.disconnect_all()
    await asyncio.sleep(0.2)        # the relay notices the closed connection

    result = await pool.send(message(), MAILBOX, token)
    assert result.reply.code == 250, result.reply
    assert len(env.exchange.messages) == 2 and env.exchange.sessions == 2
    assert "closing idle session 1 for relay@contoso.com: closed by the upstream" in caplog.text


async def test_dead_idle_session_found_by_rset_is_replaced(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.deliver.pool")
    pool = env.pool(check_after=0)
    token = await env.provider.get()
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    assert count(env.exchange, "RSET") == 1          # a live session passes the check
    tasks = await kill_server_side(env.exchange)     # no await: the relay has not noticed

    result = await pool.send(message(), MAILBOX, token)
    assert result.reply.code == 250, result.reply
    assert len(env.exchange.messages) == 3 and env.exchange.sessions == 2
    assert "did not answer RSET" in caplog.text
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_unnoticed_dead_session_failing_at_mail_is_retried_on_a_fresh_one(
        env: Env) -> None:
    pool = env.pool()            # used moments ago, so reused without RSET
    token = await env.provider.get()
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    tasks = await kill_server_side(env.exchange)

    result = await pool.send(message(rcpt="second@example.com"), MAILBOX, token)
    assert result.reply.code == 250, result.reply
    assert [m.rcpt_tos for m in env.exchange.messages] == [["someone@example.com"],
                                                           ["second@example.com"]]
    assert env.exchange.sessions == 2
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
async def test_reused_session_dropped_before_data_delivers_once(env: Env, stage: str) -> None:
    pool = env.pool()
    token = await env.provider.get()
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    env.exchange.drop_next(stage)
    result = await pool.send(message(), MAILBOX, token)
    assert result.reply.code == 250, result.reply
    assert len(env.exchange.messages) == 2 and env.exchange.sessions == 2


async def test_drop_during_data_is_not_retried(env: Env) -> None:
    """The upstream may have the message already: a second try could deliver it twice."""
    pool = env.pool()
    token = await env.provider.get()
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    env.exchange.drop_next("data")
    result = await pool.send(message(), MAILBOX, token)
    assert result.reply.code == 451 and "DATA" in result.reply.text
    assert env.exchange.sessions == 1 and pool.open_sessions(MAILBOX) == 0
    assert (await pool.send(message(), MAILBOX, token)).reply.ok   # a new session
    assert env.exchange.sessions == 2


async def test_fresh_session_failing_is_not_retried(env: Env) -> None:
    pool = env.pool()
    token = await env.provider.get()
    env.exchange.drop_next("mail")
    result = await pool.send(message(), MAILBOX, token)
    assert result.reply.code == 451 and env.exchange.sessions == 1
    assert env.exchange.messages == []


# --- limits ----------------------------------------------------------------------------------

async def test_concurrent_sends_never_exceed_max_sessions(env: Env) -> None:
    pool = env.pool(max_sessions=2)
    token = await env.provider.get()
    results = await asyncio.gather(*(pool.send(message(rcpt=f"r{i}@example.com"), MAILBOX,
                                               token) for i in range(12)))
    assert all(r.reply.code == 250 for r in results)
    ex = env.exchange
    assert len(ex.messages) == 12
    assert ex.max_concurrent_sessions == 2 and ex.sessions == 2 and ex.auth_ok == 2
    # Idle connections count at Exchange too: no more are kept than the cap.
    assert (pool.open_sessions(MAILBOX), pool.idle_sessions(MAILBOX)) == (2, 2)


async def test_cap_is_per_mailbox(env: Env) -> None:
    pool = env.pool(max_sessions=1)
    token = await env.provider.get()
    results = await asyncio.gather(*(pool.send(message(box), box, token)
                                     for box in [MAILBOX, OTHER] * 4))
    assert all(r.reply.ok for r in results)
    ex = env.exchange
    assert ex.sessions == 2 and ex.max_concurrent_sessions == 2
    assert sorted({m.mailbox for m in ex.messages}) == [OTHER, MAILBOX]
    assert pool.open_sessions(MAILBOX) == pool.open_sessions(OTHER) == 1


async def test_the_fake_refuses_a_fourth_session_and_the_pool_never_asks_for_one(
        env: Env) -> None:
    """Exchange's limit, enforced by the fake: a fourth logged-in session of a mailbox
    gets 432 4.3.2 at AUTH, and a slot freed by a closed session can be used again.
    The pool at Exchange's cap sends a burst without one refusal."""
    env.exchange.enforce_limits(sessions=3, per_minute=10_000)
    token = await env.provider.get()
    pools = [env.pool(max_sessions=1) for _ in range(4)]
    results = await asyncio.gather(*(pool.send(message(), MAILBOX, token) for pool in pools))
    assert sorted(r.reply.code for r in results) == [250, 250, 250, 432]
    assert env.exchange.limit_refusals == 1
    await pools[0].close()
    await wait_until(lambda: env.exchange.open_sessions <= 2)
    assert (await pools[3].send(message(), MAILBOX, token)).reply.code == 250

    for pool in pools:
        await pool.close()
    await wait_until(lambda: env.exchange.open_sessions == 0)
    refused = env.exchange.limit_refusals
    capped = env.pool(max_sessions=3)
    results = await asyncio.gather(*(capped.send(message(rcpt=f"r{i}@example.com"), MAILBOX,
                                                 token) for i in range(30)))
    assert all(r.reply.code == 250 for r in results)
    assert env.exchange.limit_refusals == refused


async def test_the_fake_refuses_messages_over_the_rate_with_432(env: Env) -> None:
    env.exchange.enforce_limits(sessions=3, per_minute=2)
    token = await env.provider.get()
    pool = env.pool()
    codes = [(await pool.send(message(rcpt=f"r{i}@example.com"), MAILBOX, token)).reply.code
             for i in range(3)]
    assert codes == [250, 250, 432] and env.exchange.limit_refusals == 1
    # Per mailbox: another mailbox has its own minute.
    assert (await pool.send(message(OTHER), OTHER, token)).reply.code == 250


async def test_lowering_the_cap_closes_surplus_idle_sessions(env: Env) -> None:
    pool = env.pool(max_sessions=3)
    token = await env.provider.get()
    await asyncio.gather(*(pool.send(message(), MAILBOX, token) for _ in range(3)))
    assert pool.idle_sessions(MAILBOX) == 3
    pool.configure(max_sessions=1)
    await wait_until(lambda: pool.open_sessions(MAILBOX) == 1)
    await wait_until(lambda: env.exchange.open_sessions == 1)


async def test_idle_timeout_closes_sessions(env: Env) -> None:
    pool = env.pool(idle_timeout=0.3)
    token = await env.provider.get()
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    assert pool.idle_sessions(MAILBOX) == 1
    await wait_until(lambda: env.exchange.open_sessions == 0, 1.5)
    assert count(env.exchange, "QUIT") == 1          # closed politely
    assert pool.open_sessions(MAILBOX) == 0
    assert not pool._boxes                           # nothing kept for a quiet mailbox
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    assert env.exchange.sessions == 2


async def test_message_cap_rotates_the_session(env: Env) -> None:
    pool = env.pool(max_messages=3)
    token = await env.provider.get()
    peak = 0
    for _ in range(7):
        assert (await pool.send(message(), MAILBOX, token)).reply.ok
        peak = max(peak, pool.open_sessions(MAILBOX))
    ex = env.exchange
    assert (ex.sessions, ex.auth_ok, count(ex, "QUIT")) == (3, 3, 2)   # 3 + 3 + 1
    assert peak == 1 and len(ex.messages) == 7
    assert ex.max_concurrent_sessions == 1    # each session closed before the next opened


# --- errors ----------------------------------------------------------------------------------

async def test_transient_reply_closes_the_session(env: Env) -> None:
    pool = env.pool()
    token = await env.provider.get()
    env.exchange.fail_next("mail", 451, "4.3.2 Temporary server error. Please try again later")
    result = await pool.send(message(), MAILBOX, token)
    assert result.reply.code == 451
    assert count(env.exchange, "QUIT") == 1 and pool.open_sessions(MAILBOX) == 0
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    assert env.exchange.sessions == 2


async def test_permanent_verdict_on_a_message_keeps_the_session(env: Env) -> None:
    pool = env.pool()
    token = await env.provider.get()
    denied = await pool.send(message(mail_from="ceo@contoso.com"), MAILBOX, token)
    assert denied.reply.code == 554 and "SendAsDenied" in denied.reply.text
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    assert env.exchange.sessions == 1 and len(env.exchange.messages) == 1


async def test_throttle_reply_gives_back_every_idle_connection(env: Env) -> None:
    pool = env.pool(max_sessions=3)
    token = await env.provider.get()
    await asyncio.gather(*(pool.send(message(), MAILBOX, token) for _ in range(3)))
    assert pool.idle_sessions(MAILBOX) == 3
    env.exchange.fail_next("mail", 432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit "
                                        "exceeded")
    result = await pool.send(message(), MAILBOX, token)
    assert result.reply.code == 432
    await wait_until(lambda: pool.open_sessions(MAILBOX) == 0)
    await wait_until(lambda: env.exchange.open_sessions == 0)


async def test_exception_inside_a_lease_drops_the_session(env: Env) -> None:
    pool = env.pool()
    token = await env.provider.get()
    with pytest.raises(asyncio.CancelledError):
        async with pool.session(MAILBOX, token) as lease:
            assert not lease.reused and lease.session.is_open
            raise asyncio.CancelledError
    assert pool.open_sessions(MAILBOX) == 0
    async with pool.session(MAILBOX, token) as lease:
        assert not lease.reused
        assert (await lease.send_one(message())).reply.ok
    async with pool.session(MAILBOX, token) as lease:
        assert lease.reused
    assert env.exchange.sessions == 2


async def test_waiting_caller_gets_4xx_when_the_pool_closes(env: Env) -> None:
    pool = env.pool(max_sessions=1)
    token = await env.provider.get()
    async with pool.session(MAILBOX, token):
        waiting = asyncio.create_task(pool.send(message(), MAILBOX, token))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        closing = asyncio.create_task(pool.close())
        result = await waiting
        assert result.reply.code == 451 and "being closed" in result.reply.text
    await closing
    assert pool.open_sessions(MAILBOX) == 0
    await wait_until(lambda: env.exchange.open_sessions == 0)


async def test_caller_cancelled_while_waiting_for_a_slot_leaves_no_trace(env: Env) -> None:
    pool = env.pool(max_sessions=1)
    token = await env.provider.get()
    async with pool.session(MAILBOX, token) as lease:
        waiting = asyncio.create_task(pool.send(message(), MAILBOX, token))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (await lease.send_one(message())).reply.ok
    assert (pool.open_sessions(MAILBOX), pool.idle_sessions(MAILBOX)) == (1, 1)
    assert not pool._boxes[MAILBOX].waiters
    assert (await pool.send(message(), MAILBOX, token)).reply.ok
    assert env.exchange.sessions == 1 and len(env.exchange.messages) == 2


async def test_tokens_never_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pool = env.pool(check_after=0, max_messages=2, idle_timeout=0.2)
    first = await env.provider.get()
    for _ in range(3):
        assert (await pool.send(message(), MAILBOX, first)).reply.ok
    second = await env.provider.refresh(stale=first)
    assert (await pool.send(message(), MAILBOX, second)).reply.ok
    await wait_until(lambda: env.exchange.open_sessions == 0)
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "reusing session" in text and "opening session" in text
    for token in env.sandbox.entra.issued_tokens:
        assert token not in text and token[-40:] not in text


# --- the deliverer -----------------------------------------------------------------------------

def deliverer_config(env: Env, overrides: dict[str, Any] | None = None) -> Config:
    config = build_config(overrides)
    return config.model_copy(update={"credentials": env.config.credentials,
                                     "upstreams": env.config.upstreams,
                                     "profiles": {n: p.model_copy(update={"upstream":
                                                                          SANDBOX_UPSTREAM})
                                                  for n, p in config.profiles.items()}})


@pytest.fixture
async def deliverer(env: Env) -> AsyncIterator[Callable[..., Deliverer]]:
    made: list[Deliverer] = []

    def make(overrides: dict[str, Any] | None = None) -> Deliverer:
        d = Deliverer(deliverer_config(env, overrides), env.tokens)
        made.append(d)
        return d

    yield make
    for d in made:
        await d.aclose()


async def test_deliverer_reuses_sessions_and_takes_the_cap_from_config(
        env: Env, deliverer: Callable[..., Deliverer]) -> None:
    d = deliverer({"delivery": {"mailbox_limits": {"max_sessions": 1}}})
    results = await asyncio.gather(*(d.deliver(message(), require_all_recipients=False)
                                     for _ in range(5)))
    assert all(r.reply.code == 250 for r in results)
    ex = env.exchange
    assert (ex.sessions, ex.auth_ok, ex.max_concurrent_sessions) == (1, 1, 1)
    await d.aclose()
    await wait_until(lambda: ex.open_sessions == 0)
    assert count(ex, "QUIT") == 1


async def test_deliverer_update_keeps_unchanged_pools_and_closes_replaced_ones(
        env: Env, deliverer: Callable[..., Deliverer]) -> None:
    d = deliverer()
    assert (await d.deliver(message())).reply.ok
    d.update(deliverer_config(env, {"logging": {"level": "debug"}}))   # upstream unchanged
    assert (await d.deliver(message())).reply.ok
    assert env.exchange.sessions == 1

    changed = env.config.upstreams[SANDBOX_UPSTREAM].model_copy(update={"timeout": 7})
    new = deliverer_config(env).model_copy(update={"upstreams": {SANDBOX_UPSTREAM: changed}})
    d.update(new)
    await wait_until(lambda: env.exchange.open_sessions == 0)   # the old pool was closed
    assert (await d.deliver(message())).reply.ok
    assert env.exchange.sessions == 2 and len(env.exchange.messages) == 3


async def test_deliverer_535_on_a_new_session_refreshes_the_token_once(
        env: Env, deliverer: Callable[..., Deliverer]) -> None:
    d = deliverer()
    assert (await d.deliver(message())).reply.ok
    env.sandbox.entra.revoke_all()
    # An open session stays logged in (Exchange checks the token at AUTH only) ...
    assert (await d.deliver(message())).reply.ok
    assert env.sandbox.entra.token_requests == 1
    # ... a new one presents the revoked token, gets 535, and the deliverer refreshes.
    await env.exchange.disconnect_all()
    await asyncio.sleep(0.1)
    result = await d.deliver(message())
    assert result.reply.code == 250, result.reply
    assert env.sandbox.entra.token_requests == 2
    assert (env.exchange.auth_failed, env.exchange.auth_ok) == (1, 2)

