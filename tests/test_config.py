"""`smtp-oauth-relay check` and config validation: every error names the key and the problem."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from relay.config import AuthThrottle, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
profiles:
  system: {mailbox: relay@contoso.com, credential: main}
routing: {system_profile: system}
credentials:
  main:
    tenant_id: contoso.onmicrosoft.com
    client_id: c
    client_secret: {env: TEST_RELAY_SECRET}
spool: {directory: spool}
"""
GUID = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def run_check(tmp_path: Path, text: str, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(textwrap.dedent(text))
    return subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(cfg)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin", **(env or {})},
                          timeout=60, cwd=ROOT)


def test_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "client-secret").write_text("x" * 20)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = load_config(ROOT / "config.example.yaml")
    assert cfg.routing.system_profile == "system"
    assert [(lst.address, lst.port) for lst in cfg.server.listeners] == [("127.0.0.1", 2525)]
    # The values it shows are the defaults.
    assert cfg.server.auth_throttle == AuthThrottle()


def test_check_ok(tmp_path: Path) -> None:
    res = run_check(tmp_path, GOOD, {"TEST_RELAY_SECRET": "s" * 20})
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD, "credentials.main.client_secret: environment variable TEST_RELAY_SECRET is not set"),
    (GOOD.replace("relay@contoso.com", "relay.contoso.com"),
     "profiles.system.mailbox: 'relay.contoso.com' is not an e-mail address"),
    (GOOD.replace("credential: main}", "credential: mian}"),
     "profiles.system.credential: unknown credential 'mian' (known: main)"),
    (GOOD.replace("system_profile: system", "system_profile: sytsem"),
     "routing.system_profile: unknown profile 'sytsem'"),
    (GOOD + "server: {max_mesage_size: 10MB}\n",
     "server.max_mesage_size: unknown setting"),
    (GOOD + "spool: {io_threads: 0}\n",
     "spool.io_threads: Input should be greater than or equal to 1"),
    (GOOD + "server: {idle_timeout: soon}\n",
     "server.idle_timeout: expected a duration such as 30s, 5m, 1h or 5d, got 'soon'"),
    (GOOD + "server: {listeners: [{address: localhost}]}\n",
     "server.listeners.0.address: 'localhost' is not an IPv4 or IPv6 address"),
    (GOOD + "server: {relay_networks: [10.0.0.300/8]}\n",
     "server.relay_networks.0: '10.0.0.300/8' is not a network"),
    (GOOD + "server: {listeners: [{tls: starttls}]}\n",
     "server.listeners.0.tls: tls: starttls needs server.tls.certificate_file"),
    (GOOD.replace("client_secret: {env: TEST_RELAY_SECRET}", "client_secret: hunter2hunter2"),
     "credentials.main.client_secret: give the secret as {env: VARIABLE}"),
    (GOOD.replace("client_secret: {env: TEST_RELAY_SECRET}",
                  "client_secret: {file: missing-secret}"),
     "credentials.main.client_secret: file "),
    (GOOD + "server: {max_connections: 10, max_connections_per_client: 20}\n",
     "server.max_connections_per_client: 20 must not exceed server.max_connections (10)"),
    (GOOD + "server: {auth_throttle: {delay: 30s}}\n",
     "server.auth_throttle.max_delay: 15 s must not be less than server.auth_throttle.delay"),
    (GOOD + "server: {auth_throttle: {lockout_after: 0}}\n",
     "server.auth_throttle.lockout_after: Input should be greater than or equal to 1"),
    (GOOD + "users: {bob: {password_hash: plain}}\n",
     "users.bob.password_hash: password_hash must come from `smtp-oauth-relay hash-password`"),
    ("profiles: [1, 2\n", "invalid YAML: line 2"),
    (GOOD.replace("tenant_id: contoso.onmicrosoft.com",
                  f"tenant_id: https://login.microsoftonline.com/{GUID}/v2.0"),
     f"credentials.main.tenant_id: 'https://login.microsoftonline.com/{GUID}/v2.0' is the "
     f"login URL: use only the tenant id or domain (here: {GUID})"),
    (GOOD.replace("tenant_id: contoso.onmicrosoft.com", f"tenant_id: {GUID[:-1]}"),
     f"credentials.main.tenant_id: '{GUID[:-1]}' is not a GUID: it has 35 characters, a GUID "
     "has 36 (8-4-4-4-12 hex digits); copy the Directory (tenant) ID again from the app "
     "registration's Overview page in Entra ID"),
    (GOOD.replace("tenant_id: contoso.onmicrosoft.com", "tenant_id: contoso"),
     "credentials.main.tenant_id: 'contoso' is neither a tenant id (a GUID, 8-4-4-4-12 hex "
     "digits) nor a domain name (contoso.onmicrosoft.com): use the Directory (tenant) ID "
     "from the app registration's Overview page in Entra ID"),
    (GOOD.replace("tenant_id: contoso.onmicrosoft.com", "tenant_id: common"),
     "credentials.main.tenant_id: 'common' is not a tenant: the client-credentials flow "
     "needs your own"),
    ("", "config.yaml: the file is empty (or holds only comments): start from "
         "config.example.yaml, which shows every setting"),
    ("# server:\n#   hostname: relay\n", "config.yaml: the file is empty"),
    ("profiles:\n  system: {mailbox: a@b.c, credential: main}\n   routing: {}\n",
     "config.yaml: invalid YAML: line 3, column 4: this line does not line up with the keys "
     "above it: the keys of one section start in the same column, and a key is indented "
     "deeper only under a key that ends with ':' (the section begins on line 2; YAML "
     "parser: expected <block end>, but found '<block mapping start>')"),
    ("server:\n\thostname: relay.example\n",
     "config.yaml: invalid YAML: line 2, column 1: a tab: YAML indents with spaces only"),
    ("server:\n  hostname: relay.example\n    max_recipients: 5\n",
     "config.yaml: invalid YAML: line 3, column 19: a ':' the file cannot have here: this "
     "line is indented deeper than the line above, which already has its value"),
    (GOOD.replace("spool: {directory: spool}", "") + "  refresh_before: 5m\n",
     "credentials.refresh_before: refresh_before is a setting of a credential, but here it "
     "stands where a credential's name goes: indent it under the credential it belongs to "
     "(credentials.<name>.refresh_before)"),
    ("profiles:\n  system:\n    mailbox: a@b.c\n    credential: main\n  routing: {}\n",
     "profiles.routing: routing is a section of its own, not a profile: move it to the "
     "start of the line (no indentation)"),
    ("- just\n- a list\n", "the top level must be a mapping"),
])
def test_check_reports_key_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    res = run_check(tmp_path, text)
    assert res.returncode == 78, res.stdout + res.stderr
    assert expected in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(("value", "expected"), [
    (GUID, "credentials.main.client_secret: environment variable TEST_RELAY_SECRET holds a "
           "GUID, which is a secret's Secret ID: use the Value column instead (Entra ID > App "
           "registrations > Certificates & secrets)"),
    ("", "credentials.main.client_secret: environment variable TEST_RELAY_SECRET is set but "
         "empty"),
    (" \n", "credentials.main.client_secret: environment variable TEST_RELAY_SECRET is set "
            "but empty"),
])
def test_check_refuses_a_secret_that_cannot_be_one(tmp_path: Path, value: str,
                                                   expected: str) -> None:
    res = run_check(tmp_path, GOOD, {"TEST_RELAY_SECRET": value})
    assert res.returncode == 78, res.stdout + res.stderr
    assert expected in res.stderr
    if value.strip():
        assert value not in res.stderr          # a secret, even a wrong one, is never shown


def test_secrets_lose_the_line_breaks_and_blanks_around_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secret").write_text("\n  Xq8~value.from-a-file  \r\n")
    monkeypatch.setenv("TEST_RELAY_SECRET", "Xq8~value.from-the-environment\n")
    cfg = parse_config({"credentials": {
        "a": {"tenant_id": GUID, "client_id": "c", "client_secret": {"file": "secret"}},
        "b": {"tenant_id": GUID, "client_id": "c",
              "client_secret": {"env": "TEST_RELAY_SECRET"}}}}, base_dir=tmp_path)
    secrets = {name: cred.client_secret.resolve().reveal()
               for name, cred in cfg.credentials.items() if cred.client_secret}
    assert secrets == {"a": "Xq8~value.from-a-file", "b": "Xq8~value.from-the-environment"}


def spool_lines(tmp_path: Path) -> tuple[int, list[str]]:
    """`check` of GOOD (its spool in tmp_path/spool): exit code and stderr's lines."""
    res = run_check(tmp_path, GOOD, {"TEST_RELAY_SECRET": "s" * 20})
    return res.returncode, res.stderr.splitlines()


@pytest.mark.skipif(os.geteuid() != 0, reason="checks the spool's owner as root does")
def test_check_as_root_checks_the_spool_for_its_owner(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    code, lines = spool_lines(tmp_path)
    assert code == 0
    assert lines == [f"note: spool.directory {spool} was checked as root, who may write "
                     "anywhere; the user the relay runs as must be able to write it too "
                     "(under systemd, StateDirectory= sees to it; or run check as that user)"]
    (spool / "deferred").mkdir(parents=True)
    os.chown(spool, 65534, 65534)
    nobody = f"{pwd.getpwuid(65534).pw_name} (uid 65534)"
    code, lines = spool_lines(tmp_path)
    assert code == 78
    assert lines[1:] == [f"{tmp_path}/config.yaml: spool.directory: {spool}/deferred belongs "
                         f"to root (uid 0), not to the spool's owner {nobody}: the relay "
                         f"cannot write there (chown -R {pwd.getpwuid(65534).pw_name} {spool})"]
    os.chown(spool / "deferred", 65534, 65534)
    spool.chmod(0o500)
    code, lines = spool_lines(tmp_path)
    assert code == 78
    assert lines[1:] == [f"{tmp_path}/config.yaml: spool.directory: {spool} is not writable "
                         f"by the spool's owner {nobody} (mode 500): chmod u+rwx {spool}"]
    spool.chmod(0o700)
    code, lines = spool_lines(tmp_path)
    assert code == 0
    assert lines == [f"note: spool.directory {spool} was checked for its owner {nobody}, the "
                     "user the relay runs as (this check runs as root)"]


def test_check_names_a_spool_its_user_cannot_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """As the relay's own user (systemd's ExecStartPre=): access(2) decides. Root passes
    access(2) for everything, so here it answers as it would for uid 12345."""
    from relay.cli import main

    (tmp_path / "config.yaml").write_text(GOOD)
    (tmp_path / "spool").mkdir()
    monkeypatch.setenv("TEST_RELAY_SECRET", "s" * 20)
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "spool")
    assert main(["check", "--config", str(tmp_path / "config.yaml")]) == 78
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"{tmp_path}/config.yaml: spool.directory: {tmp_path}/spool is not writable by uid "
        f"12345, who runs this check: the user the relay runs as must own it (chown -R USER "
        f"{tmp_path}/spool)"]
    (tmp_path / "spool").rmdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert main(["check", "--config", str(tmp_path / "config.yaml")]) == 78
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"{tmp_path}/config.yaml: spool.directory: {tmp_path}/spool does not exist and uid "
        f"12345, who runs this check, cannot create it in {tmp_path}: create it for the user "
        f"the relay runs as (install -d -m 0700 -o USER {tmp_path}/spool; under systemd, "
        "StateDirectory= does), or set spool.directory"]


def test_check_missing_file(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "relay", "check", "--config",
                          str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 78
    assert "nope.yaml: file not found" in res.stderr


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({
            "profiles": {"a": {"mailbox": "a@b.c", "credential": "x"},
                         "b": {"mailbox": "b@b.c", "credential": "y"}},
        }, check_secrets=False)
    paths = [p for p, _ in err.value.problems]
    assert paths == ["profiles.a.credential", "profiles.b.credential"]


def test_secret_file_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cr3t-value\n")
    (tmp_path / "config.yaml").write_text(
        GOOD.replace("{env: TEST_RELAY_SECRET}", "{file: secret}"))
    cfg = load_config(tmp_path / "config.yaml")
    ref = cfg.credentials["main"].client_secret
    assert ref is not None and ref.file == tmp_path / "secret"
    secret = ref.resolve()
    assert secret.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in f"{secret}"
    assert "s3cr3t" not in repr(cfg)


def test_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "client-secret").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = parse_config({
        "profiles": {"s": {"mailbox": "a@b.c", "credential": "main"}},
        "credentials": {"main": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "c",
                                 "client_secret": {"credential": "client-secret"}}}})
    ref = cfg.credentials["main"].client_secret
    assert ref is not None and ref.resolve().reveal() == "from-systemd"


@pytest.mark.parametrize(("cloud", "authority", "scope", "smtp"), [
    ("global", "https://login.microsoftonline.com/contoso.onmicrosoft.com", "https://outlook.office365.com/.default",
     "smtp.office365.com"),
    ("gcc-high", "https://login.microsoftonline.us/contoso.onmicrosoft.com", "https://outlook.office365.us/.default",
     "smtp.office365.us"),
    ("china", "https://login.partner.microsoftonline.cn/contoso.onmicrosoft.com", "https://partner.outlook.cn/.default",
     "smtp.partner.outlook.cn"),
])
def test_cloud_presets(cloud: str, authority: str, scope: str, smtp: str) -> None:
    cfg = parse_config({
        "profiles": {"s": {"mailbox": "a@b.c", "credential": "main"}},
        "credentials": {"main": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "c",
                                 "cloud": cloud, "client_secret": {"value": "v"}}}})
    cred = cfg.credentials["main"]
    assert cred.authority_url == authority
    assert cred.scopes == [scope]
    upstream = cfg.upstream_for(cfg.profiles["s"])
    assert (upstream.host, upstream.port, upstream.tls) == (smtp, 587, "starttls")


def test_sizes_and_durations() -> None:
    cfg = parse_config({"server": {"max_message_size": "10MiB", "idle_timeout": "2m"}})
    assert cfg.server.max_message_size == 10 * 1024 * 1024
    assert cfg.server.idle_timeout == 120


@pytest.mark.parametrize(("thumbprint", "ok"), [
    ("3F2A" * 10, True),                                  # SHA-1, as Entra ID shows it
    (":".join(["3f"] * 20), True),                        # as openssl prints it
    ("3F2A" * 16, False),                                 # SHA-256: msal wants SHA-1 here
    ("3F2A" * 9, False),
    ("3G2A" * 10, False),
])
def test_certificate_thumbprint_is_a_sha1_digest(thumbprint: str, ok: bool) -> None:
    data = {"credentials": {"main": {"tenant_id": GUID, "client_id": "c", "certificate": {
        "private_key_file": "app.key", "thumbprint": thumbprint}}}}
    if ok:
        parse_config(data, check_secrets=False, check_files=False)
        return
    with pytest.raises(ConfigError) as info:
        parse_config(data, check_secrets=False, check_files=False)
    assert "credentials.main.certificate" in info.value.render()
    assert "SHA-1" in info.value.render()


def test_systemd_credential_by_hand_is_the_file_beside_the_config(tmp_path: Path) -> None:
    """What the unit hands over with LoadCredential=, `check` reads when run by hand."""
    text = GOOD.replace("{env: TEST_RELAY_SECRET}", "{credential: client-secret}")
    res = run_check(tmp_path, text)
    assert res.returncode == 78
    assert (f"credentials.main.client_secret: systemd credential 'client-secret': file "
            f"{tmp_path / 'client-secret'} does not exist") in res.stderr.splitlines()[-1]
    (tmp_path / "client-secret").write_text("s3cr3t-value\n")
    res = run_check(tmp_path, text)
    assert res.returncode == 0, res.stderr
    assert "s3cr3t" not in res.stdout + res.stderr
    # Under systemd, its directory wins.
    res = run_check(tmp_path, text, {"CREDENTIALS_DIRECTORY": str(tmp_path / "run")})
    assert res.returncode == 78
    assert f"file {tmp_path / 'run' / 'client-secret'} does not exist" in res.stderr


def test_changed_keys_name_what_differs_never_a_value() -> None:
    """A reload's log: nested keys dotted, named entries added or removed, a list or a
    secret as one key."""
    from relay.config import changed_keys

    base = {"profiles": {"a": {"mailbox": "a@contoso.com", "credential": "c"},
                         "b": {"mailbox": "b@contoso.com", "credential": "c"}},
            "routing": {"system_profile": "a"},
            "credentials": {"c": {"tenant_id": "contoso.com", "client_id": "i",
                                  "client_secret": {"value": "old-secret-value"}}}}
    old = parse_config(base, check_secrets=False)
    changed = {**base, "server": {"listeners": [{"port": 2526}],
                                  "auth_throttle": {"lockout": "1h"}},
               "profiles": {"a": {"mailbox": "a@contoso.com", "credential": "c",
                                  "send_as": ["x@contoso.com"]},
                            "new": {"mailbox": "n@contoso.com", "credential": "c"}},
               "credentials": {"c": {"tenant_id": "contoso.com", "client_id": "i",
                                     "client_secret": {"value": "new-secret-value"}}}}
    keys = changed_keys(old, parse_config(changed, check_secrets=False))
    assert keys == ["server.listeners", "server.auth_throttle.lockout", "profiles.a.send_as",
                    "profiles.new (added)", "profiles.b (removed)",
                    "credentials.c.client_secret"]
    assert changed_keys(old, old) == []
