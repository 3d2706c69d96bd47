"""``smtp-oauth-relay example-config [NAME] [--list]``: the files an installation needs.

- :data:`SHIPPED`: every file the package carries (``relay/data/``), by the name the
  command takes, with where it is installed;
- :func:`command`: print one of them byte for byte, or list them;
- :func:`read`: a shipped file's bytes (``init`` and the tests use it too).

A wheel has no source tree beside it, so the documented config and the systemd files
travel inside the package; the top-level ``config.example.yaml`` and ``systemd/`` files of
the source tree are links to the same files, so there is one copy of each to keep.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib import resources

from relay.cli.common import EX_OK


@dataclass(frozen=True)
class Shipped:
    resource: str      # under relay/data/
    installed_as: str  # where the README's install steps put it
    what: str


SHIPPED: dict[str, Shipped] = {
    "config": Shipped("config.example.yaml", "/etc/smtp-oauth-relay/config.yaml",
                      "every setting, with its default and what it does"),
    "systemd-unit": Shipped("smtp-oauth-relay.service",
                            "/etc/systemd/system/smtp-oauth-relay.service",
                            "the service (Type=notify, watchdog, reload, sandboxing)"),
    "sysusers": Shipped("sysusers.conf", "/etc/sysusers.d/smtp-oauth-relay.conf",
                        "the smtp-oauth-relay system user (systemd-sysusers)"),
    "tmpfiles": Shipped("tmpfiles.conf", "/etc/tmpfiles.d/smtp-oauth-relay.conf",
                        "owner and mode of /etc/smtp-oauth-relay (systemd-tmpfiles)"),
}


def read(name: str) -> bytes:
    return (resources.files("relay") / "data" / SHIPPED[name].resource).read_bytes()


def command(args: argparse.Namespace) -> int:
    if args.list:
        width = max(map(len, SHIPPED))
        for name, shipped in SHIPPED.items():
            print(f"{name:<{width}}  {shipped.installed_as}: {shipped.what}")
        return EX_OK
    sys.stdout.flush()
    sys.stdout.buffer.write(read(args.name))
    sys.stdout.buffer.flush()
    return EX_OK
