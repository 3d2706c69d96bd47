"""A health probe for places that have no HTTP client: Docker's HEALTHCHECK, exec probes.

The python:3.11-slim image has no curl or wget, and adding one to the image only for this
would grow it and its attack surface; the relay's own interpreter is already there. The
probe asks the relay's HTTP endpoint (``/healthz``, or ``/readyz`` with ``--ready``) at the
address from the same config file the relay runs with, so a changed port needs no second
edit. With ``--smtp``, or when the HTTP endpoint is disabled, it reads the SMTP greeting of
the first listener instead. Exit status 0 means healthy, 1 unhealthy (what Docker expects).
With ``--ready`` a profile whose upstream login or SendAs keeps being refused makes it 1
too, and the output names the profile, the upstream's reply and the fix.

Run as ``python -m relay.healthcheck [--config PATH] [--ready | --smtp]``.
"""

from __future__ import annotations

import argparse
import ipaddress
import smtplib
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from relay.config import DEFAULT_CONFIG_PATH, Config, ConfigError, parse_config
from relay.core.net import host_port

HEALTHY, UNHEALTHY = 0, 1
# Of the answer's body, this much is shown: enough for /readyz's reasons (an upstream reply
# and its fix are a few hundred characters), well within what Docker keeps of a
# health check's output (4 KiB).
_BODY = 2048


def reachable(address: str) -> str:
    """A wildcard bind address is not something to connect to: use loopback instead."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return address


def http_target(config: Config) -> tuple[str, int] | None:
    """(address, port) of the HTTP endpoint, or None when the config disables it."""
    if not config.http.enabled:
        return None
    return reachable(config.http.address), config.http.port


def probe_http(address: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """GET ``path``; healthy only on a 2xx answer."""
    url = f"http://{host_port(address, port)}{path}"
    # No proxy: HTTP_PROXY/HTTPS_PROXY are set for the relay's way out to Entra ID and
    # would send a probe of loopback to the proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            body = resp.read(_BODY).decode("utf-8", "replace").strip()
            return 200 <= resp.status < 300, f"{url}: {resp.status} {body}".rstrip()
    except urllib.error.HTTPError as exc:
        body = exc.read(_BODY).decode("utf-8", "replace").strip()
        return False, f"{url}: {exc.code} {body}".rstrip()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return False, f"{url}: {reason}"


def probe_smtp(address: str, port: int, timeout: float) -> tuple[bool, str]:
    """Greeting, NOOP, QUIT: the listener accepts and its event loop answers."""
    where = f"smtp://{host_port(address, port)}"
    try:
        with smtplib.SMTP(address, port, timeout=timeout) as smtp:
            code, _ = smtp.noop()
            return code == 250, f"{where}: greeting and NOOP {code}"
    except (OSError, smtplib.SMTPException) as exc:
        return False, f"{where}: {exc}"


def load(path: Path) -> Config:
    """The config as the relay reads it, without reading secrets or checking files.

    The probe needs only addresses and ports; failing because a secret is not in *its*
    environment would report a healthy relay as broken.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read: {exc.strerror or exc}")]) from None
    except yaml.YAMLError:
        raise ConfigError(str(path), [("", "invalid YAML")]) from None
    return parse_config(data, str(path), path.resolve().parent,
                        check_secrets=False, check_files=False)


def check(config: Config, *, ready: bool = False, smtp: bool = False,
          timeout: float = 5.0) -> tuple[bool, str]:
    """Probe the running relay described by ``config``.

    ``smtp`` asks the first listener instead of the HTTP endpoint: the HTTP endpoint
    answers while the spool is still being recovered, the listener only once mail can be
    handed over — what a sidecar's startup probe must wait for.
    """
    target = None if smtp else http_target(config)
    if target is not None:
        if target[1] == 0:
            return False, "http.port is 0 (any free port): set a fixed port to probe it"
        return probe_http(*target, "/readyz" if ready else "/healthz", timeout)
    listener = config.server.listeners[0]
    if listener.tls == "implicit":
        return False, "the first listener is implicit TLS: probe it through http: instead"
    if listener.port == 0:
        return False, "the first listener's port is 0 (any free port): nothing to probe"
    return probe_smtp(reachable(listener.address), listener.port, timeout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's options (``--ready``, ``--smtp``, ``--timeout``)."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--ready", action="store_true",
                      help="ask /readyz (able to deliver) instead of /healthz (alive)")
    what.add_argument("--smtp", action="store_true",
                      help="read the SMTP greeting of the first listener instead "
                           "(accepting mail, whatever the upstream's state)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="give up after this long (default 5)")


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Entry point with ``args.config``, ``args.ready``, ``args.smtp``, ``args.timeout``."""
    try:
        config = load(Path(args.config))
    except ConfigError as exc:
        print(f"unhealthy: {exc.render()}", file=sys.stderr)
        return UNHEALTHY
    ok, detail = check(config, ready=args.ready, smtp=args.smtp, timeout=args.timeout)
    print(f"{'healthy' if ok else 'unhealthy'}: {detail}", file=sys.stdout if ok else sys.stderr)
    return HEALTHY if ok else UNHEALTHY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.healthcheck",
                                     description="Probe a running smtp-oauth-relay.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help=f"the relay's configuration file (default: {DEFAULT_CONFIG_PATH})")
    add_arguments(parser)
    return cmd_healthcheck(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
