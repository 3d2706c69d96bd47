"""``smtp-oauth-relay doctor [--profile P] [--send-to ADDR] [--json]``: the setup checklist.

- :func:`command`: run :func:`relay.ops.doctor.diagnose` and print its reports; exit 1 if
  any step failed (warnings alone exit 0); :func:`checklist`: the same run, for ``init``;
- :func:`render_text`, :func:`render_json`: the reports as the checklist a person reads
  (``[FAIL] login ...`` with the fix below it) or as JSON.

The checklist says it all: while it runs, no log lines are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

from relay.cli.common import EX_FAIL, EX_OK
from relay.core.log import setup_logging
from relay.ops.doctorreport import ProfileReport, Status, failed

_LABEL = {Status.OK: "[ OK ]", Status.INFO: "[INFO]", Status.WARN: "[WARN]",
          Status.FAIL: "[FAIL]", Status.SKIP: "[SKIP]"}


def command(args: argparse.Namespace) -> int:
    reports = checklist(args.config, profile=args.profile, send_to=args.send_to,
                        timeout=args.timeout,
                        sandbox_dir=Path(args.sandbox_dir) if args.sandbox else None)
    print(render_json(reports) if args.json else render_text(reports))
    return EX_FAIL if failed(reports) else EX_OK


def checklist(config: Path, *, profile: str | None = None, send_to: str | None = None,
              timeout: float = 10.0, sandbox_dir: Path | None = None) -> list[ProfileReport]:
    """Run the checks without a log line in between (``init`` runs them too)."""
    from relay.ops.doctor import diagnose

    setup_logging("critical")
    for handler in logging.getLogger().handlers:  # the checklist says it all: no log lines
        handler.setLevel(logging.CRITICAL)        # (setup_logging keeps libraries at WARNING)
    return asyncio.run(diagnose(config, profile=profile, send_to=send_to,
                                step_timeout=timeout, sandbox_dir=sandbox_dir))


def render_json(reports: list[ProfileReport]) -> str:
    return json.dumps([r.as_dict() for r in reports], indent=2)


def render_text(reports: list[ProfileReport]) -> str:
    lines: list[str] = []
    for report in reports:
        if report.mailbox is None:  # the config could not be used
            lines.append("configuration" if report.profile is None
                         else f"profile {report.profile}")
        else:
            lines.append(f"profile {report.profile}: {report.mailbox} via {report.upstream} "
                         f"(credential {report.credential})")
        width = max([9, *(len(step.name) for step in report.steps)])
        for step in report.steps:
            detail = step.detail.splitlines() or [""]
            lines.append(f"  {_LABEL[step.status]} {step.name:<{width}} {detail[0]}")
            lines += [f"  {'':6} {'':<{width}} {extra}" for extra in detail[1:]]
            if step.fix and step.status in (Status.FAIL, Status.WARN):
                fix = step.fix.splitlines()
                lines.append(f"{'':9}fix: {fix[0]}")
                lines += [f"{'':14}{extra}" for extra in fix[1:]]
        lines.append("")
    fails = sum(s.status is Status.FAIL for r in reports for s in r.steps)
    warns = sum(s.status is Status.WARN for r in reports for s in r.steps)
    checked = sum(r.mailbox is not None for r in reports)
    if not checked:
        lines.append("the configuration is not usable, so nothing else was checked")
    elif fails:
        lines.append(f"{fails} failure(s), {warns} warning(s) in {checked} profile(s); "
                     "fix the first FAIL of a profile first: later steps depend on it")
    elif warns:
        lines.append(f"no failures, {warns} warning(s) in {checked} profile(s)")
    else:
        lines.append(f"all checks passed for {checked} profile(s)")
    return "\n".join(lines)
