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

from relay.config import Config
from relay.core.events import NO_HOOKS, Hooks
from relay.oauth.provider import TokenProvider

log = logging.getLogger(__name__)


class Tokens:
    """One :class:`TokenProvider` per configured credential, kept across config reloads."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 hooks: Hooks = NO_HOOKS) -> None:
        self._clock = clock
        self._hooks = hooks
        self._started = False
        self._providers = {name: TokenProvider(name, cred, clock=clock, hooks=hooks)
                           for name, cred in config.credentials.items()}

    def provider(self, credential_name: str) -> TokenProvider:
        try:
            return self._providers[credential_name]
        except KeyError:
            raise KeyError(f"no credential named {credential_name!r}") from None

    def __iter__(self) -> Any:
        return iter(self._providers.items())

    def start(self) -> None:
        self._started = True
        for provider in self._providers.values():
            provider.start()

    async def aclose(self) -> None:
        providers = list(self._providers.values())
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
