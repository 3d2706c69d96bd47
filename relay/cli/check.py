"""``smtp-oauth-relay check``: validate the configuration and exit.

:func:`command` loads the config as the relay would (every secret source read, every file
present) and checks that the spool can be written by whoever runs the check (for root: by
the spool's owner, see :mod:`relay.ops.spoolaccess`), then prints a one-line summary; what
is allowed but probably a mistake (:func:`relay.config.checks.advisories`) follows as
warnings on stderr. A config that cannot be used exits 78 with every problem named by its
key (``main`` renders them).
"""

from __future__ import annotations

import argparse

from relay.cli.common import EX_OK, err, load
from relay.config import ConfigError
from relay.config.checks import advisories
from relay.ops.spoolaccess import spool_access


def command(args: argparse.Namespace) -> int:
    config = load(args)
    problems, note = spool_access(config.spool.directory)
    if problems:
        raise ConfigError(str(args.config), [("spool.directory", text) for text in problems])
    print(f"{args.config}: OK — {len(config.profiles)} profile(s), {len(config.users)} user(s), "
          f"{len(config.credentials)} credential(s), "
          f"{len(config.server.listeners)} listener(s)")
    if note:
        err(f"note: {note}")
    for text in advisories(config):
        err(f"warning: {text}")
    return EX_OK
