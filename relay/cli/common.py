"""What every command of ``smtp-oauth-relay`` shares.

- the exit codes, after sysexits.h so that scripts and systemd can tell failures apart:
  :data:`EX_OK` 0, :data:`EX_FAIL` 1 (a check failed), :data:`EX_USAGE` 2,
  :data:`EX_UNAVAILABLE` 69 (a permanent refusal by Entra ID or Exchange, or a resource
  that is not there), :data:`EX_OSERR` 71 (the system refused a resource: a port in use),
  :data:`EX_TEMPFAIL` 75 (try again), :data:`EX_CONFIG` 78; and for ``init``,
  :data:`EX_NOUSER` 67, :data:`EX_CANTCREAT` 73, :data:`EX_NOPERM` 77;
- :func:`load`: the configuration named by ``--config``;
- :func:`credentials_beside`: outside systemd, ``{credential: NAME}`` is the file NAME
  beside the config, the file the shipped unit hands over with ``LoadCredential=``;
- :func:`chosen_profile`, :class:`UsageError`: the profile a command works on, or why the
  command line names none the config has (exit 2, listing those it has);
- :func:`with_sandbox`: run a command's body against the real services, or inside the
  local stand-ins with ``--sandbox``;
- :func:`err`, :func:`print_json`: output on stderr, and ``--json`` output on stdout;
- :func:`token_failures_told_elsewhere`: one line per problem when a token cannot be had.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from relay.config import Config, load_config
from relay.config.errors import known
from relay.core.errors import RelayError

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_OSERR, EX_TEMPFAIL, EX_CONFIG = (
    0, 1, 2, 69, 71, 75, 78)
# init: no such group, a file it would write exists (or cannot be made), not allowed to.
EX_NOUSER, EX_CANTCREAT, EX_NOPERM = 67, 73, 77

_T = TypeVar("_T")


def load(args: argparse.Namespace, *, sandbox: bool = False) -> Config:
    """The config at ``args.config``; its secrets are read unless the sandbox replaces them."""
    return load_config(args.config, check_secrets=not sandbox)


class UsageError(RelayError):
    """The command line names what the configuration does not have (exit 2)."""


def chosen_profile(config: Config, name: str | None) -> str:
    """``--profile``, else routing.system_profile, else the only profile there is."""
    if name is None:
        name = config.routing.system_profile
        if name is None and len(config.profiles) == 1:
            name = next(iter(config.profiles))
        if name is None:
            raise UsageError("the config has no routing.system_profile: pass --profile NAME"
                             + known(config.profiles))
    if name not in config.profiles:
        raise UsageError(f"no profile named {name!r}" + known(config.profiles))
    return name


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


def token_failures_told_elsewhere() -> None:
    """Leave out the token provider's own line about a failed fetch.

    In the relay's log that line says when a fetch failed; a command that fetched once
    has the failure said already, by itself (``token``: ``error: ...``) or by the
    deliverer's line naming the profile (``send-test``), and would show it twice.
    """
    logging.getLogger("relay.oauth.provider").addFilter(
        lambda record: record.levelno < logging.ERROR)
