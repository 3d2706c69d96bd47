"""The ``smtp-oauth-relay`` command: a thin layer over the package.

Exit codes follow sysexits.h so scripts and systemd can tell failures apart:
0 ok, 1 a check failed (e.g. a warning turned error), 2 usage, 69 service unavailable
(permanent upstream or Entra refusal), 75 temporary failure (try again), 78 configuration
error.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay import __version__
from relay.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from relay.core.log import setup_logging
from relay.core.message import Content, Outbound, new_message_id
from relay.oauth.token import SEND_AS_APP
from relay.ops.testmessage import build_test_message

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 69, 75, 78

log = logging.getLogger("relay.cli")


def _load(args: argparse.Namespace, *, sandbox: bool = False) -> Config:
    return load_config(args.config, check_secrets=not sandbox)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


# --- run ----------------------------------------------------------------------------------

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


def cmd_run(args: argparse.Namespace) -> int:
    from relay.spool.store import SpoolError

    config = _load(args, sandbox=args.sandbox)
    setup_logging(config.logging.level, config.logging.format)
    try:
        return asyncio.run(_run(args, config))
    except SpoolError as exc:
        # On tmpfs (refused), not writable, ...: the operator must change the directory
        # or spool.*; restarting will not help (systemd: RestartPreventExitStatus=78).
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EX_UNAVAILABLE if exc.errno else EX_FAIL


# --- check --------------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"{args.config}: OK — {len(config.profiles)} profile(s), {len(config.users)} user(s), "
          f"{len(config.credentials)} credential(s), "
          f"{len(config.server.listeners)} listener(s)")
    for name, cred in config.credentials.items():
        if cred.client_secret and cred.client_secret.value is not None:
            print(f"warning: credentials.{name}.client_secret is inline in the YAML; "
                  "prefer {env: ...}, {file: ...} or {credential: ...}", file=sys.stderr)
    if config.routing.system_profile is None and not config.routing.rules and not any(
            u.profile for u in config.users.values()):
        print("warning: no routing.system_profile, rules or user profiles: every message "
              "will be refused as unroutable", file=sys.stderr)
    return EX_OK


# --- token --------------------------------------------------------------------------------

def _with_sandbox(args: argparse.Namespace,
                  body: Callable[[Config], Any]) -> Callable[[], Any]:
    """Run ``body(config)`` against the real services, or inside a sandbox when asked."""
    config = _load(args, sandbox=args.sandbox)

    async def runner() -> Any:
        if not args.sandbox:
            return await body(config)
        from relay.sandbox.service import Sandbox

        async with Sandbox(Path(args.sandbox_dir)) as sandbox:
            return await body(sandbox.apply(config))

    return runner


def _pick_credential(config: Config, args: argparse.Namespace) -> str:
    if args.credential:
        if args.credential not in config.credentials:
            raise ConfigError(str(args.config), [(
                "credentials", f"no credential named {args.credential!r}")])
        return args.credential
    profile = args.profile or config.routing.system_profile
    if profile is None and len(config.profiles) == 1:
        profile = next(iter(config.profiles))
    if profile not in config.profiles:
        raise ConfigError(str(args.config), [(
            "profiles", f"no profile named {profile!r}; pass --profile NAME")])
    return config.profiles[profile].credential


async def _token(args: argparse.Namespace, config: Config) -> int:
    from relay.oauth.provider import TokenProvider
    from relay.oauth.token import TokenError

    name = _pick_credential(config, args)
    provider = TokenProvider(name, config.credentials[name])
    try:
        token = await provider.get()
    except TokenError as exc:
        _err(f"error: {exc.message}")
        return EX_TEMPFAIL if exc.transient else EX_UNAVAILABLE
    finally:
        await provider.aclose()
    expires = dt.datetime.fromtimestamp(token.expires_at, dt.UTC)
    info = {
        "credential": name,
        "audience": token.audience,
        "tenant": token.tenant,
        "app_id": token.app_id,
        "roles": list(token.roles),
        "scopes": list(token.scopes),
        "expires_at": expires.isoformat(timespec="seconds"),
        "expires_in": int(token.expires_in()),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key + ':':12} {shown if shown not in ('', None) else '-'}")
    if token.scopes:
        _err("warning: this is a delegated token (it has 'scp'); the relay needs an "
             "application token: use Application permissions, not Delegated")
    if SEND_AS_APP not in token.roles:
        _err(f"warning: the token has no {SEND_AS_APP} role. Add API permission "
             f"'Office 365 Exchange Online > Application permissions > {SEND_AS_APP}' and "
             "grant admin consent — unless the app is authorised through RBAC for "
             "Applications in Exchange, where this role is not in the token")
    return EX_OK


def cmd_token(args: argparse.Namespace) -> int:
    setup_logging("warning")
    return asyncio.run(_with_sandbox(args, lambda c: _token(args, c))())


# --- send-test ------------------------------------------------------------------------------

async def _send_test(args: argparse.Namespace, config: Config) -> int:
    from relay.deliver.deliverer import Deliverer
    from relay.oauth.registry import Tokens

    profile_name = args.profile or config.routing.system_profile
    if profile_name not in config.profiles:
        raise ConfigError(str(args.config), [(
            "profiles", f"no profile named {profile_name!r}; pass --profile NAME")])
    profile = config.profiles[profile_name]
    sender = args.sender or profile.mailbox
    text = build_test_message(sender, args.to, args.subject, config.server.hostname)
    msg = Outbound(id=new_message_id(), profile=profile_name, mail_from=sender,
                   rcpt_tos=[args.to], content=Content.from_bytes(text))
    tokens = Tokens(config)
    try:
        result = await Deliverer(config, tokens).deliver(msg)
    finally:
        await tokens.aclose()
    print(f"{msg.id}: {result.reply}")
    if result.reply.ok:
        return EX_OK
    return EX_TEMPFAIL if result.reply.transient else EX_UNAVAILABLE


def cmd_send_test(args: argparse.Namespace) -> int:
    setup_logging("info")
    return asyncio.run(_with_sandbox(args, lambda c: _send_test(args, c))())


# --- doctor -------------------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from relay.ops import doctor as doctor

    setup_logging("critical")
    for handler in logging.getLogger().handlers:  # the checklist says it all: no log lines
        handler.setLevel(logging.CRITICAL)        # (setup_logging keeps libraries at WARNING)
    reports = asyncio.run(doctor.diagnose(
        args.config, profile=args.profile, send_to=args.send_to, step_timeout=args.timeout,
        sandbox_dir=Path(args.sandbox_dir) if args.sandbox else None))
    print(doctor.render_json(reports) if args.json else doctor.render_text(reports))
    return EX_FAIL if doctor.failed(reports) else EX_OK


# --- hash-password ----------------------------------------------------------------------------

def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.core.passhash import hash_password

    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            _err("error: the passwords do not match")
            return EX_FAIL
    if len(password) < 8:
        _err("error: use a password of at least 8 characters")
        return EX_FAIL
    print(hash_password(password))
    return EX_OK


# --- queue ------------------------------------------------------------------------------------

def _become(uid: int, gid: int) -> None:
    """Drop root for good and take on ``uid`` with its primary and supplementary groups
    (``gid`` alone when the uid has no passwd entry, e.g. a container's numeric uid)."""
    import pwd

    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        os.setgroups([])
        os.setgid(gid)
    else:
        os.initgroups(user.pw_name, user.pw_gid)
        os.setgid(user.pw_gid)
    os.setuid(uid)


def cmd_queue(args: argparse.Namespace) -> int:
    from relay.spool import ctl as queuectl
    from relay.spool.store import Spool, SpoolError

    config = load_config(args.config, check_secrets=False)
    spool = Spool(config.spool.directory)
    if not spool.root.is_dir():
        _err(f"error: no spool at {spool.root} (spool.directory)")
        return EX_CONFIG
    owner, group = spool.root.stat().st_uid, spool.root.stat().st_gid
    acting_as = ""
    if os.geteuid() == 0 and owner != 0:
        # Files root wrote into the spool would be out of the relay's reach (the unit's
        # UMask=0077): act as the spool's owner, as `runuser -u ...` would.
        try:
            _become(owner, group)
        except OSError as exc:
            _err(f"error: cannot act as the spool's owner (uid {owner}): "
                 f"{exc.strerror or exc}")
            return EX_UNAVAILABLE
        acting_as = f" (acting as the spool's owner, uid {owner})"
    try:
        spool.open(on_tmpfs="warn")
    except SpoolError as exc:
        _err(f"error: {exc}{acting_as}")
        return EX_UNAVAILABLE
    action = args.action
    try:
        if action == "list":
            rows = [queuectl.summary(st, e) for st, e in queuectl.iter_entries(spool)]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    print(f"{r['id']}  {r['state']:<8} {r['size']:>9}  {r['received']}  "
                          f"{r['from'] or '<>'} -> {', '.join(r['recipients'])}"
                          + (f"\n    {r['last_reply']}" if r["last_reply"] else ""))
                print(f"-- {len(rows)} message(s)")
            return EX_OK
        if action == "flush":
            try:
                flushed = queuectl.flush(spool)
            except (queuectl.QueueCommandError, OSError) as exc:
                _err(f"error: {exc}")
                temporary = isinstance(exc, queuectl.QueueCommandError) and exc.temporary
                return EX_TEMPFAIL if temporary else EX_FAIL
            if args.json:
                print(json.dumps({"action": action, "done": flushed, "skipped": []}, indent=2))
            else:
                print(f"{len(flushed)} deferred message(s) due now")
            return EX_OK
        if not args.ids:
            _err(f"error: queue {action} needs one or more message ids")
            return EX_USAGE
        done: list[str] = []
        skipped: list[dict[str, Any]] = []
        for mid in args.ids:
            try:
                if action == "show":
                    info = queuectl.show(spool, mid)
                    print(json.dumps(info, indent=2) if args.json else "\n".join(
                        f"{k}: {v}" for k, v in info.items()))
                else:
                    text = getattr(queuectl, action)(spool, mid)
                    if not args.json:
                        print(text)
                done.append(mid)
                continue
            except queuectl.QueueCommandError as exc:
                reason, temporary = str(exc), exc.temporary
            except OSError as exc:
                # Not a race queuectl knows about (permissions, a missing directory): one
                # line naming the message and the file, not a traceback.
                where = f" ({exc.filename})" if exc.filename else ""
                reason = f"{mid}: {exc.strerror or exc}{where}"
                temporary = isinstance(exc, FileNotFoundError)
            _err(f"error: {reason}")
            skipped.append({"id": mid, "reason": reason, "temporary": temporary})
        if args.json and action != "show":
            print(json.dumps({"action": action, "done": done, "skipped": skipped}, indent=2))
        # A mistake (no such message, wrong state) needs the operator; a message that
        # merely changed meanwhile needs only another try.
        if any(not s["temporary"] for s in skipped):
            return EX_FAIL
        return EX_TEMPFAIL if skipped else EX_OK
    finally:
        asyncio.run(spool.close())


# --- parser -------------------------------------------------------------------------------------

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

    p = command("run", cmd_run, "run the relay (SIGTERM stops, SIGHUP reloads the config)")
    sandbox_flag(p)
    command("check", cmd_check, "validate the configuration and exit")
    p = command("token", cmd_token, "acquire a token and show its audience, tenant, roles "
                                    "and expiry")
    p.add_argument("--profile", help="profile whose credential to use (default: system)")
    p.add_argument("--credential", help="credential name (instead of --profile)")
    p.add_argument("--json", action="store_true", help="print JSON")
    sandbox_flag(p)
    p = command("send-test", cmd_send_test, "send one test message through a profile")
    p.add_argument("--profile", help="profile to send through (default: system profile)")
    p.add_argument("--to", required=True, metavar="ADDRESS", help="recipient")
    p.add_argument("--from", dest="sender", metavar="ADDRESS",
                   help="sender (default: the profile's mailbox)")
    p.add_argument("--subject", default="smtp-oauth-relay test message")
    sandbox_flag(p)
    p = command("doctor", cmd_doctor, "check each profile step by step (config, DNS, TCP, "
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
    p = command("queue", cmd_queue, "inspect and manage the queue (works while the relay runs)")
    p.epilog = ("exit status: 0 done, 1 a message is not in the queue or not in a state the "
                "command works on, 75 a message changed while the command ran (try again)")
    p.add_argument("action", choices=["list", "show", "retry", "hold", "release", "delete",
                                      "flush"])
    p.add_argument("ids", nargs="*", metavar="ID", help="message id(s)")
    p.add_argument("--json", action="store_true",
                   help='print JSON; for changes: {"action", "done": [ids], '
                        '"skipped": [{"id", "reason", "temporary"}]}')
    p = command("hash-password", cmd_hash_password,
                "print a password hash for users.<name>.password_hash")
    p.add_argument("--stdin", action="store_true", help="read the password from standard input")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _err(f"configuration error:\n{exc.render()}")
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
