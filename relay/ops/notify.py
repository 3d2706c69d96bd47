"""Tell systemd how the relay is doing (sd_notify), without libsystemd or a new dependency.

With ``Type=notify`` systemd considers the service started only when it says ``READY=1``,
i.e. once the spool is recovered and every listener accepts connections — so units ordered
``After=smtp-oauth-relay.service`` (the legacy applications) start when mail can really be
sent. ``WatchdogSec=`` lets systemd restart a relay whose event loop is stuck: the pings
come from a task on that loop, so they stop exactly when the loop stops making progress.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named in
$NOTIFY_SOCKET (a path, or an abstract name written with a leading ``@``). Without that
variable (a terminal, Docker, Kubernetes) every function here does nothing and returns
False, so callers never need to check where they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_warned = False


def _address() -> str | None:
    """The notification socket as ``socket.connect`` wants it, or None when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # Linux abstract namespace
    if path.startswith("/"):
        return path
    return None  # unset, or a kind we do not speak (e.g. vsock: for VMs)


def _status(text: str | None) -> list[str]:
    """A STATUS= field, on one line: a newline in it would start a new (forged) field."""
    return [f"STATUS={' '.join(text.split())}"] if text else []


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) as one message; True if it was handed over.

    The socket is non-blocking: the relay's event loop must never wait on systemd, and a
    lost status or ping is harmless (a lost watchdog ping is covered by the next one).
    """
    global _warned
    address = _address()
    if address is None or not fields:
        return False
    payload = "\n".join(fields).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(payload, address)
    except OSError as exc:
        # Once at warning, then quietly: a broken socket would otherwise flood the log
        # with one line per watchdog ping.
        level = logging.DEBUG if _warned else logging.WARNING
        _warned = True
        log.log(level, "cannot notify systemd at $NOTIFY_SOCKET: %s", exc.strerror or exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Start-up (or a reload) is complete: mail is accepted from now on."""
    return notify("READY=1", *_status(status))


def reloading(status: str | None = None) -> bool:
    """A reload has begun; follow it with :func:`ready` when it is done (or refused).

    MONOTONIC_USEC is what ``Type=notify-reload`` (systemd >= 253) requires to match the
    message with the SIGHUP it sent; older systemd ignores the extra field.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
    return notify(*fields, *_status(status))


def stopping(status: str | None = None, timeout: float | None = None) -> bool:
    """Shutdown has begun. ``timeout``: ask for that long before systemd sends SIGKILL.

    The drain may last up to ``delivery.shutdown_timeout``; extending the stop timeout
    from here keeps a too-short ``TimeoutStopSec=`` from killing deliveries half-way.
    """
    fields = ["STOPPING=1", *_status(status)]
    if timeout is not None and timeout > 0:
        fields.append(f"EXTEND_TIMEOUT_USEC={int(timeout * 1_000_000)}")
    return notify(*fields)


def watchdog_interval() -> float | None:
    """Seconds between pings (half of $WATCHDOG_USEC), or None when no watchdog is asked for.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for: a child that
    inherited the environment must not ping on its parent's behalf.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0 or _address() is None:
        return None
    return usec / 2 / 1_000_000


async def watchdog(interval: float, healthy: Callable[[], bool] | None = None) -> None:
    """Ping every ``interval`` seconds for as long as the event loop runs this task.

    ``healthy`` (optional) can withhold a ping, e.g. when a stage the loop does not see
    has died: systemd then restarts the relay after ``WatchdogSec=``.
    """
    while True:
        if healthy is None or healthy():
            notify("WATCHDOG=1")
        else:
            log.warning("watchdog ping withheld: the relay reports itself unhealthy")
        await asyncio.sleep(interval)


def start_watchdog(healthy: Callable[[], bool] | None = None) -> asyncio.Task[None] | None:
    """Start :func:`watchdog` on the running loop when systemd asks for one, else None.

    Call it once the relay is ready: systemd enforces ``WatchdogSec=`` only from READY=1,
    and the start-up itself is bounded by ``TimeoutStartSec=``.
    """
    interval = watchdog_interval()
    if interval is None:
        return None
    log.debug("systemd watchdog: pinging every %.1f s", interval)
    return asyncio.get_running_loop().create_task(watchdog(interval, healthy),
                                                  name="systemd-watchdog")


async def stop_watchdog(task: asyncio.Task[None] | None) -> None:
    """Cancel a task from :func:`start_watchdog` and wait for it (None is fine)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
