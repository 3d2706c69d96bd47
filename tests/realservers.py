"""Real mail software that nobody here wrote, run privately for the tests: Dovecot and Postfix.

The project's own stand-ins (relay/sandbox/) are strict, but they were written from the same
reading of the protocols as the relay itself. These helpers run the Debian packages instead:

* :class:`Dovecot` - Dovecot's submission service as the relay's upstream: it demands
  STARTTLS (``ssl = required``) and a SASL XOAUTH2 login whose JWT it validates itself
  (``passdb oauth2`` with local validation against FakeEntra's RS256 public key), then
  forwards what it accepts to an :class:`SmtpSink`.
* :class:`Postfix` - a Postfix instance as the relay's client: mail handed to its
  ``sendmail`` goes to the relay as Postfix's ``relayhost``.

Each instance has its own configuration and state in a directory of its own and listens
only on loopback ports found free at start; nothing of the system's own Dovecot or Postfix
configuration is read or changed. Both must be started as root (they switch to their
service users). Tests skip, naming what is missing, when the software is not installed;
``.ci/run`` installs it.

Dovecot listens on 127.0.0.2: Dovecot treats a client whose address equals its own as
secured and would accept AUTH before STARTTLS from 127.0.0.1 to 127.0.0.1. Seen from
127.0.0.2, the relay (connecting from 127.0.0.1) is a remote client.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from relay.sandbox.pki import LocalPKI

DOVECOT_HOST = "127.0.0.2"
_DOVECOT = Path("/usr/sbin/dovecot")
_DOVECOT_SUBMISSION = Path("/usr/lib/dovecot/submission")
_POSTFIX = Path("/usr/sbin/postfix")
_SENDMAIL = Path("/usr/sbin/sendmail")
_POSTFIX_MASTER = Path("/usr/lib/postfix/sbin/master")


# --- what is there ------------------------------------------------------------------------

def _loopback_alias_usable(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def dovecot_missing() -> str | None:
    """Why a private Dovecot submission server cannot run here, or None."""
    if not (_DOVECOT.exists() and _DOVECOT_SUBMISSION.exists()):
        return ("Dovecot's submission service is not installed (Debian packages dovecot-core "
                "and dovecot-submissiond; .ci/run installs them)")
    if os.geteuid() != 0:
        return "a private Dovecot must be started as root (it switches to its service users)"
    if not _loopback_alias_usable(DOVECOT_HOST):
        return f"{DOVECOT_HOST} is not a usable loopback address on this system"
    return None


def postfix_missing() -> str | None:
    """Why a private Postfix instance cannot run here, or None."""
    if not (_POSTFIX.exists() and _SENDMAIL.exists() and _POSTFIX_MASTER.exists()):
        return "Postfix is not installed (Debian package postfix; .ci/run installs it)"
    if os.geteuid() != 0:
        return "a private Postfix must be started as root (it switches to its service users)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bind to port 0, read it, release it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _private_directory(prefix: str) -> Path:
    """A short directory that the servers' unprivileged users can traverse.

    pytest's tmp_path is below a directory only root may enter, and its paths can exceed
    the 108 bytes a Unix socket path may have.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM the process group the server's master leads (its children end at once,
    rather than when the master gets round to them), wait; SIGKILL what lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    # Children that outlived their master (they notice its end on their own, normally).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --- an SMTP sink -----------------------------------------------------------------------

@dataclass(frozen=True)
class SunkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str


class _SinkHandler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self._sink.unknown:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._sink._add(SunkMessage(envelope.mail_from, list(envelope.rcpt_tos),
                                    bytes(envelope.original_content or envelope.content),
                                    str(session.peer[0])))
        return "250 Ok: sunk"


class SmtpSink:
    """A plain SMTP server on 127.0.0.1 that keeps every message it is given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[SunkMessage] = []
        self.unknown: set[str] = set()     # recipients refused at RCPT (lower case)
        self._controller: Controller | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def _add(self, message: SunkMessage) -> None:
        with self._lock:
            self._messages.append(message)

    @property
    def messages(self) -> list[SunkMessage]:
        with self._lock:
            return list(self._messages)

    def start(self) -> SmtpSink:
        for _ in range(5):
            port = free_port(self.host)
            controller = Controller(_SinkHandler(self), hostname=self.host, port=port,
                                    ready_timeout=10)
            try:
                controller.start()
            except Exception:           # the port was taken in between: pick another
                with contextlib.suppress(Exception):
                    controller.stop()
                continue
            self._controller, self.port = controller, port
            return self
        raise RuntimeError("could not start the SMTP sink")

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()


# --- Dovecot submission ---------------------------------------------------------------------

_DOVECOT_CONF = """\
instance_name = relay-test-{port}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
hostname = dovecot.test
protocols = submission
listen = {host}
ssl = {ssl}
disable_plaintext_auth = {disable_plaintext_auth}
ssl_cert = <{cert}
ssl_key = <{key}
auth_mechanisms = xoauth2 oauthbearer
auth_verbose = yes
# Refused logins are answered at once: the tests refuse on purpose.
auth_failure_delay = 0
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {dir}/oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent allow_all_users=yes
}}
mail_location = maildir:{dir}/mail/%u
submission_relay_host = {sink_host}
submission_relay_port = {sink_port}
service submission-login {{
  inet_listener submission {{
    address = {host}
    port = {port}
  }}
}}
# Without this socket the auth process keeps no failure penalty per client address
# (which would delay every later login from 127.0.0.1 by up to 15 s).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
# The validation keys are read from the test's directory.
service auth {{
  user = root
}}
"""

_OAUTH2_CONF = """\
introspection_mode = local
local_validation_key_dict = fs:posix:prefix={dir}/keys/
username_attribute = {username_attribute}
"""


class Dovecot:
    """A private Dovecot submission server on 127.0.0.2 that relays to ``sink``.

    It takes an XOAUTH2 login when the bearer token is a JWT signed with a key published
    by :meth:`publish_key`, not expired, and its ``username_attribute`` claim equals the
    ``user=`` of the login. ``tls=False`` makes a misconfigured server: no STARTTLS, and
    logins accepted in clear.
    """

    host = DOVECOT_HOST

    def __init__(self, pki: LocalPKI, sink: SmtpSink, *,
                 username_attribute: str = "email", tls: bool = True) -> None:
        self.pki = pki
        self.sink = sink
        self.username_attribute = username_attribute
        self.tls = tls
        self.directory = _private_directory("dovecot-")
        (self.directory / "keys").mkdir()
        (self.directory / "state").mkdir()
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.directory / "dovecot.log"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def publish_key(self, kid: str, public_key_pem: bytes, *, alg: str = "RS256") -> None:
        """Trust ``kid``: Dovecot looks a token's key up as <azp or "default">/<alg>/<kid>."""
        folder = self.directory / "keys" / "default" / alg
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{kid}.tmp"
        tmp.write_bytes(public_key_pem)
        tmp.rename(folder / kid)

    def withdraw_key(self, kid: str, *, alg: str = "RS256") -> None:
        """Stop trusting ``kid`` (only for keys Dovecot has not loaded yet: it caches them)."""
        (self.directory / "keys" / "default" / alg / kid).unlink()

    def start(self, timeout: float = 20) -> Dovecot:
        (self.directory / "oauth2.conf.ext").write_text(_OAUTH2_CONF.format(
            dir=self.directory, username_attribute=self.username_attribute))
        for _ in range(3):
            self.port = free_port(self.host)
            config = self.directory / "dovecot.conf"
            config.write_text(_DOVECOT_CONF.format(
                dir=self.directory, host=self.host, port=self.port,
                ssl="required" if self.tls else "no",
                disable_plaintext_auth="yes" if self.tls else "no",
                cert=self.pki.cert_file, key=self.pki.key_file,
                sink_host=self.sink.host, sink_port=self.sink.port))
            # -F: the master stays this process's child, so it is stopped (and reaped) by
            # its pid. Its stdio goes to a file: Dovecot keeps the descriptors it is given.
            with open(self.directory / "stdio.log", "ab") as out:
                self._proc = subprocess.Popen(
                    [str(_DOVECOT), "-F", "-c", str(config)], stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ready(timeout):
                return self
            self.stop(remove=False)
            if "Address already in use" not in self.log():
                break
        raise RuntimeError(f"Dovecot did not start; its log:\n{self.log()}\n"
                           f"{(self.directory / 'stdio.log').read_text(errors='replace')}")

    def _wait_ready(self, timeout: float) -> bool:
        """True once the submission service greets; False if the master exited."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), \
                    socket.create_connection((self.host, self.port), timeout=2) as conn:
                conn.settimeout(5)
                if conn.recv(512).startswith(b"220 "):
                    conn.sendall(b"QUIT\r\n")
                    return True
            time.sleep(0.05)
        return False

    def stop(self, *, remove: bool = True) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_process(proc)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kick(self, user: str) -> None:
        """End the user's sessions from the server's side (``doveadm kick``: 421 and close)."""
        subprocess.run(["doveadm", "-c", str(self.directory / "dovecot.conf"), "kick", user],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=True)

    def logins(self) -> list[str]:
        """The log's successful login lines of the submission service."""
        return re.findall(r"submission-login: Info: Login: .*", self.log())


# --- Postfix --------------------------------------------------------------------------------

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
myhostname = postfix.test
mydomain = test
myorigin = $myhostname
mydestination =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [127.0.0.1]:{relay_port}
smtp_tls_security_level = none
biff = no
{extra}"""

# No inet service: mail enters through sendmail (postdrop -> pickup) only.
_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix whose only way out is the relay at 127.0.0.1:``relay_port``.

    ``extra`` is appended to main.cf (e.g. SMTP AUTH settings for the relay).
    """

    def __init__(self, relay_port: int, *, extra: str = "") -> None:
        self.relay_port = relay_port
        self.extra = extra
        self.directory = _private_directory("postfix-")
        self.config_dir = self.directory / "etc"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def maillog_file(self) -> Path:
        return self.directory / "maillog"

    def maillog(self) -> str:
        try:
            return self.maillog_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30) -> Postfix:
        self.config_dir.mkdir()
        (self.config_dir / "main.cf").write_text(_MAIN_CF.format(
            dir=self.directory, relay_port=self.relay_port, extra=self.extra))
        (self.config_dir / "master.cf").write_text(_MASTER_CF)
        (self.directory / "queue").mkdir()
        data = self.directory / "data"
        data.mkdir()
        shutil.chown(data, "postfix", "postfix")   # the master's lock file lives there
        # start-fg: the master stays this process's child (stopped and reaped by pid).
        with open(self.directory / "stdio.log", "ab") as out:
            self._proc = subprocess.Popen(
                [str(_POSTFIX), "-c", str(self.config_dir), "start-fg"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        pickup = self.directory / "queue" / "public" / "pickup"
        deadline = time.monotonic() + timeout
        while not ("daemon started" in self.maillog() and pickup.exists()):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Postfix did not start; its log:\n{self.maillog()}\n"
                                   f"{(self.directory / 'stdio.log').read_text()}")
            time.sleep(0.05)
        return self

    def sendmail(self, sender: str, recipients: list[str], data: bytes) -> None:
        """Submit as a local program would: Postfix's sendmail with this instance's config."""
        res = subprocess.run(
            [str(_SENDMAIL), "-C", str(self.config_dir), "-f", sender, "-i", "--",
             *recipients], input=data, capture_output=True, timeout=30, check=False)
        if res.returncode != 0:
            raise AssertionError(f"sendmail exited {res.returncode}: {res.stderr!r}\n"
                                 f"{self.maillog()}")

    def _master_pid(self) -> int | None:
        try:
            return int((self.directory / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """What ``postfix stop`` does, without its polling: SIGTERM to the master (it ends
        its processes and the postfix-script that waits for it)."""
        proc, self._proc = self._proc, None
        master = self._master_pid()
        if proc is not None:
            if master is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(master, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            _stop_process(proc)
        if master is not None:    # the master runs in a session (and group) of its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(master, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)
