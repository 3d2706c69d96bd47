"""``smtp-oauth-relay init``: set the relay up in one command, asked or scripted.

- :func:`arguments`: its flags (every answer can be given as one, for scripts);
- :func:`command`: ask for what no flag gave, write the config and the client secret
  (:mod:`relay.ops.install`), run ``check`` and ``doctor`` on them, and print what is
  still to do on Microsoft's side with the real ids filled in, then how to start it.

Answers come from the terminal (the secret and passwords without echo), or a line each
from standard input when it is not a terminal; ``--non-interactive`` makes a missing
answer an error instead. The secret is never printed. Exit status: 0 written and every
check passed, 1 written but doctor found a failure, 2 a missing or wrong answer, 67 no
such group, 73 a file exists (``--force`` replaces it) or cannot be written, 77 not
allowed to give the files to the group (run as root), 78 the config failed ``check``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from relay.cli.common import (
    EX_CANTCREAT,
    EX_FAIL,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_USAGE,
    err,
)
from relay.cli.doctor import checklist, render_text
from relay.cli.hashpassword import MIN_LENGTH
from relay.config import CLOUDS, DEFAULT_CONFIG_PATH
from relay.core.passhash import check_hash_format, hash_password
from relay.core.secrets import Secret
from relay.ops import install
from relay.ops.doctoradvice import OBJECT_ID_UNKNOWN, mailbox_grant_commands, smtp_auth_command
from relay.ops.doctorreport import failed

_T = TypeVar("_T")
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant-id", metavar="ID", help="Directory (tenant) ID, or the domain")
    p.add_argument("--client-id", metavar="ID", help="Application (client) ID")
    p.add_argument("--client-secret-stdin", action="store_true",
                   help="read the client secret's Value from the first line of standard input")
    p.add_argument("--private-key", type=Path, metavar="FILE",
                   help="a certificate's PEM private key instead of a client secret")
    p.add_argument("--thumbprint", metavar="HEX", help="the certificate's SHA-1 thumbprint")
    p.add_argument("--public-certificate", type=Path, metavar="FILE",
                   help="the certificate (PEM), instead of --thumbprint")
    p.add_argument("--secret-expires", metavar="YYYY-MM-DD",
                   help="when the secret expires (doctor and /metrics warn ahead)")
    p.add_argument("--cloud", choices=list(CLOUDS), default="global")
    p.add_argument("--mailbox", metavar="ADDRESS", help="the mailbox the mail is sent as")
    p.add_argument("--listen", action="append", metavar="ADDRESS:PORT",
                   help="where applications connect (repeatable; default 127.0.0.1:2525)")
    p.add_argument("--relay-network", action="append", metavar="NETWORK",
                   help="a network that may send without a login, besides this host "
                        "(repeatable)")
    p.add_argument("--user", action="append", metavar="NAME:HASH",
                   help="a local account for AUTH, its hash from hash-password (repeatable)")
    p.add_argument("--group", default=install.SERVICE_GROUP,
                   help=f"the service's group, which may read the config "
                        f"(default {install.SERVICE_GROUP})")
    p.add_argument("--force", action="store_true", help="replace files that exist")
    p.add_argument("--non-interactive", action="store_true",
                   help="ask nothing: a missing answer is an error")
    p.add_argument("--no-doctor", action="store_true",
                   help="do not run doctor (it connects to Entra ID and Exchange Online)")


class _Usage(Exception):
    """A missing or wrong answer (exit 2)."""


class _Ask:
    """Answers from flags, else from the terminal or standard input."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.tty = sys.stdin.isatty()

    def read(self, prompt: str, hidden: bool = False) -> str | None:
        if self.tty:
            try:
                return getpass.getpass(prompt) if hidden else input(prompt)
            except EOFError:
                return None
        # Not a terminal: answers are piped in. Each question is shown once answered, with
        # the answer unless it is hidden, so that the output reads as a transcript.
        line = sys.stdin.readline()
        if not line:
            return None
        answer = line.rstrip("\r\n")
        err(prompt + ("" if hidden else answer))
        return answer

    def value(self, given: str | None, flag: str, prompt: str, check: Callable[[str], _T],
              default: str | None = None, hidden: bool = False) -> _T:
        """The flag's value, else the answer to ``prompt``. Without a ``default`` the
        answer is needed; with one, no questions or no more input means the default."""
        if given is not None:
            try:
                return check(given)
            except ValueError as exc:
                raise _Usage(f"{flag}: {exc}") from None
        if not self.interactive:
            if default is None:
                raise _Usage(f"{flag} is needed (no questions with --non-interactive)")
            return check(default)
        shown = f"{prompt} [{default}]: " if default else f"{prompt}: "
        while True:
            answer = self.read(shown, hidden)
            if answer is None:
                if default is None:
                    raise _Usage(f"no answer for {flag} (standard input ended)")
                return check(default)
            try:
                return check(answer.strip() or default or "")
            except ValueError as exc:
                err(f"  {exc}")


# --- what each answer must look like -------------------------------------------------------

def _tenant(text: str) -> str:
    if _GUID.fullmatch(text) or re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", text):
        return text
    raise ValueError("give the Directory (tenant) ID, a GUID such as "
                     "00000000-0000-0000-0000-000000000000, or the tenant's domain")


def _client(text: str) -> str:
    if _GUID.fullmatch(text):
        return text
    raise ValueError("the Application (client) ID is a GUID such as "
                     "11111111-1111-1111-1111-111111111111")


def _secret(text: str) -> Secret | None:
    if _GUID.fullmatch(text):
        raise ValueError("that is the secret's ID; give its Value (Entra admin center > "
                         "Certificates & secrets, shown once when it is created)")
    return Secret(text) if text else None


def _date(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text) if text else None
    except ValueError:
        raise ValueError(f"give a date as YYYY-MM-DD, not {text!r}") from None


def _file(text: str) -> Path:
    if not text or not Path(text).is_file():
        raise ValueError(f"no such file: {text!r}")
    return Path(text).absolute()


def _thumbprint(text: str) -> str | None:
    if text and not re.fullmatch(r"[0-9A-Fa-f]{40}", text.replace(":", "")):
        raise ValueError("a thumbprint is the certificate's SHA-1: 40 hex digits")
    return text.replace(":", "").upper() or None


def _listeners(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.replace(",", " ").split():
        if item.startswith("["):                       # [::1]:2525
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":") or "2525"
        elif item.count(":") == 1:                     # 127.0.0.1:2525
            host, port = item.split(":")
        else:                                          # 127.0.0.1, ::1
            host, port = item, "2525"
        out.append((install.validate("ip", host), int(install.validate("port", port))))
    if not out:
        raise ValueError("give at least one ADDRESS:PORT")
    return out


def _networks(text: str) -> list[str]:
    return [install.validate("network", n) for n in text.replace(",", " ").split()]


def _user(text: str) -> tuple[str, str]:
    name, sep, hashed = text.partition(":")
    if not sep:
        raise ValueError("give NAME:HASH, the hash from `smtp-oauth-relay hash-password`")
    check_hash_format(hashed)
    return install.validate("name", name), hashed


# --- the questions -------------------------------------------------------------------------

def _answers(args: argparse.Namespace, ask: _Ask) -> install.Answers:
    tenant = ask.value(args.tenant_id, "--tenant-id", "Directory (tenant) ID", _tenant)
    client = ask.value(args.client_id, "--client-id", "Application (client) ID", _client)
    secret: Secret | None = None
    if args.client_secret_stdin:
        secret = ask.value(sys.stdin.readline().strip(), "--client-secret-stdin", "", _secret)
        if secret is None:
            raise _Usage("--client-secret-stdin: standard input gave no secret")
    elif args.private_key is None:
        secret = ask.value(None, "--client-secret-stdin or --private-key",
                           "Client secret Value (hidden; empty to use a certificate)",
                           _secret, hidden=True)
    answers = install.Answers(tenant, client, "", secret=secret, cloud=args.cloud)
    if secret is None:
        answers.private_key = ask.value(None if args.private_key is None else
                                        str(args.private_key), "--private-key",
                                        "Certificate's private key file (PEM)", _file)
        if args.public_certificate is None:
            answers.thumbprint = ask.value(args.thumbprint, "--thumbprint",
                                           "Certificate thumbprint (empty to give the "
                                           "certificate file)", _thumbprint, "")
        if answers.thumbprint is None:
            answers.public_certificate = ask.value(
                None if args.public_certificate is None else str(args.public_certificate),
                "--thumbprint or --public-certificate", "Certificate file (PEM)", _file)
    if secret is not None or args.secret_expires is not None:
        answers.secret_expires = ask.value(
            args.secret_expires, "--secret-expires",
            "Client secret expires on (YYYY-MM-DD, empty if unknown)", _date, "")
    answers.mailbox = ask.value(args.mailbox, "--mailbox", "Mailbox the mail is sent as",
                                lambda t: install.validate("address", t))
    answers.listeners = ask.value(None if args.listen is None else " ".join(args.listen),
                                  "--listen", "Listen on", _listeners, "127.0.0.1:2525")
    answers.relay_networks = ask.value(
        None if args.relay_network is None else " ".join(args.relay_network),
        "--relay-network", "Networks that may send without a login, besides this host",
        _networks, "")
    if args.user is not None:
        answers.users = dict(ask.value(u, "--user", "", _user) for u in args.user)
    else:
        _ask_users(ask, answers)
    return answers


def _ask_users(ask: _Ask, answers: install.Answers) -> None:
    def password(text: str) -> str:
        if len(text) < MIN_LENGTH:
            raise ValueError(f"use a password of at least {MIN_LENGTH} characters")
        return text

    while name := ask.value(None, "--user", "Local account for AUTH (empty: no more)",
                            lambda t: t and install.validate("name", t), ""):
        while True:
            first = ask.value(None, "--user", f"Password for {name}", password, hidden=True)
            if not ask.tty or ask.value(None, "--user", "Again", str, hidden=True) == first:
                break
            err("  the passwords do not match")
        answers.users[name] = hash_password(first)


# --- the command ---------------------------------------------------------------------------

def command(args: argparse.Namespace) -> int:
    config: Path = args.config.absolute()
    try:
        answers = _answers(args, _Ask(not args.non_interactive))
    except _Usage as exc:
        err(f"init: {exc}")
        return EX_USAGE
    files = install.plan(config, answers)
    if (found := install.existing(files)) and not args.force:
        err("init: " + ", ".join(map(str, found)) + " already exist(s); nothing was "
            "written (--force replaces them)")
        return EX_CANTCREAT
    gid = install.group_id(args.group)
    if gid is None:
        err(f"init: there is no group {args.group!r}: create the service's user first "
            "(systemd-sysusers, see the README), or name its group with --group")
        return EX_NOUSER
    try:
        made = install.write(files, gid)
    except PermissionError as exc:
        err(f"init: not allowed to write {exc.filename} or give it to the group "
            f"{args.group} (run init as root): {exc.strerror}")
        return EX_NOPERM
    except OSError as exc:
        err(f"init: cannot write {exc.filename}: {exc.strerror}")
        return EX_CANTCREAT
    if made:
        print(f"created {config.parent} (0750, group {args.group})")
    for f in files:
        print(f"wrote {install.describe(f, args.group)}")
    _warn_unreachable(answers)

    from relay.cli import main  # the very `check` a user runs

    print(f"\n$ smtp-oauth-relay check --config {config}", flush=True)
    if (status := main(["check", "--config", str(config)])) != EX_OK:
        return status
    object_id: str | None = None
    doctor_failed = False
    if args.no_doctor:
        print("\ndoctor: not run (--no-doctor); run `smtp-oauth-relay doctor` to check the "
              "way to Microsoft")
    else:
        print(f"\n$ smtp-oauth-relay doctor --config {config}", flush=True)
        reports = checklist(config, sandbox_dir=Path(args.sandbox_dir) if args.sandbox
                            else None)
        print(render_text(reports))
        doctor_failed = failed(reports)
        object_id = next((r.app_object_id for r in reports if r.app_object_id), None)
    if args.no_doctor or doctor_failed:
        print("\n" + microsoft_steps(answers, object_id))
    print("\n" + start_steps(config, answers))
    return EX_FAIL if doctor_failed else EX_OK


def _warn_unreachable(answers: install.Answers) -> None:
    import ipaddress

    loopback_only = all(ipaddress.ip_address(h).is_loopback for h, _ in answers.listeners)
    if loopback_only and answers.relay_networks:
        err("warning: the relay listens on loopback only, so the networks given cannot "
            "reach it; add --listen ADDRESS:2525 with an address of this host")


def microsoft_steps(answers: install.Answers, object_id: str | None) -> str:
    """What is left to do in Entra ID and Exchange Online, with this setup's ids."""
    oid = object_id or OBJECT_ID_UNKNOWN
    mailbox, client = answers.mailbox, answers.client_id
    lines = ['Still to do on Microsoft\'s side unless done (README "Microsoft-side setup"):',
             f"  step 3: Entra admin center > App registrations > {client} >",
             "          API permissions > Add > Office 365 Exchange Online >",
             "          Application permissions > SMTP.SendAsApp; Grant admin consent",
             "  steps 4 and 5, in Exchange Online PowerShell (Connect-ExchangeOnline):"]
    lines += [f"    {c}" for c in mailbox_grant_commands(client, oid, mailbox)]
    lines.append(f"    {smtp_auth_command(mailbox)}")
    if object_id is None:
        lines += [f"  {OBJECT_ID_UNKNOWN}: Entra admin center > Enterprise",
                  f"  applications > {client} > Object ID (not the app registration's)"]
    lines.append("  Then check again: smtp-oauth-relay doctor")
    return "\n".join(lines)


def start_steps(config: Path, answers: install.Answers) -> str:
    if config != DEFAULT_CONFIG_PATH:
        return ("The shipped systemd unit reads /etc/smtp-oauth-relay/config.yaml; to run "
                f"this config: smtp-oauth-relay run --config {config}")
    lines = ["Start the relay (the unit: README \"Installing for real\"):"]
    if answers.secret is None:
        lines += ["  systemctl edit smtp-oauth-relay   # add: [Service] and LoadCredential= "
                  "(empty):", "  # with a certificate there is no client-secret for the "
                  "unit to load (status=243/CREDENTIALS)"]
    lines += ["  systemctl daemon-reload", "  systemctl enable --now smtp-oauth-relay",
              "  smtp-oauth-relay send-test --to you@example.com"]
    return "\n".join(lines)
