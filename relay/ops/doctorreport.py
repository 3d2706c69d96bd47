"""What ``smtp-oauth-relay doctor`` found: one report per profile, one line per step.

- :class:`Status`: a step's outcome (ok, info, warn, fail, skip), :func:`worst` of several;
- :class:`Step`: one checked step (``dns``, ``connect``, ``tls``, ``token``, ``claims``,
  ``login``, ``envelope``, ``send``, ``expiry``) with its detail and, when it is not ok,
  the fix; :func:`skip` for a step not run because one it depends on failed;
- :class:`ProfileReport`: the steps of one profile, with :meth:`~ProfileReport.as_dict`
  (the ``--json`` shape); :func:`failed`: whether any step of any report failed;

The checks (:mod:`relay.ops.doctor`) fill these in; the command line renders them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    OK = "ok"
    INFO = "info"   # nothing wrong, but something could not be checked
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"   # not run: a step it depends on failed


_SEVERITY = {Status.SKIP: 0, Status.OK: 0, Status.INFO: 1, Status.WARN: 2, Status.FAIL: 3}


def worst(statuses: Iterable[Status]) -> Status:
    """The most severe of ``statuses`` (the first of equals; OK when there are none)."""
    return max(statuses, key=_SEVERITY.__getitem__, default=Status.OK)


@dataclass
class Step:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (Status.OK, Status.INFO, Status.WARN)


def skip(name: str, because: str) -> Step:
    return Step(name, Status.SKIP, f"not run: {because}")


@dataclass
class ProfileReport:
    profile: str | None
    mailbox: str | None = None
    credential: str | None = None
    upstream: str | None = None
    steps: list[Step] = field(default_factory=list)
    # The token's oid: the Enterprise application's object id, which Exchange's
    # New-ServicePrincipal and Add-MailboxPermission need (not in the JSON: no step's).
    app_object_id: str | None = None

    @property
    def status(self) -> Status:
        found = worst(s.status for s in self.steps)
        return Status.OK if found in (Status.INFO, Status.SKIP) else found

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "mailbox": self.mailbox,
                "credential": self.credential, "upstream": self.upstream,
                "status": str(self.status),
                "steps": [{"name": s.name, "status": str(s.status), "detail": s.detail,
                           "fix": s.fix} for s in self.steps]}


def failed(reports: list[ProfileReport]) -> bool:
    return any(s.status is Status.FAIL for r in reports for s in r.steps)

