"""The token providers of a configuration: one per credential, kept across reloads.

- :class:`Tokens`: the registry the deliverer asks for a credential's
  :class:`~relay.oauth.provider.TokenProvider`; it starts and stops their background
  refreshers, and on a configuration reload keeps each unchanged credential's provider
  (with its token) while it replaces changed ones and closes removed ones.

Keeping providers across reloads matters: a reload that only touched a listener must not
make every credential fetch a new token, nor leave a delivery in flight without one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from relay.config import Config, Credential
from relay.core.events import NO_HOOKS, Hooks
from relay.oauth.provider import TokenProvider

log = logging.getLogger(__name__)


class Tokens:
    """One :class:`TokenProvider` per configured credential, kept across config reloads;
    a second one, for Microsoft Graph, for each credential that a ``transport: graph``
    profile uses (a token is for one resource)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 hooks: Hooks = NO_HOOKS) -> None:
        self._clock = clock
        self._hooks = hooks
        self._started = False
        self._providers = {name: TokenProvider(name, cred, clock=clock, hooks=hooks)
                           for name, cred in config.credentials.items()}
        self._graph = {name: self._graph_provider(name, config.credentials[name])
                       for name in _graph_credentials(config)}

    def _graph_provider(self, name: str, cred: Credential) -> TokenProvider:
        return TokenProvider(name, cred, clock=self._clock, hooks=self._hooks,
                             scopes=cred.graph_scopes)

    def provider(self, credential_name: str, *, graph: bool = False) -> TokenProvider:
        """The credential's provider for the SMTP upstream, or with ``graph`` for Graph."""
        try:
            return (self._graph if graph else self._providers)[credential_name]
        except KeyError:
            raise KeyError(f"no credential named {credential_name!r}"
                           + (" used by a Graph profile" if graph else "")) from None

    def __iter__(self) -> Any:
        return iter(self._providers.items())

    def start(self) -> None:
        self._started = True
        for provider in (*self._providers.values(), *self._graph.values()):
            provider.start()

    async def aclose(self) -> None:
        providers = [*self._providers.values(), *self._graph.values()]
        self._started = False
        await asyncio.gather(*(p.aclose() for p in providers))

    def update(self, config: Config) -> None:
        """Adopt a reloaded config: unchanged credentials keep their provider and token."""
        old = self._providers
        new: dict[str, TokenProvider] = {}
        for name, cred in config.credentials.items():
            existing = old.get(name)
            if existing is not None and existing.credential == cred:
                new[name] = existing
                continue
            provider = TokenProvider(name, cred, clock=self._clock, hooks=self._hooks)
            if self._started:
                provider.start()
            new[name] = provider
            log.info("credential %s %s", name, "changed" if existing else "added")
        self._providers = new
        for name, provider in old.items():
            if new.get(name) is not provider:
                if name not in new:
                    log.info("credential %s removed", name)
                provider.close()
        old_graph, self._graph = self._graph, {}
        for name in _graph_credentials(config):
            cred = config.credentials[name]
            existing = old_graph.get(name)
            if existing is not None and existing.credential == cred:
                self._graph[name] = existing
                continue
            provider = self._graph_provider(name, cred)
            if self._started:
                provider.start()
            self._graph[name] = provider
        for name, provider in old_graph.items():
            if self._graph.get(name) is not provider:
                provider.close()


def _graph_credentials(config: Config) -> list[str]:
    """The credentials that profiles with ``transport: graph`` use, each once."""
    return sorted({p.credential for p in config.profiles.values()
                   if p.transport == "graph" and p.credential in config.credentials})
