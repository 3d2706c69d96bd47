"""The ways the relay is installed and run: systemd unit, container image, Kubernetes.

None of these can be run for real here (no systemd as PID 1, no container engine, no
cluster), so each is checked as far as the tools on this machine allow: the unit with
``systemd-analyze``, the user and directories with ``systemd-sysusers``/``systemd-tmpfiles``
in a scratch root, the image by reading its Dockerfile and repeating its install steps in
a fresh virtualenv, the manifests by checking that they agree with each other and with the
config they ship. Most failures these catch are two files drifting apart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import venv
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import yaml

from relay import __version__
from relay.cli.exampleconfig import SHIPPED
from relay.cli.exampleconfig import read as read_shipped
from relay.config import DEFAULT_CONFIG_PATH, Config, Delivery, parse_config
from relay.core.secrets import Secret
from relay.ops import healthcheck as healthcheck
from relay.ops import install
from relay.ops.install import Answers

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "smtp-oauth-relay.service"
SYSUSERS = ROOT / "systemd" / "sysusers.d" / "smtp-oauth-relay.conf"
TMPFILES = ROOT / "systemd" / "tmpfiles.d" / "smtp-oauth-relay.conf"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
K8S = ROOT / "deploy" / "kubernetes"
BINARY = "/usr/local/bin/smtp-oauth-relay"


def _duration(text: str) -> float:
    """A systemd time span such as ``60s``, ``2min`` or ``1min 30s``, in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(value) * units[unit or "s"]
    return total


# --- systemd ------------------------------------------------------------------------------

def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (keys may repeat; comments skipped)."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (it comes with the systemd package)")
    return path


@pytest.fixture
def unit_with_stub_binary(tmp_path: Path) -> Path:
    """The unit with its ExecStart binary pointing at a stub that exists.

    ``systemd-analyze verify`` refuses commands that do not exist, and the relay is not
    installed at /usr/local/bin here; everything else in the unit is checked unchanged.
    """
    stub = tmp_path / "bin" / "smtp-oauth-relay"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(BINARY, str(stub)))
    return unit


def test_unit_verifies_cleanly(unit_with_stub_binary: Path) -> None:
    tool = need("systemd-analyze")
    res = subprocess.run([tool, "verify", "--man=no", str(unit_with_stub_binary)],
                         capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys; any output at all is a finding.
    assert res.returncode == 0, res.stderr
    assert res.stdout + res.stderr == ""


def test_verify_would_notice_a_typo(unit_with_stub_binary: Path) -> None:
    """The test above is only as good as verify's eye: prove it reports a bad key."""
    tool = need("systemd-analyze")
    text = unit_with_stub_binary.read_text().replace("NoNewPrivileges=", "NoNewPrivilegez=")
    unit_with_stub_binary.write_text(text)
    res = subprocess.run([tool, "verify", "--man=no", str(unit_with_stub_binary)],
                         capture_output=True, text=True, timeout=60)
    assert "NoNewPrivilegez" in res.stderr


def test_unit_sandbox_rated_ok_or_better() -> None:
    tool = need("systemd-analyze")
    res = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", res.stdout)
    assert match, res.stdout[-2000:] + res.stderr
    exposure, rating = float(match.group(1)), match.group(2)
    # systemd's scale: PERFECT 0, SAFE < 1, OK < 5, then MEDIUM, EXPOSED, UNSAFE, DANGEROUS.
    assert rating in ("PERFECT", "SAFE", "OK"), match.group(0)
    assert exposure < 5.0


def test_unit_settings_agree_with_the_relay() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert _duration(s["WatchdogSec"][0]) >= 10
    config_arg = f"--config {DEFAULT_CONFIG_PATH}"
    assert s["ExecStart"] == [f"{BINARY} run {config_arg}"]
    assert s["ExecStartPre"] == [f"{BINARY} check {config_arg}"]
    # Reload: validate, then SIGHUP (Type=notify-reload needs systemd >= 253).
    assert s["ExecReload"] == [f"{BINARY} check {config_arg}", "/bin/kill -HUP $MAINPID"]
    assert s["RestartPreventExitStatus"] == ["78"]  # EX_CONFIG from the CLI
    # The drain must fit in the stop timeout, or systemd kills deliveries half-way.
    assert _duration(s["TimeoutStopSec"][0]) > Delivery().shutdown_timeout
    # The spool's default ($STATE_DIRECTORY/spool, else /var/lib/smtp-oauth-relay/spool)
    # must be where StateDirectory= puts it.
    assert s["StateDirectory"] == ["smtp-oauth-relay"]
    assert s["WorkingDirectory"] == ["/var/lib/smtp-oauth-relay"]
    # The credential name that config.example.yaml and the README refer to.
    assert s["LoadCredential"] == ["client-secret:/etc/smtp-oauth-relay/client-secret"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["User"] == ["smtp-oauth-relay"]


def test_default_spool_follows_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/smtp-oauth-relay")
    assert parse_config({}).spool.directory == Path("/var/lib/smtp-oauth-relay/spool")


def test_sysusers_and_tmpfiles_in_a_scratch_root(tmp_path: Path) -> None:
    """The user the unit runs as is created, and the config directory gets its group."""
    sysusers, tmpfiles = need("systemd-sysusers"), need("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc" / "sysusers.d").mkdir(parents=True)
    (root / "etc" / "tmpfiles.d").mkdir()
    shutil.copy(SYSUSERS, root / "etc" / "sysusers.d")
    shutil.copy(TMPFILES, root / "etc" / "tmpfiles.d")
    subprocess.run([sysusers, f"--root={root}"], check=True, capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":")
              for line in (root / "etc" / "passwd").read_text().splitlines()}
    user = passwd["smtp-oauth-relay"]
    assert user[5] == "/var/lib/smtp-oauth-relay"
    assert user[6].endswith("nologin")
    assert unit_settings()["User"] == [user[0]]

    confdir = root / "etc" / "smtp-oauth-relay"
    confdir.mkdir()
    (confdir / "config.yaml").write_text("{}\n")
    (confdir / "client-secret").write_text("s\n")
    (confdir / "config.yaml").chmod(0o666)
    (confdir / "client-secret").chmod(0o644)
    subprocess.run([tmpfiles, f"--root={root}", "--create"], check=True, capture_output=True,
                   timeout=60)
    gid = int(user[3])
    st = confdir.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o750, 0, gid)
    st = (confdir / "config.yaml").stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o640, gid)
    assert (confdir / "client-secret").stat().st_mode & 0o777 == 0o600


# --- the files a wheel carries, and the README's one install sequence ----------------------

def test_shipped_files_are_the_top_level_files() -> None:
    """One copy of each: the source tree's files are links to what the package ships."""
    top = {"config": ROOT / "config.example.yaml", "systemd-unit": UNIT,
           "sysusers": SYSUSERS, "tmpfiles": TMPFILES}
    assert set(top) == set(SHIPPED)
    for name, path in top.items():
        assert path.is_symlink(), path
        assert path.resolve() == ROOT / "relay" / "data" / SHIPPED[name].resource
        assert read_shipped(name) == path.read_bytes(), name


def test_wheel_carries_the_shipped_files(tmp_path: Path) -> None:
    """What `pip install` of a wheel gets, without the source tree beside it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(ROOT),
                    "-w", str(tmp_path)], check=True, timeout=600, cwd=tmp_path,
                   capture_output=True)
    [wheel] = tmp_path.glob("smtp_oauth_relay-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        for name, shipped in SHIPPED.items():
            assert whl.read(f"relay/data/{shipped.resource}") == read_shipped(name), name


@pytest.mark.parametrize("name", list(SHIPPED))
def test_example_config_prints_each_file_byte_for_byte(name: str) -> None:
    res = subprocess.run([sys.executable, "-m", "relay", "example-config", name],
                         capture_output=True, timeout=60, cwd=ROOT)
    assert (res.returncode, res.stderr) == (0, b"")
    assert res.stdout == read_shipped(name)


def test_example_config_list_names_where_each_goes() -> None:
    res = subprocess.run([sys.executable, "-m", "relay", "example-config", "--list"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0
    assert res.stdout.splitlines()[1] == (
        "systemd-unit  /etc/systemd/system/smtp-oauth-relay.service: the service "
        "(Type=notify, watchdog, reload, sandboxing)")


def readme_install_commands() -> list[str]:
    """The shell lines of the README's "Installing for real" sequence, comments dropped."""
    section = README.read_text().split("## Installing for real", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line.partition("#")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line]


def test_readme_install_sequence_agrees_with_the_unit() -> None:
    """Followed literally, the README's steps put every file where the unit looks."""
    commands = readme_install_commands()
    assert "RELAY_CLIENT_SECRET" not in "\n".join(commands)
    installed = {}
    for line in commands:
        if line.startswith("smtp-oauth-relay example-config "):
            name, _, target = line.split(maxsplit=2)[2].partition(" > ")
            installed[name] = target
    assert installed == {n: s.installed_as for n, s in SHIPPED.items() if n != "config"}
    [link] = [c for c in commands if c.startswith("ln -sf ")]
    assert link.split()[-1] == BINARY
    # The user and directory come before init, which needs the service's group.
    order = [next(i for i, c in enumerate(commands) if c.startswith(p))
             for p in ("systemd-sysusers", "systemd-tmpfiles --create", "smtp-oauth-relay init",
                       "systemctl enable --now smtp-oauth-relay")]
    assert order == sorted(order)

    # init writes the secret where LoadCredential= takes it from, under the name the
    # config refers to, and the config where ExecStart= reads it.
    [credential] = unit_settings()["LoadCredential"]
    name, _, source = credential.partition(":")
    files = install.plan(DEFAULT_CONFIG_PATH,
                         Answers("contoso.onmicrosoft.com", "c", "relay@contoso.com",
                                 secret=Secret("s")))
    assert [f.path for f in files] == [DEFAULT_CONFIG_PATH, Path(source)]
    assert name == install.SECRET_CREDENTIAL == Path(source).name
    assert yaml.safe_load(files[0].content)["credentials"]["main"]["client_secret"] == {
        "credential": name}
    example = yaml.safe_load(read_shipped("config"))
    assert example["credentials"]["main"]["client_secret"] == {"credential": name}
    # ...with the owner and mode that tmpfiles.d gives them at every boot.
    rules = {line.split()[1]: line.split() for line in TMPFILES.read_text().splitlines()
             if line.startswith("z ")}
    user = unit_settings()["User"][0]
    for f in files:
        _, _, mode, owner, group, _ = rules[str(f.path)]
        assert (int(mode, 8), owner, group) == (f.mode, "root", user if f.group else "root")
    assert unit_settings()["Group"][0] == install.SERVICE_GROUP


def test_kubernetes_image_is_a_placeholder_the_readme_says_to_replace() -> None:
    image = relay_container()["image"]
    assert image.startswith("registry.example.com/")
    text = (ROOT / "deploy" / "README.md").read_text()
    assert f"**No image is published**, so `{image}` in" in text
    assert f"kustomize edit set image {image.rpartition(':')[0]}=" in text


# --- Dockerfile ---------------------------------------------------------------------------

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage, as (INSTRUCTION, arguments) with continuations joined."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        word, _, args = logical.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), args.strip()))
        logical = ""
    return [s for s in stages if s]


def final_stage() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for word, args in dockerfile_stages()[-1]:
        out.setdefault(word, []).append(args)
    return out


def test_dockerfile_is_multi_stage_from_python_311_slim() -> None:
    stages = dockerfile_stages()
    global_args = dict(a.partition("=")[::2] for w, a in stages[0] if w == "ARG")
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    froms = [a for stage in stages for w, a in stage if w == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    final = final_stage()
    assert any(c.startswith("--from=build ") for c in final["COPY"])
    build_runs = " ".join(a for w, a in stages[1] if w == "RUN")
    assert "pip wheel" in build_runs and "python -m venv" in build_runs


def test_dockerfile_runs_as_numeric_non_root_user() -> None:
    [user] = final_stage()["USER"]
    uid, _, gid = user.partition(":")
    # Numeric, or Kubernetes' runAsNonRoot cannot verify it.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    [deployment] = [d for d in k8s_documents() if d["kind"] == "Deployment"]
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsUser"] == int(uid)
    assert pod_security["fsGroup"] == int(gid)


def test_dockerfile_entrypoint_healthcheck_volume_signal() -> None:
    final = final_stage()
    assert json.loads(final["ENTRYPOINT"][0]) == ["smtp-oauth-relay"]
    assert json.loads(final["CMD"][0]) == ["run", "--config", str(DEFAULT_CONFIG_PATH)]
    assert final["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(final["VOLUME"][0]) == ["/var/lib/smtp-oauth-relay"]
    assert final["WORKDIR"] == ["/var/lib/smtp-oauth-relay"]
    assert "2525" in final["EXPOSE"][0].split()
    [hc] = final["HEALTHCHECK"]
    options, _, cmd = hc.partition("CMD ")
    assert json.loads(cmd) == ["python", "-m", "relay.healthcheck",
                               "--config", str(DEFAULT_CONFIG_PATH)]
    assert "--start-period=" in options


def test_default_spool_is_on_the_image_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    [volume] = json.loads(final_stage()["VOLUME"][0])
    assert parse_config({}).spool.directory.is_relative_to(volume)


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or a parent wins."""
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        parts = path.split("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    copied = []
    for stage in dockerfile_stages():
        for word, args in stage:
            if word == "COPY" and not args.startswith("--from"):
                copied += args.split()[:-1]
    assert copied, "the Dockerfile copies nothing from the context"
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not dockerignore_excludes(src), f"{src} is copied but .dockerignore drops it"
    assert not dockerignore_excludes("relay/cli/__init__.py")
    for private in (".venv/bin/python", ".git/config", ".sandbox/ca.pem", "tests/conftest.py",
                    "relay/cli/__pycache__/run.cpython-311.pyc", "relay/receive/__pycache__/x.pyc",
                    "spool/data/x.eml", "client-secret"):
        assert dockerignore_excludes(private), private


# --- health probe ---------------------------------------------------------------------------

class _Health(BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, tuple[int, bytes]]] = {
        "/healthz": (200, b"ok\n"), "/readyz": (503, b"not ready: spool\n")}

    def do_GET(self) -> None:
        code, body = self.answers.get(self.path, (404, b"no\n"))
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[str, int]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[:2]  # type: ignore[misc]
    server.shutdown()
    server.server_close()


def test_probe_http_healthy_and_not_ready(health_server: tuple[str, int],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy in the environment must not swallow a probe of loopback.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    host, port = health_server
    ok, detail = healthcheck.probe_http(host, port, "/healthz", timeout=5)
    assert ok, detail
    ok, detail = healthcheck.probe_http(host, port, "/readyz", timeout=5)
    assert not ok
    assert "503" in detail and "not ready: spool" in detail


def test_probe_http_nothing_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        ok, detail = healthcheck.probe_http("127.0.0.1", port, "/healthz", timeout=2)
    assert not ok
    assert "refused" in detail.lower()


def test_probe_targets_loopback_for_wildcard_binds() -> None:
    def cfg(**http: Any) -> Any:
        return SimpleNamespace(http=SimpleNamespace(**http))

    assert healthcheck.http_target(cfg(enabled=True, address="0.0.0.0", port=9)) == (
        "127.0.0.1", 9)
    assert healthcheck.http_target(cfg(enabled=True, address="::", port=9)) == ("::1", 9)
    assert healthcheck.http_target(cfg(enabled=True, address="10.1.2.3", port=9)) == (
        "10.1.2.3", 9)
    assert healthcheck.http_target(cfg(enabled=False, address="0.0.0.0", port=9)) is None
    ok, detail = healthcheck.check(parse_config({"http": {"port": 0}}))
    assert not ok and "http.port is 0" in detail


async def test_smtp_fallback_when_http_is_disabled(relay: Any) -> None:
    """Without the HTTP endpoint the probe reads the greeting of the first listener."""
    host, port = relay.listening[0]
    server = relay.config.server  # its listener says port 0: give the one it got
    listener = server.listeners[0].model_copy(update={"port": port})
    config = SimpleNamespace(http=SimpleNamespace(enabled=False),
                             server=server.model_copy(update={"listeners": [listener]}))
    ok, detail = await asyncio.to_thread(healthcheck.check, config, timeout=5)  # type: ignore[arg-type]
    assert ok, detail
    assert f"{host}:{port}" in detail


def test_healthcheck_command_with_a_config_file(health_server: tuple[str, int],
                                                tmp_path: Path) -> None:
    _, port = health_server
    config = tmp_path / "config.yaml"
    config.write_text(f"http: {{enabled: true, address: 0.0.0.0, port: {port}}}\n")
    res = subprocess.run([sys.executable, "-m", "relay.healthcheck", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("healthy:")
    res = subprocess.run([sys.executable, "-m", "relay.healthcheck", "--config", str(config),
                          "--ready"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1
    assert "not ready: spool" in res.stderr


def test_healthcheck_command_with_a_broken_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server: [not, a, mapping\n")
    res = subprocess.run([sys.executable, "-m", "relay.healthcheck", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1
    assert res.stderr.startswith("unhealthy:") and "invalid YAML" in res.stderr


# --- Kubernetes ------------------------------------------------------------------------------

def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    [doc] = [d for d in k8s_documents() if d["kind"] == kind]
    return doc


def shipped_config() -> tuple[dict[str, Any], Config]:
    """The relay config embedded in the ConfigMap, raw and validated."""
    data = yaml.safe_load(by_kind("ConfigMap")["data"]["config.yaml"])
    return data, parse_config(data, "configmap.yaml", check_secrets=False, check_files=False)


def relay_container() -> dict[str, Any]:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    [relay] = [c for c in containers if c["name"] == "smtp-oauth-relay"]
    return relay


def test_every_manifest_parses_and_is_listed_in_the_kustomization() -> None:
    docs = k8s_documents()
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Secret", "PersistentVolumeClaim",
                                         "Deployment", "Kustomization"}
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], doc["__file__"]
    listed = set(by_kind("Kustomization")["resources"])
    files = {d["__file__"] for d in docs if d["kind"] != "Kustomization"}
    # All but the Secret's placeholder: `apply -k` must never overwrite the real secret.
    assert listed == files - {"secret.yaml"}
    assert "secret.yaml" in files


def test_configmap_config_is_valid_and_pod_local() -> None:
    raw, config = shipped_config()
    [listener] = config.server.listeners
    assert (listener.address, listener.port) == ("127.0.0.1", 2525)
    app = by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in app["env"]}
    assert (env["SMTP_HOST"], env["SMTP_PORT"]) == ("127.0.0.1", "2525")
    # The kubelet probes the pod IP: the HTTP endpoint cannot be loopback-only here.
    assert not ipaddress.ip_address(raw["http"]["address"]).is_loopback
    assert raw["http"]["enabled"] is True


def test_probes_point_at_the_configured_http_port() -> None:
    raw, _ = shipped_config()
    relay = relay_container()
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    live = relay["livenessProbe"]["httpGet"]
    assert live["path"] == "/healthz"
    assert ports.get(live["port"], live["port"]) == raw["http"]["port"]
    # The app starts once the SMTP listener answers, judged from the same config file.
    command = relay["startupProbe"]["exec"]["command"]
    assert command[:4] == ["python", "-m", "relay.healthcheck", "--smtp"]
    assert command[command.index("--config") + 1] == relay["args"][-1]
    # Ready = the listener takes mail. /readyz fails on upstream trouble and would take the
    # application's pod out of its Service: not a sidecar's readiness probe.
    assert relay["readinessProbe"]["exec"]["command"] == command
    assert "/readyz" not in json.dumps(relay["readinessProbe"])
    # A native sidecar: started before the app, stopped after it.
    assert relay["restartPolicy"] == "Always"


async def test_startup_probe_command_against_a_running_relay(relay: Any,
                                                             tmp_path: Path) -> None:
    """The exact command of the startup probe, against a real listener."""
    _, port = relay.listening[0]
    config = tmp_path / "config.yaml"
    config.write_text(f"server: {{listeners: [{{address: 0.0.0.0, port: {port}}}]}}\n"
                      "http: {enabled: false}\n")
    command = relay_container()["startupProbe"]["exec"]["command"]
    argv = [sys.executable, *command[1:command.index("--config") + 1], str(config)]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith(f"healthy: smtp://127.0.0.1:{port}")


def test_mounts_match_the_config_paths() -> None:
    _, config = shipped_config()
    relay = relay_container()
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in relay["volumeMounts"]}

    def volume_for(path: Path) -> dict[str, Any]:
        owners = [m for m in mounts if path.is_relative_to(m)]
        assert owners, f"{path} is on no volume"
        return mounts[max(owners, key=len)]

    # The spool: on the claim, not on the container's (read-only) root filesystem.
    spool = volume_for(config.spool.directory)
    assert spool["persistentVolumeClaim"]["claimName"] == by_kind(
        "PersistentVolumeClaim")["metadata"]["name"]
    # The config file the container's arguments name comes from the ConfigMap.
    arg = Path(relay["args"][relay["args"].index("--config") + 1])
    cm = volume_for(arg)
    assert cm["configMap"]["name"] == by_kind("ConfigMap")["metadata"]["name"]
    assert arg.name in by_kind("ConfigMap")["data"]
    # The client secret is a file from the Secret.
    secret_file = config.credentials["main"].client_secret.file  # type: ignore[union-attr]
    assert secret_file is not None
    sv = volume_for(secret_file)
    secret = by_kind("Secret")
    assert sv["secret"]["secretName"] == secret["metadata"]["name"]
    assert secret_file.name in secret["stringData"]
    assert sv["secret"]["defaultMode"] == 0o440  # group-readable through fsGroup


def test_pod_hardening_and_shutdown_budget() -> None:
    _, config = shipped_config()
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.delivery.shutdown_timeout
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = relay_container()["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # One pod per spool: no second relay on the same claim, not even during an update.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert by_kind("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


WORKLOAD_IDENTITY = ROOT / "deploy" / "kubernetes-workload-identity"


def test_the_workload_identity_variant_has_no_secret_and_a_usable_config() -> None:
    """The overlay: a service account for the app, the projected token as the credential,
    and the Secret's volume gone; its config is valid and matches the service account."""
    docs = {p.name: yaml.safe_load(p.read_text()) for p in WORKLOAD_IDENTITY.glob("*.yaml")}
    kustomization = docs["kustomization.yaml"]
    assert "../kubernetes" in kustomization["resources"]
    data = yaml.safe_load(docs["configmap-patch.yaml"]["data"]["config.yaml"])
    config = parse_config(data, "configmap-patch.yaml", check_secrets=False,
                          check_files=False)
    cred = config.credentials["main"]
    assert cred.kind_key == "federated_token" and cred.client_secret is None
    assert str(cred.federated_token_file) == (
        "/var/run/secrets/azure/tokens/azure-identity-token")   # where AKS projects it
    account = docs["serviceaccount.yaml"]
    assert account["metadata"]["annotations"][
        "azure.workload.identity/client-id"] == cred.client_id
    pod = docs["deployment-patch.yaml"]["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    # Everything but the credential is the base's config.
    base, _ = shipped_config()
    assert {k: v for k, v in data.items() if k != "credentials"} == {
        k: v for k, v in base.items() if k != "credentials"}


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl is not installed (it renders the kustomization)")
def test_the_workload_identity_variant_renders_without_the_secret() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(WORKLOAD_IDENTITY)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "ServiceAccount"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert "client-secret" not in json.dumps(pod)
    assert pod["serviceAccountName"] == "smtp-oauth-relay"
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert "federated_token_file" in configmap["data"]["config.yaml"]


# --- the image's install steps, in a fresh virtualenv ----------------------------------------

@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_clean_venv(tmp_path: Path) -> None:
    """What the Dockerfile does (wheel, venv, install), then what a user does first."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(ROOT),
                    "-w", str(wheels)], check=True, timeout=600, cwd=tmp_path)
    [wheel] = wheels.glob("smtp_oauth_relay-*.whl")
    assert wheel.name.startswith(f"smtp_oauth_relay-{__version__}-")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], check=True,
                   timeout=600, cwd=tmp_path)
    exe = env_dir / "bin" / "smtp-oauth-relay"
    # The image's environment, with its venv's place in PATH.
    image_env = dict(pair.split("=", 1) for pair in shlex.split(" ".join(final_stage()["ENV"])))
    assert image_env["PATH"].startswith("/opt/smtp-oauth-relay/bin:")
    clean = {**image_env, "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "LANG": "C.UTF-8"}

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(exe), *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env={**clean, **env})

    res = run("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"smtp-oauth-relay {__version__}"
    # Even from a directory holding a relay/ package (PYTHONSAFEPATH), the wheel is used.
    where = subprocess.run([str(py), "-m", "relay.healthcheck", "--help"], env=clean,
                           capture_output=True, text=True, cwd=ROOT, check=True)
    assert "--smtp" in where.stdout
    where = subprocess.run([str(py), "-c", "import relay; print(relay.__file__)"], env=clean,
                           capture_output=True, text=True, cwd=ROOT, check=True)
    assert where.stdout.startswith(str(env_dir))
    # The documented config comes with the wheel; its secret is the file beside it.
    res = run("example-config")
    assert res.returncode == 0, res.stderr
    example = tmp_path / "etc" / "config.yaml"
    example.parent.mkdir()
    example.write_text(res.stdout)
    res = run("check", "--config", str(example),  # no client-secret file yet
              STATE_DIRECTORY=str(tmp_path / "state"))  # a spool this user may write
    assert res.returncode == 78
    assert "systemd credential 'client-secret'" in res.stderr
    (example.parent / "client-secret").write_text("not-a-real-secret\n")
    res = run("check", "--config", str(example), STATE_DIRECTORY=str(tmp_path / "state"))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    assert "not-a-real-secret" not in res.stdout + res.stderr
    assert json.loads(final_stage()["ENTRYPOINT"][0]) == [exe.name]
