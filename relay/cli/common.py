"""What every command of ``smtp-oauth-relay`` shares.

- the exit codes, after sysexits.h so that scripts and systemd can tell failures apart:
  :data:`EX_OK` 0, :data:`EX_FAIL` 1 (a check failed), :data:`EX_USAGE` 2,
  :data:`EX_UNAVAILABLE` 69 (a permanent refusal by Entra ID or Exchange, or a resource
  that is not there), :data:`EX_TEMPFAIL` 75 (try again), :data:`EX_CONFIG` 78; and for
  ``init``, :data:`EX_NOUSER` 67, :data:`EX_CANTCREAT` 73, :data:`EX_NOPERM` 77;
- :func:`load`: the configuration named by ``--config``;
- :func:`credentials_beside`: outside systemd, ``{credential: NAME}`` is the file NAME
  beside the config, the file the shipped unit hands over with ``LoadCredential=``;
- :func:`with_sandbox`: run a command's body against the real services, or inside the
  local stand-ins with ``--sandbox``;
- :func:`err`, :func:`print_json`: output on stderr, and ``--json`` output on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from relay.config import Config, load_config

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 69, 75, 78
# init: no such group, a file it would write exists (or cannot be made), not allowed to.
EX_NOUSER, EX_CANTCREAT, EX_NOPERM = 67, 73, 77

_T = TypeVar("_T")


def load(args: argparse.Namespace, *, sandbox: bool = False) -> Config:
    """The config at ``args.config``; its secrets are read unless the sandbox replaces them."""
    return load_config(args.config, check_secrets=not sandbox)


def credentials_beside(config: Path) -> None:
    """Read systemd credentials from the config's directory when systemd has not set one.

    The shipped unit hands ``/etc/smtp-oauth-relay/client-secret`` to the service as the
    credential ``client-secret`` (``LoadCredential=``), and the config names it
    ``{credential: client-secret}``. Run by hand (``check``, ``doctor``, ``token``), the
    commands then read the very file the service gets, instead of failing for want of
    $CREDENTIALS_DIRECTORY. Under systemd the variable is set and wins.
    """
    os.environ.setdefault("CREDENTIALS_DIRECTORY", str(config.absolute().parent))


def with_sandbox(args: argparse.Namespace, body: Callable[[Config], Coroutine[Any, Any, _T]],
                 ) -> Callable[[], Coroutine[Any, Any, _T]]:
    """Run ``body(config)`` against the real services, or inside a sandbox when asked."""
    config = load(args, sandbox=args.sandbox)

    async def runner() -> _T:
        if not args.sandbox:
            return await body(config)
        from relay.sandbox.service import Sandbox

        async with Sandbox(Path(args.sandbox_dir)) as sandbox:
            return await body(sandbox.apply(config))

    return runner


def err(text: str) -> None:
    print(text, file=sys.stderr)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))
