"""``smtp-oauth-relay run [--sandbox]``: run the relay until SIGTERM.

:func:`command` loads the config, sets up logging and hands over to
:meth:`relay.app.Relay.serve`, which owns start-up, reloads (SIGHUP) and shutdown; with
``--sandbox`` the relay runs against local stand-ins for Entra ID and Exchange Online and
prints their banner once it takes mail. A relay that cannot start says why in one line and
exits 78 when the operator must change a setting (the spool), so that systemd does not
restart it in vain (``RestartPreventExitStatus=78``), and 71 (EX_OSERR) when the system
refuses it a resource (a port another program holds), which a restart may find free. 69
stays what it means for every command: Entra ID or Exchange said no.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from relay.cli.common import EX_CONFIG, EX_FAIL, EX_OK, EX_OSERR, load
from relay.config import Config, load_config
from relay.core.log import setup_logging

log = logging.getLogger("relay.cli")


async def _run(args: argparse.Namespace, config: Config) -> int:
    from relay.app import Relay

    if not args.sandbox:
        relay = Relay(config)
        await relay.serve(reload=lambda: load_config(args.config))
        return EX_OK

    from relay.sandbox.service import Sandbox

    async with Sandbox(Path(args.sandbox_dir)) as sandbox:
        relay = Relay(sandbox.apply(config))

        await relay.serve(
            reload=lambda: sandbox.apply(load_config(args.config, check_secrets=False)),
            on_ready=lambda: print(sandbox.banner(relay.listening), file=sys.stderr,
                                   flush=True))
    return EX_OK


def command(args: argparse.Namespace) -> int:
    from relay.spool.locks import SpoolError

    config = load(args, sandbox=args.sandbox)
    setup_logging(config.logging.level, config.logging.format)
    try:
        return asyncio.run(_run(args, config))
    except SpoolError as exc:
        # On tmpfs (refused), not writable, ...: the operator must change the directory
        # or spool.*; restarting will not help (systemd: RestartPreventExitStatus=78).
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    except OSError as exc:
        # strerror is the whole sentence (relay.receive.server adds the listener and the
        # fix); str() would lead with "[Errno 98]".
        log.error("cannot start: %s", exc.strerror or exc)
        return EX_OSERR if exc.errno else EX_FAIL
