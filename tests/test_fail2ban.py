"""The fail2ban filter in deploy/fail2ban/ against the relay's real log.

A relay process is driven over SMTP from IPv4 and IPv6 loopback into every kind of line the
filter is for (failed AUTH, the lockouts, relay access denied) and some it must leave alone
(a successful login, a delivered message). Its stderr, in the text and the JSON format, is
then handed to ``fail2ban-regex`` with the filter file as shipped: each client address must
come out as often as it misbehaved, with the line's time read as UTC.
"""

from __future__ import annotations

import base64
import collections
import json
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.core.passhash import hash_password
from tests.relayproc import ROOT, Harness, RelayProcess, harness, send_on
from tests.test_receive import ipv6_available

FILTER = ROOT / "deploy" / "fail2ban" / "filter.d" / "smtp-oauth-relay.conf"
PASSWORD = "app-password-31"
WRONG = "Wr0ng-guess-4711"
# A row of `fail2ban-regex -o row`: ['192.0.2.1',	1736244001,	{...}],
ROW = re.compile(r"^\['([^']+)',\s+(\d+(?:\.\d+)?),")

pytestmark = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None,
    reason="fail2ban is not installed (apt-get install fail2ban; .ci/run does)")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    listeners: list[dict[str, Any]] = [{"address": "127.0.0.1", "port": 0}]
    if ipv6_available():
        listeners.append({"address": "::1", "port": 0})
    overrides = {
        "server": {"listeners": listeners, "relay_networks": ["192.0.2.0/24"],
                   "auth_throttle": {"delay": "10ms", "max_delay": "20ms",
                                     "lockout_after": 3}},
        "users": {"app": {"password_hash": hash_password(PASSWORD, ln=10)}},
    }
    with harness(tmp_path, overrides) as h:
        yield h


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> int:
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    code, _ = client.docmd("AUTH", f"PLAIN {blob}")
    return code


def misbehave(proc: RelayProcess, ipv6_port: int | None) -> collections.Counter[str]:
    """Drive the relay into every line the filter is for; the expected matches per IP."""
    expected: collections.Counter[str] = collections.Counter()
    # Good behaviour first: a login and a message, which must match nothing.
    with proc.connect() as client:
        assert auth_plain(client, "app", PASSWORD) == 235
        send_on(client, "fine", sender="relay@contoso.com")
    # Three wrong passwords from 127.0.0.1: three failures, then the relay locks the
    # address and the user name out (two lines), and refuses the right password.
    with proc.connect() as client:
        assert [auth_plain(client, "app", WRONG) for _ in range(2)] == [535, 535]
    with proc.connect() as client:
        assert auth_plain(client, "app", WRONG) == 535
    expected["127.0.0.1"] += 3 + 2
    with proc.connect() as client:
        assert auth_plain(client, "app", PASSWORD) == 454
        # Outside relay_networks, without AUTH.
        assert client.mail("app@contoso.com")[0] == 530
    expected["127.0.0.1"] += 1
    if ipv6_port is not None:
        with smtplib.SMTP("::1", ipv6_port, local_hostname="app.test", timeout=10) as client:
            client.ehlo()
            assert auth_plain(client, "nobody", WRONG) == 535
            assert client.mail("app@contoso.com")[0] == 530
        expected["::1"] += 2
    proc.wait_for_log(r"relay denied: client=" + re.escape(list(expected)[-1]))
    return expected


def fail2ban_regex(log: Path) -> list[tuple[str, float]]:
    result = subprocess.run(["fail2ban-regex", "--raw", "-o", "row", str(log), str(FILTER)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [m for line in result.stdout.splitlines() if (m := ROW.match(line))]
    return [(m.group(1), float(m.group(2))) for m in rows]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_filter_finds_every_misbehaving_client_in_the_real_log(
        h: Harness, tmp_path: Path, fmt: str) -> None:
    h.config["logging"] = {"level": "info", "format": fmt}
    h.write_config()
    proc = h.start()
    ipv6_port = None
    if ipv6_available():
        ipv6_port = int(proc.wait_for_log(r"::1\]?:(\d+)").group(1))
    began = time.time()
    expected = misbehave(proc, ipv6_port)
    proc.terminate()
    assert proc.wait() == 0
    log = tmp_path / f"relay-{fmt}.log"
    log.write_text("\n".join(proc.lines) + "\n")
    assert WRONG not in log.read_text() and PASSWORD not in log.read_text()

    rows = fail2ban_regex(log)
    assert collections.Counter(ip for ip, _ in rows) == expected, proc.log
    # The timestamps are UTC ("Z"): read as local time they would be hours off wherever
    # the machine's zone is not UTC, and fail2ban would count them in the wrong window.
    for _, when in rows:
        assert began - 5 <= when <= time.time() + 5
    # Lines that must not count: a successful login and the delivered message.
    assert "AUTH PLAIN ok: client=127.0.0.1" in proc.log
    if fmt == "json":
        # Beside the text fail2ban reads, each AUTH line has the client and the user name
        # tried as fields of their own, for log shippers.
        auth = [r for r in map(json.loads, proc.lines) if "AUTH" in r["msg"]]
        assert {(r["event"], r["client"], r["user"]) for r in auth} >= {
            ("auth_ok", "127.0.0.1", "app"), ("auth_failed", "127.0.0.1", "app"),
            ("auth_lockout", "127.0.0.1", "app")}
        assert all(r["client"] in expected and "user" in r for r in auth), auth
