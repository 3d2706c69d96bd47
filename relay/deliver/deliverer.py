"""The delivery step: one message, one profile, one attempt through the upstream.

- :class:`Deliverer`: :meth:`~Deliverer.deliver` makes one attempt for an
  :class:`~relay.core.message.Outbound` (token, pooled session, one retry with a fresh
  token after a refused login) and returns its :class:`~relay.core.message.DeliveryResult`;
  it keeps one session pool per upstream across reloads (:meth:`~Deliverer.prepare`,
  :meth:`~Deliverer.apply`) and counts the open sessions per mailbox for the metrics.

This is the single place that knows how a profile becomes a token and an upstream
session, and how their failures become an SMTP reply. The receiving side calls it while
the client waits; a durable queue calls the very same method for each (re)try.

Reply classes follow one rule: only the upstream's own permanent rejection of the message
is permanent. Everything about our side — the token endpoint, the login, the network —
is transient (4xx), so a legacy app keeps the message and tries again instead of
dropping it. A rejected login in particular is never a reason to bounce mail.

Being the one place that sees how an attempt's login went, it also reports what each
attempt showed about the profile's setup (login refused or accepted, SendAsDenied) to
the :class:`~relay.core.events.Hooks`, from which readiness per profile is judged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from relay.config import Config, Profile, Upstream
from relay.core.events import NO_HOOKS, Hooks
from relay.core.graphsize import NO_FALLBACK
from relay.core.message import DeliveryResult, Outbound
from relay.core.reply import Reply
from relay.deliver.classify import Problem, classify
from relay.deliver.failures import AuthenticationRejected
from relay.deliver.graph import GraphClient, Prepared
from relay.deliver.pool import SessionPool
from relay.deliver.session import HasAccessToken, OnAccepted
from relay.deliver.upstream import UpstreamClient
from relay.oauth.password import SecretSource
from relay.oauth.registry import Tokens
from relay.oauth.token import TokenError

log = logging.getLogger(__name__)

_Send = Callable[[Any], Awaitable[DeliveryResult]]


class _Source(Protocol):
    """Where a send's credential comes from: an OAuth token provider, or (ACS) the client
    secret itself (relay.oauth.password)."""

    async def get(self) -> Any: ...

    async def refresh(self, stale: Any = None) -> Any: ...


# What prepare() builds for apply(): the SMTP session pools and the Graph clients.
Built = tuple[dict[tuple[str, str], SessionPool], dict[str, GraphClient]]


class Deliverer:
    """Turns an :class:`Outbound` into an upstream delivery for its profile.

    Upstream clients are made once per upstream (they hold the TLS context), each with a
    :class:`SessionPool` that keeps its sessions open between messages; token providers
    come from the shared :class:`Tokens` registry, one per credential.
    """

    def __init__(self, config: Config, tokens: Tokens, *, hooks: Hooks = NO_HOOKS) -> None:
        self._tokens = tokens
        self._hooks = hooks
        self._config = config
        self._pools: dict[tuple[str, str], SessionPool] = {}
        self._by_profile: dict[str, SessionPool] = {}   # the pool each profile uses
        self._graphs: dict[str, GraphClient] = {}
        self._secrets: dict[str, SecretSource] = {}
        self._graph_by_profile: dict[str, GraphClient] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.update(config)

    def update(self, config: Config) -> None:
        """Use a new config (:meth:`prepare` and :meth:`apply` in one step)."""
        self.apply(config, self.prepare(config))

    def prepare(self, config: Config) -> Built:
        """Everything for ``config`` that can fail (a CA file), changing nothing yet, so
        that a reload can check every stage before it switches any of them.

        Upstream clients whose settings did not change are reused, with their open
        sessions; pools for new settings are built but hold no session yet, so an
        unused result needs no cleanup.
        """
        pools: dict[tuple[str, str], SessionPool] = {}
        graphs: dict[str, GraphClient] = {}
        for profile in config.profiles.values():
            key = _pool_key(config, profile)
            if key not in pools:
                upstream = config.upstream_for(profile)
                pools[key] = self._pools.get(key) or SessionPool(
                    UpstreamClient(upstream, key[1]),
                    max_sessions=_max_sessions(config, upstream))
            if profile.transport == "graph":
                gkey = _graph_key(config, profile)
                if gkey not in graphs:
                    graphs[gkey] = self._graphs.get(gkey) or GraphClient(
                        config.graph_url_for(profile), config.graph)
        return pools, graphs

    def apply(self, config: Config, prepared: Built) -> None:
        """Switch to what :meth:`prepare` built. Pools of changed or removed upstreams are
        closed (their lent-out sessions when the attempt using them ends)."""
        pools, graphs = prepared
        old, self._config, self._pools = self._pools, config, pools
        self._by_profile = {name: pools[_pool_key(config, profile)]
                            for name, profile in config.profiles.items()}
        old_graphs, self._graphs = self._graphs, graphs
        self._graph_by_profile = {name: graphs[_graph_key(config, profile)]
                                  for name, profile in config.profiles.items()
                                  if profile.transport == "graph"}
        for gkey, graph in old_graphs.items():
            if graphs.get(gkey) is not graph:
                graph.close()
        for pool in pools.values():
            pool.configure(max_sessions=_max_sessions(config, pool.client.upstream))
        for key, pool in old.items():
            if pools.get(key) is not pool:
                self._retire(pool)

    def _retire(self, pool: SessionPool) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:      # no loop, so no session was ever opened in this one
            return
        task = loop.create_task(pool.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        """Close every upstream session (QUIT); at shutdown, after the queue stopped."""
        await asyncio.gather(*(pool.close() for pool in self._pools.values()), *self._retiring,
                             return_exceptions=True)
        for graph in self._graphs.values():
            graph.close()

    def upstream_sessions(self) -> dict[str, int]:
        """Open upstream sessions per configured mailbox (what Exchange counts), for metrics."""
        out: dict[str, int] = {}
        seen: set[tuple[int, str]] = set()
        for name, profile in self._config.profiles.items():
            pool = self._by_profile[name]
            mailbox = profile.mailbox.lower()
            if (id(pool), mailbox) not in seen:
                seen.add((id(pool), mailbox))
                out[mailbox] = out.get(mailbox, 0) + pool.open_sessions(mailbox)
        return out

    async def deliver(self, msg: Outbound, *, require_all_recipients: bool = True,
                      on_accepted: OnAccepted | None = None) -> DeliveryResult:
        """One attempt for ``msg``; ``on_accepted``: see UpstreamSession.send_one."""
        profile = self._config.profiles.get(msg.profile)
        if profile is None:
            return DeliveryResult(Reply(451, f"4.3.5 Profile {msg.profile} is no longer "
                                             "configured; message kept for retry"),
                                  offered=False)
        mailbox = msg.mailbox or profile.mailbox
        if profile.transport == "graph":
            graph = self._graph_by_profile[msg.profile]
            async with graph.slots:
                prepared = await graph.prepare(msg)
                if isinstance(prepared, Prepared):
                    send: _Send = functools.partial(self._send_graph, graph, prepared,
                                                    mailbox, on_accepted)
                    return await self._with_token(
                        msg, profile, mailbox,
                        self._tokens.provider(profile.credential, graph=True), send)
            if not profile.fallback_to_smtp:
                # Not offered: Graph counted nothing, nor do the mailbox's limits.
                return DeliveryResult(Reply(prepared.code, prepared.text + NO_FALLBACK),
                                      offered=False)
            log.info("message %s goes over SMTP instead of Microsoft Graph: %s", msg.id,
                     prepared.text, extra={"profile": msg.profile, "mailbox": mailbox})
        pool = self._by_profile[msg.profile]
        send = functools.partial(pool.send, msg, mailbox,
                                 require_all_recipients=require_all_recipients,
                                 on_accepted=on_accepted)
        source: _Source = (self._secret_source(profile)
                           if pool.client.upstream.service == "acs"
                           else self._tokens.provider(profile.credential))
        return await self._with_token(msg, profile, mailbox, source, send)

    def _secret_source(self, profile: Profile) -> SecretSource:
        """ACS logs in with the client secret itself: one source per credential."""
        source = self._secrets.get(profile.credential)
        cred = self._config.credentials[profile.credential]
        if source is None or source.credential != cred:
            source = self._secrets[profile.credential] = SecretSource(profile.credential,
                                                                      cred)
        return source

    @staticmethod
    async def _send_graph(graph: GraphClient, prepared: Prepared, mailbox: str,
                          on_accepted: OnAccepted | None,
                          token: HasAccessToken) -> DeliveryResult:
        result = await graph.send(prepared, mailbox, token)
        if result.reply.ok and on_accepted is not None:
            try:
                on_accepted(result.accepted)
            except Exception:
                log.exception("recording an accepted message failed")
        return result

    async def _with_token(self, msg: Outbound, profile: Profile, mailbox: str,
                          provider: _Source, send: _Send) -> DeliveryResult:
        """``send`` with the provider's token; once more with a fresh one if the upstream
        refused the login."""
        started = time.monotonic()
        try:
            token = await provider.get()
        except TokenError as exc:
            return self._token_failure(msg, profile, exc)
        try:
            result = await send(token)
        except AuthenticationRejected as first:
            log.warning("upstream rejected the token for %s (%s); fetching a new token and "
                        "retrying once", mailbox, first.reply,
                        extra={"profile": msg.profile, "mailbox": mailbox,
                               "credential": profile.credential, "reply": str(first.reply)})
        else:
            return self._observe(msg, mailbox, result)
        try:
            token = await provider.refresh(stale=token)
        except TokenError as exc:
            return self._token_failure(msg, profile, exc)
        try:
            result = await send(token)
        except AuthenticationRejected as second:
            duration = time.monotonic() - started
            log.error("upstream rejected a fresh token for mailbox %s (profile %s): %s — %s "
                      "[%.1f s]", mailbox, msg.profile, second.reply,
                      classify(second.reply).explanation, duration,
                      extra={"profile": msg.profile, "mailbox": mailbox,
                             "credential": profile.credential, "reply": str(second.reply),
                             "duration": round(duration, 3)})
            try:
                self._hooks.login_refused(msg.profile, mailbox, second.reply,
                                          fresh_token=True)
            except Exception:
                log.exception("reporting the refused login failed")
            return DeliveryResult(Reply(
                451, f"4.7.0 Upstream refused the relay's login for {mailbox}: "
                     f"{second.reply}; message not sent, try again later"))
        return self._observe(msg, mailbox, result)

    def _observe(self, msg: Outbound, mailbox: str, result: DeliveryResult) -> DeliveryResult:
        """Report what an attempt that reached the upstream showed about the profile's
        setup, and return ``result``. The overall reply and every recipient's are looked
        at: Exchange may refuse the login at AUTH (430 4.2.0) or say mid-session that the
        relay is not authenticated (530 5.7.57), and SendAs is refused after DATA or at
        MAIL FROM (5.7.60).

        A message no client handed over (``client`` empty: a delivery report the relay
        wrote) is sent as the mailbox itself, which Exchange always allows: its delivery
        says nothing about the applications' senders, so it does not count as one.
        Otherwise every SendAsDenied would be followed by its own delivered report.

        Bookkeeping only: whatever goes wrong here is logged and the result still
        returned, since losing it could send a delivered message again."""
        try:
            self._report(msg, mailbox, result)
        except Exception:
            log.exception("reporting the outcome of the attempt failed")
        return result

    def _report(self, msg: Outbound, mailbox: str, result: DeliveryResult) -> None:
        profile = msg.profile
        found: dict[Problem, Reply] = {}
        seen: set[str] = set()
        for reply in (result.reply, *result.refused.values()):
            if str(reply) in seen:
                continue
            seen.add(str(reply))
            problem = classify(reply).problem
            if problem is not None:
                found.setdefault(problem, reply)
        if (login := found.get(Problem.LOGIN)) is not None:
            self._hooks.login_refused(profile, mailbox, login, fresh_token=False)
        elif result.authenticated:
            delivered = result.reply.ok and bool(result.accepted) and bool(msg.client)
            self._hooks.logged_in(profile, mailbox, delivered=delivered)
        if (send_as := found.get(Problem.SEND_AS)) is not None:
            self._hooks.send_as_denied(profile, mailbox, send_as)

    def _token_failure(self, msg: Outbound, profile: Profile,
                       exc: TokenError) -> DeliveryResult:
        log.error("no OAuth token for credential %s (profile %s): %s",
                  profile.credential, msg.profile, exc.message,
                  extra={"profile": msg.profile, "credential": profile.credential,
                         "mailbox": msg.mailbox or profile.mailbox})
        if self._config.credentials[profile.credential].delegated is not None \
                and not exc.transient:
            try:
                self._hooks.sign_in_needed(msg.profile, exc.message)
            except Exception:
                log.exception("reporting the failed sign-in failed")
        return DeliveryResult(Reply(
            451, f"4.7.0 Relay cannot obtain an OAuth token for profile {msg.profile} "
                 "(see the relay's log); try again later"), offered=False)


def _max_sessions(config: Config, upstream: Upstream) -> int:
    """Sessions per mailbox: the upstream's own limit (HVE, ACS), else Exchange's."""
    limits = upstream.limits or config.delivery.mailbox_limits
    return limits.max_sessions


def _graph_key(config: Config, profile: Profile) -> str:
    """Profiles share a Graph client when its endpoint and settings are the same."""
    return config.graph_url_for(profile) + " " + config.graph.model_dump_json()


def _pool_key(config: Config, profile: Profile) -> tuple[str, str]:
    """Profiles share a pool when their upstream settings and HELO name are the same."""
    upstream = config.upstream_for(profile)
    return upstream.model_dump_json(), upstream.helo_name or config.server.hostname
