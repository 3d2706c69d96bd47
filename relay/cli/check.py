"""``smtp-oauth-relay check``: validate the configuration and exit.

:func:`command` loads the config as the relay would (every secret source read, every file
present) and prints a one-line summary; what is allowed but probably a mistake
(:func:`relay.config.checks.advisories`) follows as warnings on stderr. A config that
cannot be used exits 78 with every problem named by its key (``main`` renders them).
"""

from __future__ import annotations

import argparse
import sys

from relay.cli.common import EX_OK, load
from relay.config.checks import advisories


def command(args: argparse.Namespace) -> int:
    config = load(args)
    print(f"{args.config}: OK — {len(config.profiles)} profile(s), {len(config.users)} user(s), "
          f"{len(config.credentials)} credential(s), "
          f"{len(config.server.listeners)} listener(s)")
    for text in advisories(config):
        print(f"warning: {text}", file=sys.stderr)
    return EX_OK
