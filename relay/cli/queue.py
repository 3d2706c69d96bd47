"""``smtp-oauth-relay queue list|show|retry|hold|release|delete|flush [ID...] [--json]``.

:func:`command` opens the spool (:func:`relay.ops.queueadmin.open_spool`), runs the action
(:mod:`relay.spool.ctl`, :func:`relay.ops.queueadmin.act`) and renders what it did: a
line per message, or JSON (``list``: the messages; ``show``: one object per id; changes:
``{"action", "done": [ids], "skipped": [{"id", "reason", "temporary"}]}``). Errors go to
stderr, one line per message, as they happen.

Exit status: 0 done, 1 a message is not in the queue or not in a state the command works
on (the operator must look), 75 a message changed while the command ran (run it again),
2 no ids given, 78 no spool where the config says, 69 the spool cannot be used.
"""

from __future__ import annotations

import argparse
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
    config = load_config(args.config, check_secrets=False)
    try:
        with queueadmin.open_spool(config) as spool:
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
    rows = [ctl.summary(st, e) for st, e in ctl.iter_entries(spool)]
    if args.json:
        print_json(rows)
        return EX_OK
    for r in rows:
        print(f"{r['id']}  {r['state']:<8} {r['size']:>9}  {r['received']}  "
              f"{r['from'] or '<>'} -> {', '.join(r['recipients'])}"
              + (f"\n    {r['last_reply']}" if r["last_reply"] else ""))
    print(f"-- {len(rows)} message(s)")
    return EX_OK


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
                print("\n".join(f"{k}: {v}" for k, v in outcome.info.items()))
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
