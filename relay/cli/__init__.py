"""The ``smtp-oauth-relay`` command: a thin layer over the package.

- :func:`main`: the console script (``smtp-oauth-relay``, ``python -m relay``): parse the
  arguments, run the command, turn a :class:`relay.config.ConfigError` into its message
  and exit status 78, a :class:`relay.cli.common.UsageError` into its line and 2;
- :func:`build_parser`: every command's arguments.

One module per command, each only parsing what it was given, calling into the package
and rendering the result (text, or JSON with ``--json``): :mod:`~relay.cli.run`,
:mod:`~relay.cli.check`, :mod:`~relay.cli.token`, :mod:`~relay.cli.sendtest`,
:mod:`~relay.cli.doctor`, :mod:`~relay.cli.queue`, :mod:`~relay.cli.hashpassword`,
:mod:`~relay.cli.exampleconfig`, :mod:`~relay.cli.init`; what
they share (the exit codes, loading the config, ``--sandbox``) is in
:mod:`~relay.cli.common`. Exit codes follow sysexits.h so scripts and systemd can tell
failures apart: 0 ok, 1 a check failed (e.g. a warning turned error), 2 usage, 69 service
unavailable (permanent upstream or Entra refusal), 71 the system refused a resource (a port
in use), 75 temporary failure (try again), 78 configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from relay import __version__
from relay.cli import (
    authorize,
    check,
    doctor,
    exampleconfig,
    hashpassword,
    init,
    queue,
    run,
    sendmail,
    sendtest,
    token,
)
from relay.cli.common import EX_CONFIG, EX_USAGE, UsageError, credentials_beside, err
from relay.config import DEFAULT_CONFIG_PATH, ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-oauth-relay",
        description="SMTP relay for legacy applications that delivers through Exchange Online "
                    "with OAuth 2.0 (XOAUTH2).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int],
                help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="PATH",
                       help=f"configuration file (default: {DEFAULT_CONFIG_PATH})")
        p.set_defaults(func=func)
        return p

    def sandbox_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sandbox", action="store_true",
                       help="use local stand-ins for Entra ID and Exchange Online "
                            "(no Microsoft account needed; nothing leaves this machine)")
        p.add_argument("--sandbox-dir", default=".sandbox", metavar="DIR",
                       help="where the sandbox keeps its CA and delivered mail (default .sandbox)")

    p = command("run", run.command, "run the relay (SIGTERM stops, SIGHUP reloads the config)")
    sandbox_flag(p)
    for what, where in (("smtp", "the first listener's port (server.listeners)"),
                        ("http", "the HTTP endpoint's port (http.port)")):
        p.add_argument(f"--{what}-port", type=_port, metavar="PORT",
                       help=f"sandbox mode: use PORT for {where} instead of the config's")
    command("check", check.command, "validate the configuration and exit")
    p = command("token", token.command, "acquire a token and show its audience, tenant, roles "
                                    "and expiry")
    p.add_argument("--profile", help="profile whose credential to use (default: the system "
                                     "profile, or the only one)")
    p.add_argument("--credential", help="credential name (instead of --profile)")
    p.add_argument("--json", action="store_true", help="print JSON")
    sandbox_flag(p)
    p = command("send-test", sendtest.command, "send one test message through a profile")
    p.add_argument("--profile", help="profile to send through (default: the system profile, "
                                     "or the only one)")
    p.add_argument("--to", required=True, metavar="ADDRESS", help="recipient")
    p.add_argument("--from", dest="sender", metavar="ADDRESS",
                   help="sender (default: the profile's mailbox)")
    p.add_argument("--subject", default="smtp-oauth-relay test message")
    sandbox_flag(p)
    p = command("doctor", doctor.command, "check each profile step by step (config, DNS, TCP, "
                                      "TLS, token, login, MAIL/RCPT) and say how to fix "
                                      "what fails; exit 1 on any failure")
    p.add_argument("--profile", help="check only this profile (default: every profile)")
    p.add_argument("--send-to", metavar="ADDRESS",
                   help="also send one real test message to ADDRESS through each "
                        "profile checked")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="network timeout for each step (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    sandbox_flag(p)
    p = command("queue", queue.command, "inspect and manage the queue (works while the relay runs)")
    p.epilog = ("exit status: 0 done, 1 a message is not in the queue or not in a state the "
                "command works on, 75 a message changed while the command ran (try again)")
    p.add_argument("action", choices=["list", "show", "retry", "hold", "release", "delete",
                                      "flush"])
    p.add_argument("ids", nargs="*", metavar="ID", help="message id(s), in any case")
    p.add_argument("--json", action="store_true",
                   help='print JSON; for changes: {"action", "done": [ids], '
                        '"skipped": [{"id", "reason", "temporary"}]}')
    p.add_argument("--sandbox", action="store_true",
                   help="the queue of the relay in sandbox mode (`make run`), in "
                        "--sandbox-dir; no config is read")
    p.add_argument("--sandbox-dir", default=".sandbox", metavar="DIR",
                   help="the sandbox directory (default .sandbox)")
    p = command("authorize", authorize.command,
                "sign a user in once (device-code flow) for a credential with delegated "
                "permissions; the refresh token is kept encrypted")
    authorize.arguments(p)
    p = command("hash-password", hashpassword.command,
                "print a password hash for users.<name>.password_hash")
    p.add_argument("--stdin", action="store_true", help="read the password from standard input")
    p = command("init", init.command, "set the relay up: ask for the Entra ID app, the "
                "mailbox and who may send, write the config and the client secret, run "
                "check and doctor, and print what is left to do")
    init.arguments(p)
    sandbox_flag(p)
    p = sub.add_parser("example-config", help="print the documented config or a systemd file "
                                              "the package ships",
                       description="print a file the package ships, byte for byte: the "
                                   "documented config (default) or a systemd file")
    p.add_argument("name", nargs="?", default="config", choices=list(exampleconfig.SHIPPED),
                   help="which file (default: config)")
    p.add_argument("--list", action="store_true",
                   help="list the files and where each is installed")
    p.set_defaults(func=exampleconfig.command)
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    # sendmail's command line is not argparse's (-oi, -fADDR): its own parser, also when
    # this program is installed under the name sendmail.
    if argv is None and Path(sys.argv[0]).name == "sendmail":
        return sendmail.main(sys.argv[1:])
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:
        return sendmail.main(argv[1:])
    args = build_parser().parse_args(argv)
    if isinstance(getattr(args, "config", None), Path):
        credentials_beside(args.config)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        err(f"configuration error:\n{exc.render()}")
        return EX_CONFIG
    except UsageError as exc:
        err(f"error: {exc}")
        return EX_USAGE
    except KeyboardInterrupt:
        return 130
