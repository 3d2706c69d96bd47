"""Logging: one line per event on stderr, with a timestamp and the message id.

The message id is carried in a context variable, so every line logged while a message is
being handled, in any module, names that message without passing the id around. The
formatter also scrubs known secret values as a last line of defence, and the libraries
that would log protocol lines (aiosmtpd logs AUTH exchanges at INFO) are kept quiet.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

message_id: contextvars.ContextVar[str] = contextvars.ContextVar("message_id", default="-")

# Loggers that see protocol lines or HTTP bodies; they never go below WARNING.
_NOISY = ("mail.log", "aiosmtpd", "aiosmtplib", "msal", "urllib3", "requests", "asyncio")
# urllib3 warns "Retrying (Retry(total=0, ...)) after connection broken by ..." before the
# request to Entra ID fails for good, and the failure is then logged once, explained
# (relay.oauth.advice); its pool's other warnings are as little use to an operator.
_CHATTY = ("urllib3.connectionpool",)

# Insertion-ordered and capped: tokens are registered as they are issued, for years.
_redactions: dict[str, None] = {}
_MAX_REDACTIONS = 256


def redact(value: str) -> None:
    """Register a secret value (token, client secret) that must never appear in a log line."""
    if value and len(value) >= 6:
        _redactions.pop(value, None)
        _redactions[value] = None
        while len(_redactions) > _MAX_REDACTIONS:
            del _redactions[next(iter(_redactions))]


def _scrub(text: str) -> str:
    for value in list(_redactions):
        if value in text:
            text = text.replace(value, "[REDACTED]")
    return text


def scrub(text: str) -> str:
    """``text`` with every registered secret value replaced, for what the relay shows
    elsewhere than in its log (the HTTP endpoint's pages): the same last line of defence."""
    return _scrub(text)


class message_context:
    """Every line logged inside the block names message ``mid``. A class rather than a
    generator with @contextmanager, which costs several times as much, some six times
    per message."""

    __slots__ = ("_mid", "_token")

    def __init__(self, mid: str) -> None:
        self._mid = mid

    def __enter__(self) -> None:
        self._token = message_id.set(self._mid)

    def __exit__(self, *exc: object) -> None:
        message_id.reset(self._token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "msgid"):
            record.msgid = message_id.get()
        return True


_last_second: tuple[int, str] = (-1, "")


def _utc_second(created: float) -> str:
    """``created`` to the second, in UTC, whatever the machine's time zone (the Z after
    the milliseconds says so). The text of the last second is kept: most lines fall in
    the same second as the one before, and strftime cost 1 % of the relay's CPU. (The
    tuple is swapped whole, so a line logged from another thread reads a matching pair.)"""
    global _last_second
    second = int(created)
    cached = _last_second
    if cached[0] != second:
        cached = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                       time.gmtime(second)))
    return cached[1]


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s [%(msgid)s] "
                         "%(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_second(record.created)

    def format(self, record: logging.LogRecord) -> str:
        return _scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; extra fields given to a call are kept."""

    _STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"msgid", "message"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": f"{_utc_second(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msgid": getattr(record, "msgid", "-"),
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in self._STD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _scrub(json.dumps(out, default=str))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    # What neither format shows is not collected for every record: the caller's file and
    # line (a walk up the stack), the process, thread and multiprocessing names. The
    # logging HOWTO's "Optimization" section names these switches.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    logging.getLogger().handlers[:] = [handler]
    reconfigure(level, fmt)


def reconfigure(level: str, fmt: str) -> None:
    """Change the level and the format of the logging :func:`setup_logging` set up, in
    place: a reload takes ``logging:`` at once, and the handlers (and whatever else was
    added to the root logger, such as a test's) stay."""
    root = logging.getLogger()
    for handler in root.handlers:
        if any(isinstance(f, _ContextFilter) for f in handler.filters):
            handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.setLevel(level.upper())
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(logging.ERROR, root.level))
