"""Microsoft Graph's sendMail as the way out, for tenants where SMTP AUTH is switched off.

- :class:`GraphClient`: one Graph endpoint with its HTTPS connections kept open:
  :meth:`~GraphClient.prepare` turns a queued message into the MIME Graph is to send (or
  says why Graph cannot send it), :meth:`~GraphClient.send` posts it as a mailbox;
- :func:`graph_reply`: what Graph's answer means, as the SMTP reply the queue acts on.

Graph has no envelope: it sends to the addresses in the message's To, Cc and Bcc fields.
The relay removed the client's Bcc when it took the message (as Postfix's cleanup does),
so it adds one naming the envelope recipients that To and Cc do not, and Exchange keeps
that field out of what the recipients see. A message whose To or Cc names someone who is
*not* an envelope recipient cannot be sent over Graph as addressed (Graph would deliver
to them too): like one over Graph's request limit, it goes over SMTP when the profile
allows (``fallback_to_smtp``), and is otherwise refused with a reply that says why.

requests does the HTTP (it is msal's, and already trusted with Entra ID); it is
synchronous, so each request runs on a thread of the client's own, a few at a time
(Graph allows four concurrent requests per mailbox).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from relay.config import Graph
from relay.core.errors import causes
from relay.core.graphsize import too_big_for_graph
from relay.core.headerfields import named_addresses, parse_header
from relay.core.log import redact
from relay.core.message import DeliveryResult, Outbound
from relay.core.reply import Reply
from relay.core.text import one_line, truncate
from relay.deliver.failures import AuthenticationRejected
from relay.deliver.session import HasAccessToken
from relay.oauth.http import EntraSession

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 10.0
_WORKERS = 4                  # requests in flight at once, all mailboxes together
_RETRY_AFTER_DEFAULT = 60.0   # a 429 without Retry-After
_RETRY_AFTER_MAX = 3600.0


@dataclass(frozen=True)
class Prepared:
    """A message made ready for sendMail: the MIME, and the envelope it stands for."""

    mime: bytes
    recipients: list[str]


class GraphClient:
    """One Graph endpoint (``base_url``, e.g. https://graph.microsoft.com)."""

    def __init__(self, base_url: str, settings: Graph) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = EntraSession(str(settings.ca_file) if settings.ca_file else None,
                                  (_CONNECT_TIMEOUT, settings.timeout))
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=_WORKERS, max_retries=0)
        self._http.mount("https://", adapter)
        self._executor = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="graph")
        # Messages read into memory at once (each up to 3 MB, 4 MB more as base64): the
        # queue may run a hundred attempts at a time, and memory must not follow.
        self.slots = asyncio.Semaphore(_WORKERS)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # --- what Graph can send ---------------------------------------------------------------

    async def prepare(self, msg: Outbound) -> Prepared | Reply:
        """The MIME to post for ``msg``, or why Graph cannot send it as addressed (too
        big; To or Cc naming someone outside the envelope): the caller's refusal, or its
        reason to send over SMTP instead."""
        too_big = too_big_for_graph(msg.content.size, msg.rcpt_tos, refusal=False)
        if too_big is not None:
            return too_big
        parts = [chunk async for chunk in msg.content.chunks()]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        del parts
        named = named_addresses(parse_header(data))
        envelope = {r.lower(): r for r in msg.rcpt_tos}
        outside = sorted({a for a in named if a.lower() not in envelope})
        if outside:
            return Reply(554, "5.6.0 Message cannot go over Microsoft Graph as addressed: "
                              "Graph sends to every address in To and Cc, and "
                              f"{truncate(', '.join(outside), 200)} is not a recipient of "
                              "the transaction")
        in_header = {a.lower() for a in named}
        blind = [r for r in msg.rcpt_tos if r.lower() not in in_header]
        if blind:
            # One address a line: a field of hundreds must stay within RFC 5322's 998.
            data = (b"Bcc: " + ",\r\n ".join(f"<{r}>" for r in blind).encode() + b"\r\n"
                    + data)
        return Prepared(data, list(msg.rcpt_tos))

    # --- sending -------------------------------------------------------------------------

    async def send(self, prepared: Prepared, mailbox: str,
                   token: HasAccessToken) -> DeliveryResult:
        """POST sendMail as ``mailbox``; raises :class:`AuthenticationRejected` for a
        refused token (401), so that the caller fetches a new one and tries once more."""
        started = time.monotonic()
        try:
            # Encoded on the worker thread: a few milliseconds per megabyte that the event
            # loop does not spend.
            response = await self._send_mail(mailbox, token,
                                             lambda: base64.b64encode(prepared.mime))
        except requests.RequestException as exc:
            result = DeliveryResult(self._unreachable(exc))
            self._log(mailbox, prepared, result.reply, started)
            return result
        reply, retry_after = _meaning(response, mailbox)
        self._log(mailbox, prepared, reply, started)
        if response.status_code == 401:
            raise AuthenticationRejected(reply)
        if reply.ok:
            return DeliveryResult(reply, list(prepared.recipients), authenticated=True)
        return DeliveryResult(reply, authenticated=True, retry_after=retry_after)

    async def probe(self, mailbox: str, token: HasAccessToken) -> tuple[int, Reply]:
        """A sendMail as ``mailbox`` that Graph must refuse (its body is not base64), for
        ``doctor``: Graph's status and what it means, and nothing is sent. 400 says the
        token was taken and the request got as far as reading the message."""
        try:
            response = await self._send_mail(mailbox, token,
                                             lambda: b"(not base64: nothing to send)")
        except requests.RequestException as exc:
            return 0, self._unreachable(exc)
        return response.status_code, _meaning(response, mailbox)[0]

    async def _send_mail(self, mailbox: str, token: HasAccessToken,
                         body: Callable[[], bytes]) -> requests.Response:
        """POST ``body()`` (made on the worker thread) to the mailbox's sendMail."""
        url = f"{self.base_url}/v1.0/users/{quote(mailbox, safe='@')}/sendMail"
        access = token.access_token.reveal()
        redact(access)

        def post() -> requests.Response:
            return self._http.post(url, data=body(), headers={
                "Authorization": f"Bearer {access}", "Content-Type": "text/plain"})

        return await asyncio.get_running_loop().run_in_executor(self._executor, post)

    def _unreachable(self, exc: requests.RequestException) -> Reply:
        return Reply(451, f"4.4.1 Microsoft Graph {self.base_url} unreachable: {_cause(exc)}")

    def _log(self, mailbox: str, prepared: Prepared, reply: Reply, started: float) -> None:
        level = logging.DEBUG if reply.ok else logging.WARNING
        if log.isEnabledFor(level):
            log.log(level, "graph %s mailbox=%s rcpts=%d reply=%s (%.2f s)", self.base_url,
                    mailbox, len(prepared.recipients), reply, time.monotonic() - started)


def graph_reply(status: int, error: tuple[str, str], retry_after: str | None,
                mailbox: str) -> tuple[Reply, float | None]:
    """Graph's answer to sendMail as an SMTP reply, with the Retry-After it asked for.

    Only what is about this message, or a setup Graph names (a mailbox the app may not
    use or send as), is permanent; throttling, Graph's own trouble and anything it does
    not explain are 4xx, so the message waits rather than bounces."""
    code, text = error
    said = f"{status} {code}: {one_line(text)}" if code else f"{status} {one_line(text)}"
    said = truncate(said, 300)
    if status == 202:
        return Reply(250, "2.0.0 Accepted by Microsoft Graph (sendMail 202)"), None
    if status == 401:
        return Reply(535, f"5.7.3 Microsoft Graph refused the token: {said}"), None
    if code == "ErrorSendAsDenied" or (status == 403 and "SendAs" in code):
        return Reply(550, f"5.7.60 SendAsDenied; {mailbox} may not send as the message's "
                          f"From address (Graph: {said})"), None
    if code == "MailboxNotEnabledForRESTAPI":
        return Reply(550, f"5.7.1 The mailbox {mailbox} cannot send through Microsoft "
                          f"Graph (Graph: {said}): it must be an Exchange Online mailbox "
                          "with a licence, not on-premises or inactive"), None
    if code == "ErrorAccessDenied" or status == 403:
        return Reply(550, f"5.7.1 Microsoft Graph denied the app access to {mailbox} "
                          f"(Graph: {said}): grant the app the Mail.Send application "
                          "permission with admin consent, and include the mailbox in its "
                          "RBAC for Applications scope (New-ManagementRoleAssignment -App "
                          "... -CustomResourceScope ...)"), None
    if status == 413:
        return Reply(552, f"5.3.4 Message too big for Microsoft Graph (Graph: {said})"), None
    if status in (429, 503, 504) or (status == 500 and retry_after):
        wait = _retry_after(retry_after)
        return Reply(451, f"4.7.0 Microsoft Graph is throttling {mailbox}; retrying after "
                          f"{wait:.0f} s (Graph: {said})"), wait
    if status in (400, 404):
        return Reply(554, f"5.6.0 Microsoft Graph refused the message (Graph: {said})"), None
    return Reply(451, f"4.4.0 Microsoft Graph could not take the message now "
                      f"(Graph: {said}); retrying"), None


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds (delta or HTTP date), within sane bounds."""
    if not value:
        return _RETRY_AFTER_DEFAULT
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return _RETRY_AFTER_DEFAULT
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 1.0), _RETRY_AFTER_MAX)


def _meaning(response: requests.Response, mailbox: str) -> tuple[Reply, float | None]:
    """:func:`graph_reply` for a response as requests has it."""
    return graph_reply(response.status_code, _error(response),
                       response.headers.get("Retry-After"), mailbox)


def _error(response: requests.Response) -> tuple[str, str]:
    """Graph's ``{"error": {"code", "message"}}``, or the start of a body that is not."""
    try:
        body: Any = response.json()
        error = body["error"]
        return str(error.get("code") or ""), str(error.get("message") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", truncate(response.text or response.reason or "", 200)


def _cause(exc: BaseException) -> str:
    """The innermost reason a request failed, in one line."""
    *_, innermost = causes(exc)
    return truncate(one_line(str(innermost)) or type(innermost).__name__, 200)
