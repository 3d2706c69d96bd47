"""``smtp-oauth-relay send-test --to ADDR [--profile P] [--from ADDR]``: one test message.

:func:`command` sends :func:`relay.ops.testmessage.send_test_message` through a profile
(default: the system profile, or the only one), bypassing the queue, and prints the message
id with the upstream's reply. Exit 0 when the upstream took it, 75 on a temporary refusal,
69 on a permanent one, 2 for a profile the config does not have.
"""

from __future__ import annotations

import argparse
import asyncio

from relay.cli.common import (
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    chosen_profile,
    token_failures_told_elsewhere,
    with_sandbox,
)
from relay.config import Config
from relay.core.log import setup_logging
from relay.ops.testmessage import send_test_message


def command(args: argparse.Namespace) -> int:
    setup_logging("info")
    token_failures_told_elsewhere()
    return asyncio.run(with_sandbox(args, lambda c: _send(args, c))())


async def _send(args: argparse.Namespace, config: Config) -> int:
    profile = chosen_profile(config, args.profile)
    message_id, result = await send_test_message(config, profile, args.to,
                                                 sender=args.sender, subject=args.subject)
    print(f"{message_id}: {result.reply}")
    if result.reply.ok:
        return EX_OK
    return EX_TEMPFAIL if result.reply.transient else EX_UNAVAILABLE
