"""``smtp-oauth-relay run [--sandbox]``: run the relay until SIGTERM.

:func:`command` loads the config, sets up logging and hands over to
:meth:`relay.app.Relay.serve`, which owns start-up, reloads (SIGHUP) and shutdown; with
``--sandbox`` the relay runs against local stand-ins for Entra ID and Exchange Online and
prints their banner once it takes mail. A relay that cannot start says why in one line and
exits 78 when the operator must change a setting (the spool), so that systemd does not
restart it in vain (``RestartPreventExitStatus=78``), and 71 (EX_OSERR) when the system
refuses it a resource (a port another program holds), which a restart may find free. 69
stays what it means for every command: Entra ID or Exchange said no.
In sandbox mode ``--smtp-port`` and ``--http-port`` replace the config's ports, and a
port that is taken says how to choose others.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import sys
from pathlib import Path

from relay.cli.common import EX_CONFIG, EX_FAIL, EX_OK, EX_OSERR, EX_USAGE, err, load
from relay.config import Config, load_config
from relay.core.log import setup_logging

log = logging.getLogger("relay.cli")


def _started() -> None:
    """What start-up made (the config, the libraries, TLS contexts, the first tokens)
    lives as long as the relay: moved out of the garbage collector's sight, it is not
    walked again by every full collection (those took 2 % of the CPU per message in
    make bench, half of it gone after this)."""
    gc.collect()
    gc.freeze()


async def _run(args: argparse.Namespace, config: Config) -> int:
    from relay.app import Relay

    if not args.sandbox:
        relay = Relay(config)
        await relay.serve(reload=lambda: load_config(args.config), on_ready=_started)
        return EX_OK

    from relay.sandbox.service import Sandbox

    async with Sandbox(Path(args.sandbox_dir), smtp_port=args.smtp_port,
                       http_port=args.http_port) as sandbox:
        relay = Relay(sandbox.apply(config), on_reload=sandbox.adopt)

        def ready() -> None:
            _started()
            print(sandbox.banner(relay.listening), file=sys.stderr, flush=True)

        await relay.serve(
            reload=lambda: sandbox.rewrite(load_config(args.config, check_secrets=False)),
            on_ready=ready)
    return EX_OK


def command(args: argparse.Namespace) -> int:
    from relay.app import loop_factory
    from relay.spool.locks import SpoolError

    if not args.sandbox and (args.smtp_port is not None or args.http_port is not None):
        err("error: --smtp-port and --http-port are for --sandbox: a relay for real listens "
            "where its config says")
        return EX_USAGE
    config = load(args, sandbox=args.sandbox)
    setup_logging(config.logging.level, config.logging.format)
    try:
        factory = loop_factory(config.server.event_loop)
    except ImportError:
        log.error("cannot start: server.event_loop: uvloop is not installed (pip install "
                  "uvloop, or event_loop: auto to use asyncio's own loop without it)")
        return EX_CONFIG
    log.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_run(args, config))
    except SpoolError as exc:
        # On tmpfs (refused), not writable, ...: the operator must change the directory
        # or spool.*; restarting will not help (systemd: RestartPreventExitStatus=78).
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    except OSError as exc:
        # strerror is the whole sentence (relay.receive.server adds the listener and the
        # fix); str() would lead with "[Errno 98]".
        text = exc.strerror if exc.strerror and exc.filename is None else str(exc)
        if args.sandbox and exc.errno == errno.EADDRINUSE:
            text += _SANDBOX_PORTS
        log.error("cannot start: %s", text)
        return EX_OSERR if exc.errno else EX_FAIL


# A developer's machine often has the sandbox's ports taken (Mailpit's web page is on
# 8025, say): how `make run` is given others.
_SANDBOX_PORTS = ("; in sandbox mode choose free ports with --smtp-port and --http-port "
                  "(make run SMTP_PORT=2526 HTTP_PORT=8026), or another config "
                  "(make run CONFIG=my-config.yaml)")
