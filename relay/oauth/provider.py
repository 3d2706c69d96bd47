"""One credential's token: cached, fetched once for all callers, renewed before it expires.

- :class:`TokenProvider`: the token of one configured credential, shared by every upstream
  session that uses it: :meth:`~TokenProvider.get` hands out the cached token,
  :meth:`~TokenProvider.refresh` replaces one Exchange rejected, and a background task
  renews it ``refresh_before`` ahead of expiry;
- :data:`MIN_USABLE`: a cached token with less time left than this is not handed out
  while a fetch fails; :data:`BACKOFF_MIN` / :data:`BACKOFF_MAX`: the refresher's backoff.

Every upstream session needs a token, and fetching one per session is slow and gets an app
throttled by Entra ID. So any number of concurrent callers share a single in-flight fetch,
and mail keeps flowing on the current token while Entra ID is briefly unavailable.

msal does the protocol work (OIDC discovery, client secret or certificate assertion) but is
synchronous and does blocking network I/O, even in its constructor, so it only ever runs in
the provider's worker thread, never on the event loop. Our cache is authoritative: msal's
own cache would keep returning a token until 5 minutes before expiry and cannot be told to
refresh early (or after Exchange rejected it), so it is cleared before every fetch.

Errors become :class:`~relay.oauth.token.TokenError` (see :mod:`relay.oauth.advice`) with
a message that says what to fix and never contains a secret or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeGuard

from relay.config import Credential
from relay.core.events import NO_HOOKS, Hooks
from relay.core.log import redact
from relay.core.secrets import Secret
from relay.oauth.advice import TRANSIENT_ERRORS, entra_code, explain_entra_error, explain_exception
from relay.oauth.clients import TokenClient, build_client, fingerprint, token_endpoint
from relay.oauth.http import HTTP_TIMEOUT, EntraSession
from relay.oauth.token import Token, TokenError, decode_claims

log = logging.getLogger(__name__)

# msal's DEBUG output describes every token response (token masked, but its shape and
# type are logged); keep it at WARNING unless someone configured the logger explicitly.
if logging.getLogger("msal").level == logging.NOTSET:
    logging.getLogger("msal").setLevel(logging.WARNING)

MIN_USABLE = 30.0  # a cached token with less left than this is not handed out on failure
BACKOFF_MIN = 5.0
BACKOFF_MAX = 60.0
_MAX_SLEEP = 30.0  # the refresher re-checks at least this often (clock jumps, suspend)


class TokenProvider:
    """The token of one credential, shared by every upstream session that uses it."""

    def __init__(self, name: str, credential: Credential, *,
                 clock: Callable[[], float] = time.time, hooks: Hooks = NO_HOOKS,
                 scopes: list[str] | None = None) -> None:
        self.name = name
        self.credential = credential
        # The resource the tokens are for: the SMTP upstream's unless told (Graph's).
        self.scopes = scopes if scopes is not None else credential.scopes
        self._clock = clock
        self._hooks = hooks
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"token-{name}")
        # Worker-thread state: only touched from the executor's single thread.
        self._app: TokenClient | None = None
        self._material = b""        # fingerprint() of what the client was built with
        self._session: EntraSession | None = None
        # Event-loop state.
        self._token: Token | None = None
        self._refresh_at = 0.0  # when the background refresher replaces the token
        self._retry_after = 0.0
        self._inflight: asyncio.Task[Token] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self._warned_lifetime = False

    def __repr__(self) -> str:
        return f"TokenProvider({self.name!r})"

    @property
    def current(self) -> Token | None:
        """The cached token, if any (for status pages; may be near expiry)."""
        return self._token

    # --- public API ------------------------------------------------------------------------

    async def get(self) -> Token:
        """A valid token, from the cache while it is fresh, else freshly fetched."""
        token = self._token
        now = self._clock()
        if token is not None and token.expires_in(now) > self.credential.refresh_before:
            return token
        if self._usable(token, now):
            # Due for renewal but still good: renew in the background (unless a fetch just
            # failed: the refresher retries with backoff). Mail must not wait on a slow or
            # hanging Entra ID while the token it has works.
            if now >= self._retry_after:
                self._start_fetch()
            return token
        try:
            return await self._shared_fetch()
        except TokenError:
            token = self._token
            if self._usable(token, self._clock()):
                return token  # the fetch already logged a warning
            raise

    async def refresh(self, stale: Token | None = None) -> Token:
        """A token other than ``stale`` (rejected upstream); one fetch for many callers."""
        current = self._token
        if (current is not None and stale is not None
                and current.access_token != stale.access_token):
            return current
        return await self._shared_fetch()

    def start(self) -> None:
        """Launch the background refresher (call from the running event loop)."""
        if self._closed:
            raise RuntimeError(f"token provider {self.name!r} is closed")
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"token-refresh-{self.name}")

    def close(self) -> None:
        """Stop refreshing and release the worker; safe to call without a running loop.

        A fetch in flight is left to finish, so a delivery still holding this provider
        (during a config reload) gets its token instead of a surprise cancellation.
        """
        if self._closed:
            return
        self._closed = True
        if self._refresher is not None and not self._refresher.done():
            self._refresher.cancel()
        self._executor.submit(self._close_blocking)
        self._executor.shutdown(wait=False)

    async def aclose(self) -> None:
        """Close at shutdown: also cancel a fetch in flight (its thread finishes alone)."""
        self.close()
        tasks = [t for t in (self._refresher, self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, TokenError):
                await task

    # --- fetching --------------------------------------------------------------------------

    @staticmethod
    def _usable(token: Token | None, now: float) -> TypeGuard[Token]:
        return token is not None and token.expires_in(now) > MIN_USABLE

    def _shared_fetch(self) -> asyncio.Future[Token]:
        """Join the fetch in flight or start one; a caller's cancellation does not stop it."""
        return asyncio.shield(self._start_fetch())

    def _start_fetch(self) -> asyncio.Task[Token]:
        """The fetch in flight, or a new one; nobody needs to await it."""
        if self._inflight is None or self._inflight.done():
            task = asyncio.get_running_loop().create_task(self._fetch(),
                                                          name=f"token-fetch-{self.name}")
            task.add_done_callback(_consume_exception)
            self._inflight = task
        return self._inflight

    async def _fetch(self) -> Token:
        if self._closed:
            raise TokenError(f"credential {self.name!r} was removed or changed by a "
                             "configuration reload; retry", transient=True)
        started = self._clock()
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._acquire_blocking)
        except TokenError as exc:
            self._failed(exc)
            raise
        except Exception as exc:
            if self._closed:  # the executor was shut down by close() meanwhile
                raise TokenError(f"credential {self.name!r} was removed or changed by a "
                                 "configuration reload; retry", transient=True) from None
            log.debug("token fetch for credential %s failed", self.name, exc_info=True)
            error = explain_exception(exc, self.name, self.credential.authority_url)
            self._failed(error)
            raise error from None
        if not isinstance(result, dict):
            result = {"error": "invalid_response",
                      "error_description": "the token endpoint returned no JSON object"}
        access_token = result.get("access_token")
        if not access_token:
            refused = TokenError(f"credential {self.name!r}: " + explain_entra_error(result),
                                 code=entra_code(result),
                                 transient=str(result.get("error")) in TRANSIENT_ERRORS)
            self._failed(refused)
            raise refused
        redact(access_token)
        try:
            lifetime = float(result.get("expires_in", 0))
        except (TypeError, ValueError):
            lifetime = 0.0
        token = Token(Secret(access_token), started + lifetime, decode_claims(access_token),
                      obtained_at=started)
        # The refresher renews refresh_before ahead of expiry, but not before half-way
        # through a token's life: tokens shorter than refresh_before must not make it spin.
        self._refresh_at = token.expires_at - min(self.credential.refresh_before, lifetime / 2)
        if lifetime <= self.credential.refresh_before and not self._warned_lifetime:
            self._warned_lifetime = True
            log.warning("credential %s: tokens live %d s, not longer than refresh_before "
                        "(%d s): every message will fetch a new token; lower refresh_before",
                        self.name, lifetime, self.credential.refresh_before)
        self._token = token
        self._retry_after = 0.0
        log.info("token for credential %s acquired, expires in %d s", self.name, lifetime,
                 extra={"credential": self.name, "expires_in": int(lifetime)})
        return token

    def _failed(self, exc: TokenError) -> None:
        now = self._clock()
        self._retry_after = now + BACKOFF_MIN
        self._hooks.token_error(self.name)
        token = self._token
        fields = {"credential": self.name, "code": exc.code, "transient": exc.transient}
        if self._usable(token, now):
            assert token is not None
            log.warning("token refresh failed, still using the current token (valid %d s "
                        "more): %s", token.expires_in(now), exc.message, extra=fields)
        else:
            log.error("no token: %s", exc.message, extra=fields)

    def _acquire_blocking(self) -> dict[str, Any]:
        """Runs in the worker thread: (re)build the client if needed, then fetch a fresh
        token. The client is rebuilt when the credential's material changed on disk (a
        rotated secret or certificate) and after a failure that is not transient."""
        authority = token_endpoint(self.credential)
        try:
            if self._closed:
                raise TokenError(f"credential {self.name!r} is closed", transient=True)
            if self._session is None:
                cred = self.credential
                self._session = EntraSession(str(cred.ca_file) if cred.ca_file else None,
                                              HTTP_TIMEOUT)
            now = fingerprint(self.credential)
            if self._app is None or now != self._material:
                if self._app is not None:
                    log.info("credential %s: its %s changed on disk; using the new one",
                             self.name, self.credential.kind)
                self._app, self._material = build_client(self.name, self.credential,
                                                         self._session), now
            result = self._app.fetch(self.scopes)
        except Exception as exc:
            log.debug("token fetch for credential %s failed", self.name, exc_info=True)
            error = explain_exception(exc, self.name, authority)
            if not error.transient:
                self._app = None  # re-read secret / rebuild on the next attempt
            raise error from None
        if (isinstance(result, dict) and "access_token" not in result
                and str(result.get("error")) not in TRANSIENT_ERRORS):
            self._app = None  # e.g. a rotated secret file is picked up on the next attempt
        return result

    def _close_blocking(self) -> None:
        self._app = None
        if self._session is not None:
            self._session.close()

    # --- background refresh ------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        """Keep a fresh token ready; never dies, backs off (with jitter) on failures."""
        delay = BACKOFF_MIN
        while True:
            try:
                if self._token is None or self._clock() >= self._refresh_at:
                    await self._shared_fetch()
                    delay = BACKOFF_MIN
                # At least a second between fetches, even if Entra ID hands out tokens
                # that are due for refresh at once (tiny or missing expires_in).
                wait = self._refresh_at - self._clock()
                await asyncio.sleep(min(max(wait, 1.0), _MAX_SLEEP))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                pause = delay * random.uniform(0.8, 1.2)
                if not isinstance(exc, TokenError):
                    log.exception("token refresher for credential %s: unexpected error",
                                  self.name)
                log.debug("token refresher for credential %s: retrying in %.0f s",
                          self.name, pause)
                self._retry_after = self._clock() + pause
                delay = min(delay * 2, BACKOFF_MAX)
                await asyncio.sleep(pause)


def _consume_exception(task: asyncio.Task[Token]) -> None:
    """Mark a failed fetch's exception as retrieved when every caller went away."""
    if not task.cancelled():
        task.exception()
