"""``smtp-oauth-relay queue list|show|retry|hold|release|delete|flush [ID...] [--json]``.

:func:`command` opens the spool (:func:`relay.ops.queueadmin.open_spool`), runs the action
(:mod:`relay.spool.ctl`, :func:`relay.ops.queueadmin.act`) and renders what it did: ``list``
as Postfix's mailq lays it out (operators read it with mailq's habits), ``show`` a field
a line, a change a line per message; or JSON, whose form scripts rely on and which does
not change (``list``: the messages; ``show``: one object per id; changes:
``{"action", "done": [ids], "skipped": [{"id", "reason", "temporary"}]}``). Errors go to
stderr, one line per message, as they happen.

Exit status: 0 done, 1 a message is not in the queue or not in a state the command works
on (the operator must look), 75 a message changed while the command ran (run it again),
2 no ids given, 78 no spool where the config (or, with ``--sandbox``, the sandbox
directory) says, 69 the spool cannot be used.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from relay.cli.common import (
    EX_CONFIG,
    EX_FAIL,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    err,
    print_json,
)
from relay.config import load_config
from relay.ops import queueadmin
from relay.spool import ctl
from relay.spool.store import Spool


def command(args: argparse.Namespace) -> int:
    if args.sandbox:
        # The sandbox's spool is always in its directory: no config is read, so that
        # `make run`'s queue can be looked at without naming `make run`'s config.
        from relay.sandbox.service import spool_directory

        directory = spool_directory(Path(args.sandbox_dir))
        source = "--sandbox-dir; `make run` or `run --sandbox` makes it"
    else:
        directory = load_config(args.config, check_secrets=False).spool.directory
        source = "spool.directory"
    try:
        with queueadmin.open_spool(directory, source) as spool:
            if args.action == "list":
                return _list(spool, args)
            if args.action == "flush":
                return _flush(spool, args)
            if not args.ids:
                err(f"error: queue {args.action} needs one or more message ids")
                return EX_USAGE
            return _per_message(spool, args)
    except queueadmin.NoSpool as exc:
        err(f"error: {exc}")
        return EX_CONFIG
    except queueadmin.SpoolUnavailable as exc:
        err(f"error: {exc}")
        return EX_UNAVAILABLE


def _list(spool: Spool, args: argparse.Namespace) -> int:
    if args.json:
        print_json([ctl.summary(st, e) for st, e in ctl.iter_entries(spool)])
        return EX_OK
    found = sorted(ctl.iter_entries(spool), key=lambda se: (se[1].received_at, se[1].id))
    if not found:
        print("The queue is empty.")
        return EX_OK
    print(_LIST_HEADER)
    for state, entry in found:
        print(_list_block(ctl.detail(state, entry)))
    total = sum(entry.size for _, entry in found)
    print(f"-- {-(-total // 1024)} KiB in {_count(len(found), 'message')}.")
    return EX_OK


# `queue list` as postqueue -p lays it out: id, size, arrival, then the sender; the
# recipients under it, each group after the reason it is waiting for or failed with.
_LIST_HEADER = (f"{'-Queue ID-':<12} {'--Size--':>8} {'---Arrival (UTC)---':<19} "
                f"{'-State--':<8} -Sender/Recipient-------")
_RCPT_INDENT = " " * 51


def _list_block(row: dict[str, Any]) -> str:
    lines = [f"{row['id']:<12} {row['size']:>8} {_when(row['received']):<19} "
             f"{row['state']:<8} {row['from'] or '<>'}"]
    pending = [r for r in row["recipients"]
               if r not in row["delivered"] and r not in row["failed"]]
    groups: dict[str | None, list[str]] = {}
    for rcpt, reply in row["failed"].items():
        groups.setdefault(reply, []).append(rcpt)
    if pending:
        groups.setdefault(row["last_reply"], []).extend(pending)
    for reason, rcpts in groups.items():
        if reason:
            lines.append(f"({reason})")
        lines += [_RCPT_INDENT + rcpt for rcpt in rcpts]
    return "\n".join(lines) + "\n"


def _show_block(info: dict[str, Any]) -> str:
    """One message for `queue show`: a field a line, the recipients with what became of
    each, then the header section indented under ``headers:``."""
    fields = [("id", info["id"]), ("state", info["state"]), ("profile", info["profile"]),
              ("from", info["from"] or "<>")]
    # What the sender policy replaced: which application sent a message sent as the mailbox.
    fields += [(f"original {what}", info[f"original_{what}"]) for what in ("sender", "from")
               if info[f"original_{what}"] is not None]
    fields += [("size", f"{info['size']} bytes"),
               ("received", f"{_when(info['received'])} UTC"),
               ("attempts", str(info["attempts"]))]
    if info["next_attempt"]:
        fields.append(("next attempt", f"{_when(info['next_attempt'])} UTC"))
    fields += [("last reply", info["last_reply"] or "-"), ("client", info["client"] or "-"),
               ("user", info["user"] or "-")]
    for n, rcpt in enumerate(info["recipients"]):
        if rcpt in info["failed"]:
            rcpt += f" (failed: {info['failed'][rcpt]})"
        elif rcpt in info["delivered"]:
            rcpt += " (delivered)"
        fields.append(("" if n else "recipients", rcpt))
    width = max(14, *(len(name) + 2 for name, _ in fields))
    lines = [f"{name + ':' if name else '':<{width}} {value}" for name, value in fields]
    lines.append("headers:")
    lines += ["    " + line for line in info["headers"].splitlines()]
    return "\n".join(lines)


def _when(iso: str) -> str:
    """A time of the JSON output (ISO 8601, UTC) as the text output shows it."""
    return iso.removesuffix("+00:00").replace("T", " ")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _flush(spool: Spool, args: argparse.Namespace) -> int:
    try:
        flushed = ctl.flush(spool)
    except (ctl.QueueCommandError, OSError) as exc:
        err(f"error: {exc}")
        temporary = isinstance(exc, ctl.QueueCommandError) and exc.temporary
        return EX_TEMPFAIL if temporary else EX_FAIL
    if args.json:
        print_json({"action": args.action, "done": flushed, "skipped": []})
    else:
        print(f"{len(flushed)} deferred message(s) due now")
    return EX_OK


def _per_message(spool: Spool, args: argparse.Namespace) -> int:
    done: list[str] = []
    skipped: list[dict[str, Any]] = []
    for outcome in queueadmin.act(spool, args.action, args.ids):
        if not outcome.done:
            err(f"error: {outcome.text}")
            skipped.append({"id": outcome.id, "reason": outcome.text,
                            "temporary": outcome.temporary})
            continue
        if outcome.info is not None:
            if args.json:
                print_json(outcome.info)
            else:
                print(("\n" if done else "") + _show_block(outcome.info))
        elif not args.json:
            print(outcome.text)
        done.append(outcome.id)
    if args.json and args.action != "show":
        print_json({"action": args.action, "done": done, "skipped": skipped})
    # A mistake (no such message, wrong state) needs the operator; a message that
    # merely changed meanwhile needs only another try.
    if any(not s["temporary"] for s in skipped):
        return EX_FAIL
    return EX_TEMPFAIL if skipped else EX_OK
