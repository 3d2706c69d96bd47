"""Microsoft Graph's sendMail on 127.0.0.1, over HTTPS, as strict as the real one.

It checks what Graph checks before it takes a message: a bearer token for Graph (audience
``https://graph.microsoft.com``), an app allowed to send as the mailbox (the ``Mail.Send``
application permission for every mailbox, or an RBAC for Applications assignment for
some; ``ErrorAccessDenied`` otherwise), a mailbox that exists and has Exchange Online
behind it (``MailboxNotEnabledForRESTAPI`` otherwise), MIME as base64 in a
``text/plain`` body under the request limit, a From the mailbox may send as
(``ErrorSendAsDenied``), and at least one recipient in To, Cc or Bcc: Graph has no
envelope. What it takes is kept with the recipients Graph would deliver to. Faults can
be queued: 429 with Retry-After, 503, or any status and error code. Given a directory, it
keeps each message taken there as a file, as the fake Exchange does.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import fnmatch
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from relay.core.graphsize import GRAPH_REQUEST_LIMIT
from relay.core.headerfields import named_addresses, parse_header
from relay.sandbox.https import HTTPSServer, JSONHandler, serve
from relay.sandbox.pki import LocalPKI

GRAPH_AUDIENCE = "https://graph.microsoft.com"
TokenValidator = Callable[[str], dict[str, Any]]   # claims, or raises


@dataclass(frozen=True)
class GraphMessage:
    """A message Graph took: the mailbox it was sent as, who it goes to, the MIME."""

    mailbox: str
    recipients: list[str]
    mime: bytes


@dataclass
class _Fault:
    status: int
    code: str
    message: str
    retry_after: int | None


class _Handler(JSONHandler):
    server_version = "FakeGraph/1.0"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > GRAPH_REQUEST_LIMIT:
            self.reply(413, _body("RequestBodyTooLarge",
                                  "The maximum request length supported is 4MB."))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        status, answer, retry_after = self.server.owner._post(
            self.path, self.headers.get("Content-Type", ""),
            self.headers.get("Authorization") or "", body)
        self.reply(status, answer,
                   None if retry_after is None else {"Retry-After": str(retry_after)})


def _body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class FakeGraph:
    """POST /v1.0/users/{mailbox}/sendMail, with the checks Graph makes."""

    def __init__(self, pki: LocalPKI, validate_token: TokenValidator, *,
                 maildir: Path | None = None) -> None:
        self._pki = pki
        self.maildir = maildir          # where each message taken is kept, as .eml
        self._validate = validate_token
        self._lock = threading.Lock()
        self._mailboxes: dict[str, set[str]] = {}   # mailbox -> addresses it may send as
        self._faults: list[_Fault] = []
        # Mailboxes the app may use through RBAC for Applications ("Application Mail.Send"
        # scoped to them), besides every mailbox when its token has the Mail.Send role.
        self.rbac: set[str] = set()
        self.rest_disabled: set[str] = set()   # mailboxes on-premises or unlicensed
        self.messages: list[GraphMessage] = []
        self.requests = 0
        self.tokens_refused = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._server: HTTPSServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def add_mailbox(self, mailbox: str, *send_as: str) -> None:
        """A mailbox that exists, which may send as itself and as ``send_as``: addresses
        or globs such as ``*@contoso.com`` (``@contoso.com``), as Add-RecipientPermission
        grants them."""
        patterns = {("*" + p if p.startswith("@") else p).lower() for p in send_as}
        with self._lock:
            self._mailboxes.setdefault(mailbox.lower(), {mailbox.lower()}).update(patterns)

    def fail_next(self, status: int, code: str = "", message: str = "", *,
                  retry_after: int | None = None, count: int = 1) -> None:
        """Answer the next ``count`` requests (with a good token) with this error."""
        with self._lock:
            self._faults.extend([_Fault(status, code, message, retry_after)] * count)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeGraph:
        self._server, self._thread = serve(self, _Handler, self._pki, self.host, "fake-graph")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(self._thread)

    def __enter__(self) -> FakeGraph:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- sendMail (server threads) -------------------------------------------------------

    def _post(self, path: str, content_type: str, authorization: str,
              body: bytes) -> tuple[int, dict[str, Any] | None, int | None]:
        with self._lock:
            self.requests += 1
        prefix, _, rest = path.partition("/v1.0/users/")
        mailbox, _, action = rest.partition("/")
        if prefix or action != "sendMail":
            return 404, _body("UnknownError", f"Resource not found for {path}"), None
        mailbox = unquote(mailbox).lower()
        scheme, _, token = authorization.partition(" ")
        try:
            if scheme.lower() != "bearer" or not token:
                raise ValueError("no bearer token")
            claims = self._validate(token)
            if not str(claims.get("aud", "")).startswith(GRAPH_AUDIENCE):
                raise ValueError(f"wrong audience {claims.get('aud')!r}")
        except Exception as exc:        # whatever the validator raises: not a good token
            with self._lock:
                self.tokens_refused += 1
            return 401, _body("InvalidAuthenticationToken",
                              f"Access token validation failure: {exc}"), None
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
            sendable = self._mailboxes.get(mailbox)
            in_scope = mailbox in self.rbac
            rest_disabled = mailbox in self.rest_disabled
        if fault is not None:
            return fault.status, _body(fault.code, fault.message), fault.retry_after
        if "scp" in claims:        # a user's delegated token: Mail.Send, as that user only
            if "Mail.Send" not in str(claims["scp"]).split() \
                    or str(claims.get("upn", "")).lower() != mailbox:
                return 403, _body("ErrorAccessDenied", "Access is denied. Check "
                                  "credentials and try again."), None
        elif "Mail.Send" not in claims.get("roles", []) and not in_scope:
            return 403, _body("ErrorAccessDenied",
                              "Access is denied. Check credentials and try again."), None
        if sendable is None:
            return 404, _body("ErrorInvalidUser",
                              f"The requested user '{mailbox}' is invalid."), None
        if rest_disabled:
            return 404, _body("MailboxNotEnabledForRESTAPI",
                              "The mailbox is either inactive, soft-deleted, or is hosted "
                              "on-premise."), None
        if content_type.split(";")[0].strip().lower() != "text/plain":
            return 400, _body("ErrorMimeContentInvalid",
                              "MIME content must be sent as text/plain base64."), None
        try:
            mime = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return 400, _body("ErrorMimeContentInvalidBase64String",
                              "Invalid base64 string for MIME content."), None
        header = parse_header(mime)
        recipients = named_addresses(header, ("To", "Cc", "Bcc"))
        if not recipients:
            return 400, _body("ErrorInvalidRecipients",
                              "At least one recipient is not valid."), None
        sender = email.utils.parseaddr(str(header.get("From", "")))[1].lower()
        if sender and not any(fnmatch.fnmatchcase(sender, p) for p in sendable):
            return 403, _body("ErrorSendAsDenied",
                              "The user account which was used to submit this request does "
                              "not have the right to send mail on behalf of the specified "
                              "sending account."), None
        with self._lock:
            self.messages.append(GraphMessage(mailbox, recipients, mime))
            number = len(self.messages)
        if self.maildir is not None:
            (self.maildir / f"graph-{number:06d}.eml").write_bytes(mime)
        return 202, None, None

