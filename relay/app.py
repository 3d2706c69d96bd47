"""The running relay: owns start-up, signals and shutdown of all the stages.

receive (SMTP server) -> route + policy -> deliver (token + upstream). One object holds
them so that start, stop and reload happen in one place and in the right order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from relay.config import Config, ConfigError
from relay.deliver import Deliverer
from relay.message import Outbound, Reply
from relay.passwords import PasswordVerifier
from relay.receive import Receiver
from relay.route import Router
from relay.tokens import Tokens

log = logging.getLogger(__name__)

# How long a SIGTERM waits for transactions in flight before closing them.
SHUTDOWN_GRACE = 30.0


class Relay:
    """All stages of one relay process, built from one :class:`Config`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokens = Tokens(config)
        self.deliverer = Deliverer(config, self.tokens)
        self.verifier = PasswordVerifier({n: u.password_hash for n, u in config.users.items()})
        self.receiver = Receiver(config, router=Router(config), verifier=self.verifier,
                                 submit=self.submit)
        self._stopping = asyncio.Event()
        self._listener_sync: asyncio.Future[None] | None = None

    async def submit(self, msg: Outbound) -> Reply:
        """Hand an accepted message on. Today: deliver while the client waits."""
        result = await self.deliverer.deliver(msg)
        if result.reply.ok:
            return Reply(250, f"2.0.0 Ok: delivered as {msg.id}")
        return result.reply

    @property
    def listening(self) -> list[tuple[str, int]]:
        return list(self.receiver.bound)

    async def start(self) -> None:
        self.tokens.start()
        await self.receiver.start()
        log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in self.listening))

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting (new clients get 421), let transactions in flight finish."""
        await self.receiver.stop(grace=grace)
        await self.tokens.aclose()

    def request_stop(self) -> None:
        self._stopping.set()

    def reload(self, load: Callable[[], Config]) -> bool:
        """Swap in a new config; a broken one is logged and the running one kept.

        Everything that can fail (YAML, validation, TLS certificate, CA files) is tried
        before anything is changed, so a failed reload leaves the relay exactly as it was.
        Open client connections and the listeners that did not change are kept.
        """
        try:
            config = load()
            self.receiver.update(config, Router(config), self.verifier)
            self.deliverer.update(config)
        except (ConfigError, ValueError, OSError) as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            return False
        self.tokens.update(config)
        self.verifier.update({n: u.password_hash for n, u in config.users.items()})
        if config.server.listeners != self.config.server.listeners:
            self._listener_sync = asyncio.ensure_future(self.receiver.sync_listeners())
        self.config = config
        log.info("configuration reloaded")
        return True

    async def serve(self, reload: Callable[[], Config] | None = None,
                    on_ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config when ``reload`` is given.

        ``on_ready`` runs once every listener accepts connections (banner, readiness).
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: self.reload(reload))
        else:
            loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
                "SIGHUP ignored: this instance cannot reload its configuration"))
        try:
            await self.start()
            if on_ready is not None:
                on_ready()
            await self._stopping.wait()
            log.info("stopping")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop(grace=SHUTDOWN_GRACE)


def config_loader(path: Path) -> Callable[[], Config]:
    from relay.config import load_config

    return lambda: load_config(path)
