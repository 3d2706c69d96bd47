"""The relay's lifecycle in process: a refused reload changes nothing, in any stage;
one relay per spool. (Reloads of a real process by SIGHUP are in test_process.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import Relay
from relay.config import Config
from relay.sandbox.service import Sandbox
from relay.spool import SpoolError
from tests.conftest import build_config, wait_until
from tests.test_end_to_end import send


def _one_recipient(config: Config, upstream_ca: Path | None = None) -> Config:
    """``config`` with max_recipients 1 and, if given, another CA file for every upstream.
    (Derived from the running config: the sandbox's credentials stay valid.)"""
    upstreams = {name: up.model_copy(update={"ca_file": upstream_ca or up.ca_file})
                 for name, up in config.upstreams.items()}
    server = config.server.model_copy(update={"max_recipients": 1})
    return config.model_copy(update={"server": server, "upstreams": upstreams})


async def test_reload_refused_by_a_later_stage_leaves_the_earlier_ones_alone(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """The receiver's part of a new config is valid, the deliverer's is not (a CA file that
    exists but holds no certificate): nothing may switch, not even the receiver."""
    relay = Relay(sandbox.apply(build_config()))
    await relay.start()
    try:
        not_pem = tmp_path / "ca.pem"
        not_pem.write_text("this is not a certificate\n")
        running = relay.config
        broken = _one_recipient(running, upstream_ca=not_pem)

        assert relay.reload(lambda: broken) is False
        assert relay.config is running
        # The receiver still takes two recipients (max_recipients is still 500)...
        reply = await send(relay, "app@contoso.com", ["a@example.com", "b@example.com"])
        assert reply.code == 250
        await wait_until(lambda: len(sandbox.exchange.messages) == 1)
        # ...and the deliverer still trusts the sandbox CA: the message went out.
        assert sorted(sandbox.exchange.messages[0].rcpt_tos) == ["a@example.com",
                                                                 "b@example.com"]

        # The same change without the broken CA file is taken, by every stage.
        assert relay.reload(lambda: _one_recipient(running)) is True
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
            await send(relay, "app@contoso.com", ["a@example.com", "b@example.com"])
        assert info.value.code == 452
    finally:
        await relay.stop()


async def test_one_relay_per_spool(sandbox: Sandbox) -> None:
    """A second relay on the same spool would requeue the first one's messages in
    delivery and deliver them twice: it refuses to start, and says who holds the spool."""
    config = sandbox.apply(build_config())
    first = Relay(config)
    await first.start()
    try:
        second = Relay(config)
        with pytest.raises(SpoolError, match=rf"another relay \(pid {os.getpid()}\)"):
            await second.start()
        assert second.listening == []
        reply = await send(first, "app@contoso.com", ["a@example.com"])  # unharmed
        assert reply.code == 250
    finally:
        await first.stop()
    # Stopped (or killed: the kernel drops the lock), the spool is free again.
    again = Relay(config)
    await again.start()
    await again.stop()
