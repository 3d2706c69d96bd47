"""Token providers against a real FakeEntra over HTTPS on loopback, with msal for real.

What matters to mail flow: one fetch however many sessions ask at once, a cached token
while it is fresh, a new one before expiry or after Exchange rejects it, the current token
kept while Entra ID is briefly down, and errors that say what to fix without leaking secrets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msal
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from relay.config import Config, Credential
from relay.core.secrets import Secret
from relay.oauth import clients as clients_module
from relay.oauth import provider as provider_module
from relay.oauth.advice import explain_entra_error
from relay.oauth.provider import TokenProvider
from relay.oauth.registry import Tokens
from relay.oauth.token import Token, TokenError
from relay.sandbox.entra import FakeEntra, InvalidToken
from relay.sandbox.pki import LocalPKI, create_pki
from tests.conftest import wait_until

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SECRET = "Xq8~sandbox.Secret-Value_0123456789abcd"
EXCHANGE = "https://outlook.office365.com"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY",
                "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def fake(pki: LocalPKI) -> Iterator[FakeEntra]:
    with FakeEntra(pki) as entra:
        entra.add_app(TENANT, CLIENT, secret=SECRET)
        yield entra


class Clock:
    """A settable clock for the provider, so tokens can age without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def credential(fake: FakeEntra, pki: LocalPKI, **overrides: Any) -> Credential:
    fields: dict[str, Any] = {"tenant_id": TENANT, "client_id": CLIENT, "authority": fake.url,
                              "client_secret": {"value": SECRET}, "ca_file": pki.ca_file}
    fields.update(overrides)
    return Credential(**fields)


@pytest.fixture
async def providers() -> AsyncIterator[list[TokenProvider]]:
    """Collects providers made by a test and closes them, whatever the test did."""
    made: list[TokenProvider] = []
    yield made
    for p in made:
        await p.aclose()


@pytest.fixture
def make(fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider]) -> Any:
    def _make(clock: Any = time.time, **overrides: Any) -> TokenProvider:
        p = TokenProvider("main", credential(fake, pki, **overrides), clock=clock)
        providers.append(p)
        return p
    return _make


async def renewed(provider: TokenProvider) -> Token:
    """The outcome of the background renewal that get() started (it must have started one)."""
    task = provider._inflight
    assert task is not None, "no renewal in flight"
    return await task


# --- basics -----------------------------------------------------------------------------

async def test_token_fetched_and_claims_decoded(fake: FakeEntra, make: Any) -> None:
    token = await make().get()
    assert token.audience == EXCHANGE
    assert token.tenant == TENANT
    assert token.app_id == CLIENT
    assert token.roles == ("SMTP.SendAsApp",)
    assert token.scopes == ()
    assert 3500 < token.expires_in() <= 3600
    raw = token.access_token.reveal()
    assert 1500 <= len(raw) <= 2100  # the size that matters for the SMTP AUTH line
    assert fake.validate_token(raw, EXCHANGE)["appid"] == CLIENT
    assert raw not in repr(token) and raw not in str(token)


@pytest.mark.parametrize("source", ["file", "env"])
async def test_a_secret_with_a_trailing_newline_gets_a_token(
        make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """`echo "$secret" > file`, or a variable filled from such a file: the newline (and a
    pasted blank) is not part of the secret Entra ID checks."""
    if source == "file":
        (tmp_path / "secret").write_text(f" {SECRET} \n")
        ref: dict[str, Any] = {"file": tmp_path / "secret"}
    else:
        monkeypatch.setenv("RELAY_TEST_SECRET", f"{SECRET}\r\n")
        ref = {"env": "RELAY_TEST_SECRET"}
    token = await make(client_secret=ref).get()
    assert token.tenant == TENANT


async def test_50_concurrent_gets_share_one_fetch(fake: FakeEntra, make: Any) -> None:
    provider = make()
    got = await asyncio.gather(*(provider.get() for _ in range(50)))
    assert fake.token_requests == 1
    assert len({t.access_token.reveal() for t in got}) == 1


async def test_cached_token_is_reused(fake: FakeEntra, make: Any) -> None:
    provider = make()
    first = await provider.get()
    second = await provider.get()
    assert second is first
    assert fake.token_requests == 1


async def test_new_token_when_refresh_window_reached(fake: FakeEntra, make: Any) -> None:
    clock = Clock()
    provider = make(clock=clock, refresh_before=600)
    first = await provider.get()
    clock.offset = 2000  # 1600 s left: still fresh
    assert await provider.get() is first
    clock.offset = first.expires_in(time.time()) - 599  # inside the refresh window
    # Still valid: handed out at once while the new one is fetched in the background.
    assert await provider.get() is first
    second = await renewed(provider)
    assert second.access_token != first.access_token
    assert await provider.get() is second
    assert fake.token_requests == 2


async def test_a_hanging_entra_does_not_hold_up_a_valid_token(fake: FakeEntra,
                                                              make: Any) -> None:
    clock = Clock()
    provider = make(clock=clock, refresh_before=600)
    first = await provider.get()
    clock.offset = first.expires_in(time.time()) - 400  # renewal due, 400 s still valid
    fake.hold_token_requests()
    try:
        for _ in range(3):
            assert await provider.get() is first
        await wait_until(lambda: fake.token_requests == 2)
        assert provider._inflight is not None and not provider._inflight.done()
    finally:
        fake.release_token_requests()
    second = await renewed(provider)
    assert second.access_token != first.access_token
    assert fake.token_requests == 2  # the three get()s shared one background fetch


async def test_refresh_before_longer_than_lifetime(fake: FakeEntra, make: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Every get() fetches (the token is always inside its refresh window), with a warning."""
    fake.token_lifetime = 600
    provider = make(refresh_before=1200)
    with caplog.at_level(logging.WARNING, logger="relay.oauth.provider"):
        first = await provider.get()
        assert await provider.get() is first  # valid: renewal goes on in the background
        second = await renewed(provider)
    assert first.access_token != second.access_token
    assert fake.token_requests == 2
    assert caplog.text.count("not longer than refresh_before") == 1


async def test_msal_runs_only_in_a_worker_thread(fake: FakeEntra, make: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []

    class Spy(msal.ConfidentialClientApplication):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            threads.append(threading.current_thread())
            super().__init__(*args, **kwargs)

        def acquire_token_for_client(self, *args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread())
            return super().acquire_token_for_client(*args, **kwargs)

    monkeypatch.setattr(clients_module.msal, "ConfidentialClientApplication", Spy)
    await make().get()
    assert len(threads) == 2
    assert threading.main_thread() not in threads


# --- refresh after rejection ------------------------------------------------------------------

async def test_refresh_of_stale_token_is_single_flight(fake: FakeEntra, make: Any) -> None:
    provider = make()
    stale = await provider.get()
    fake.revoke_all()  # key rollover: Exchange would now answer 535
    with pytest.raises(InvalidToken):
        fake.validate_token(stale.access_token.reveal())
    fresh = await asyncio.gather(*(provider.refresh(stale) for _ in range(20)))
    assert fake.token_requests == 2
    assert len({t.access_token.reveal() for t in fresh}) == 1
    fake.validate_token(fresh[0].access_token.reveal(), EXCHANGE)
    # A late 535 on the old token: someone already refreshed, no new fetch.
    assert await provider.refresh(stale) is fresh[0]
    assert fake.token_requests == 2
    # Without a stale token refresh() always fetches.
    assert (await provider.refresh()).access_token != fresh[0].access_token
    assert fake.token_requests == 3


# --- Entra ID unavailable -------------------------------------------------------------------

async def test_entra_500_keeps_the_valid_cached_token(fake: FakeEntra, make: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    provider = make(clock=clock)
    first = await provider.get()
    clock.offset = first.expires_in(time.time()) - 300  # refresh due, 5 min of validity left
    fake.fail_next(500)
    with caplog.at_level(logging.WARNING, logger="relay.oauth.provider"):
        assert await provider.get() is first
        with pytest.raises(TokenError):
            await renewed(provider)
    assert fake.token_requests == 2
    assert "still using the current token" in caplog.text
    assert "HTTP 500" in caplog.text
    # Right after a failure, get() does not hammer Entra ID; the refresher retries.
    assert await provider.get() is first
    assert fake.token_requests == 2


async def test_entra_500_without_a_token_is_a_transient_error(fake: FakeEntra,
                                                               make: Any) -> None:
    fake.fail_next(500)
    with pytest.raises(TokenError) as info:
        await make().get()
    assert info.value.transient
    assert "HTTP 500" in info.value.message
    assert "'main'" in info.value.message


async def test_refresh_failure_is_raised_not_hidden(fake: FakeEntra, make: Any) -> None:
    """After a 535 the cached token is useless: a failed refresh must say so."""
    provider = make()
    stale = await provider.get()
    fake.fail_next(503, retry_after=0)
    with pytest.raises(TokenError) as info:
        await provider.refresh(stale)
    assert info.value.transient


# --- actionable errors ----------------------------------------------------------------------

@pytest.mark.parametrize(("setup", "overrides", "code", "hint"), [
    ("wrong-secret", {"client_secret": {"value": "not-the-value-but-the-id"}}, 7000215,
     "not its Secret ID"),
    ("expired-secret", {}, 7000222, "create a new client secret"),
    ("unknown-client", {"client_id": "00000000-0000-0000-0000-00000000dead"}, 700016,
     "check client_id, tenant_id and cloud"),
    ("unknown-tenant", {"tenant_id": "no-such-tenant.onmicrosoft.com"}, 90002, "check tenant_id"),
    ("no-default", {"scope": "https://outlook.office365.com/SMTP.Send"}, 1002012,
     "must end in /.default"),
    ("unknown-resource", {"scope": "https://mail.example.invalid/.default"}, 500011,
     "Exchange Online is not available"),
])
async def test_entra_errors_are_explained(fake: FakeEntra, make: Any, setup: str,
                                          overrides: dict[str, Any], code: int, hint: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    if setup == "expired-secret":
        fake.add_app(TENANT, CLIENT, secret=SECRET, secret_expired=True)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TokenError) as info:
        await make(**overrides).get()
    err = info.value
    assert err.code == code
    assert not err.transient
    assert hint in err.message
    assert f"AADSTS{code}" in err.message  # Entra's own words, for searching the docs
    for text in (str(err), repr(err), caplog.text):
        assert SECRET not in text
        assert "not-the-value-but-the-id" not in text


async def test_failed_build_is_retried(fake: FakeEntra, make: Any) -> None:
    provider = make(tenant_id="later.onmicrosoft.com")
    with pytest.raises(TokenError, match="AADSTS90002"):
        await provider.get()
    fake.add_app("later.onmicrosoft.com", CLIENT, secret=SECRET)
    token = await provider.get()
    assert token.tenant == "later.onmicrosoft.com"
    assert fake.discovery_requests == 2


async def test_rotated_secret_file_is_picked_up(fake: FakeEntra, make: Any,
                                                tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("old-secret-value\n")
    provider = make(client_secret={"file": str(secret_file)})
    with pytest.raises(TokenError, match="AADSTS7000215"):
        await provider.get()
    secret_file.write_text(SECRET + "\n")
    assert (await provider.get()).app_id == CLIENT


def test_explain_entra_error_fallback_and_scope() -> None:
    text = explain_entra_error({
        "error": "invalid_request", "error_codes": [9002313],
        "error_description": "AADSTS9002313: Invalid request. Trace ID: t Correlation ID: c",
        "trace_id": "t-1", "correlation_id": "c-1"})
    assert text == ("Entra ID said: invalid_request: AADSTS9002313: Invalid request. "
                    "(trace_id=t-1, correlation_id=c-1)")
    assert "/.default" in explain_entra_error({"error": "invalid_scope"})
    assert "temporarily unavailable" in explain_entra_error({"error": "temporarily_unavailable"})


def test_token_without_jwt_has_no_claims() -> None:
    token = Token(Secret("opaque-token-value"), time.time() + 60)
    assert token.claims == {}
    assert token.audience is None and token.roles == () and token.app_id is None
    assert "opaque-token-value" not in repr(token)


# --- certificates ----------------------------------------------------------------------------

def _app_certificate(directory: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay app")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .sign(key, hashes.SHA256()))
    (directory / "app.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"key-pass-phrase")))
    (directory / "app.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "app.pfx").write_bytes(pkcs12.serialize_key_and_certificates(
        b"app", key, cert, None, serialization.BestAvailableEncryption(b"pfx-pass-phrase")))
    return key, cert


@pytest.mark.parametrize("kind", ["public_certificate", "thumbprint", "pfx"])
async def test_certificate_credential(fake: FakeEntra, make: Any, tmp_path: Path,
                                      kind: str) -> None:
    _, cert = _app_certificate(tmp_path)
    fake.add_app(TENANT, "cert-app", certificate_pem=cert.public_bytes(serialization.Encoding.PEM))
    if kind == "pfx":
        certificate: dict[str, Any] = {"pfx_file": str(tmp_path / "app.pfx"),
                                       "passphrase": {"value": "pfx-pass-phrase"}}
    else:
        certificate = {"private_key_file": str(tmp_path / "app.key"),
                       "passphrase": {"value": "key-pass-phrase"}}
        if kind == "thumbprint":
            certificate["thumbprint"] = cert.fingerprint(hashes.SHA1()).hex()
        else:
            certificate["public_certificate_file"] = str(tmp_path / "app.pem")
    provider = make(client_id="cert-app", client_secret=None, certificate=certificate)
    token = await provider.get()
    assert token.app_id == "cert-app"
    assert token.claims["appidacr"] == "2"  # authenticated by certificate


async def test_unregistered_certificate_is_explained(fake: FakeEntra, make: Any,
                                                     tmp_path: Path) -> None:
    _app_certificate(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, registered = _app_certificate(other)
    fake.add_app(TENANT, "cert-app",
                 certificate_pem=registered.public_bytes(serialization.Encoding.PEM))
    provider = make(client_id="cert-app", client_secret=None, certificate={
        "private_key_file": str(tmp_path / "app.key"),
        "public_certificate_file": str(tmp_path / "app.pem"),
        "passphrase": {"value": "key-pass-phrase"}})
    with pytest.raises(TokenError) as info:
        await provider.get()
    assert info.value.code == 700027
    assert "upload the public certificate" in info.value.message


async def test_wrong_key_passphrase_is_explained(fake: FakeEntra, make: Any,
                                                 tmp_path: Path) -> None:
    _app_certificate(tmp_path)
    provider = make(client_id="cert-app", client_secret=None, certificate={
        "pfx_file": str(tmp_path / "app.pfx"), "passphrase": {"value": "wrong"}})
    with pytest.raises(TokenError, match="wrong passphrase") as info:
        await provider.get()
    assert "pfx_file" in info.value.message
    assert fake.token_requests == 0


# --- background refresh ----------------------------------------------------------------------

async def _wait_for(predicate: Any, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_background_refresh_replaces_token_before_expiry(fake: FakeEntra,
                                                               make: Any) -> None:
    fake.token_lifetime = 3
    provider = make(refresh_before=1.5)
    provider.start()
    await _wait_for(lambda: provider.current is not None)
    first = provider.current
    assert first is not None
    await _wait_for(lambda: provider.current is not first)
    assert time.time() < first.expires_at  # replaced while the old one was still valid
    assert fake.token_requests == 2
    assert await provider.get() is provider.current  # callers get it from the cache


async def test_background_refresh_retries_after_failures(fake: FakeEntra, make: Any,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture,
                                                         ) -> None:
    monkeypatch.setattr(provider_module, "BACKOFF_MIN", 0.05)
    fake.fail_next(503, count=2, retry_after=0)
    provider = make()
    with caplog.at_level(logging.INFO, logger="relay.oauth.provider"):
        provider.start()
        await _wait_for(lambda: provider.current is not None)
    assert fake.token_requests == 3
    assert "acquired, expires in" in caplog.text
    assert "no token: credential 'main': Entra ID at 127.0.0.1" in caplog.text


async def test_background_refresher_survives_unexpected_errors(
        fake: FakeEntra, make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provider_module, "BACKOFF_MIN", 0.05)
    provider = make()
    real = provider._acquire_blocking
    calls = []

    def flaky() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("surprise")
        return real()

    monkeypatch.setattr(provider, "_acquire_blocking", flaky)
    provider.start()
    await _wait_for(lambda: provider.current is not None)
    assert len(calls) == 2


# --- HTTP: CA pinning and proxies -------------------------------------------------------------

async def test_ca_file_pinned_despite_ca_bundle_env(fake: FakeEntra, make: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE would override a plain verify= in requests."""
    import certifi

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("CURL_CA_BUNDLE", certifi.where())
    assert (await make().get()).audience == EXCHANGE
    with pytest.raises(TokenError) as info:
        await make(ca_file=None).get()  # the system bundle does not know the sandbox CA
    assert "ca_file" in info.value.message
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
    assert not info.value.transient


async def test_https_proxy_is_honoured(fake: FakeEntra, make: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setenv("NO_PROXY", "")
    provider = make()
    with pytest.raises(TokenError) as info:
        await provider.get()
    assert info.value.transient
    assert "HTTPS_PROXY" in info.value.message
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert (await provider.get()).audience == EXCHANGE


# --- secrecy -------------------------------------------------------------------------------

async def test_no_secret_or_token_in_logs_or_errors(fake: FakeEntra, make: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    provider = make(clock=clock)
    token = await provider.get()
    clock.offset = token.expires_in(time.time()) - 100
    fake.fail_next(500, retry_after=0)
    assert await provider.get() is token  # the cached token, while a renewal fails
    with pytest.raises(TokenError):
        await renewed(provider)
    fake.add_app(TENANT, CLIENT, secret="rotated-away")
    with pytest.raises(TokenError) as info:
        await provider.refresh(token)
    assert info.value.code == 7000215
    raw = token.access_token.reveal()
    assert "acquired, expires in" in caplog.text
    for text in (caplog.text, str(info.value), repr(info.value), repr(token),
                 repr(provider)):
        assert SECRET not in text
        assert raw not in text
        assert raw.split(".")[2] not in text  # not even the signature part


# --- the registry ----------------------------------------------------------------------------

async def test_tokens_registry_update_keeps_unchanged_providers(fake: FakeEntra,
                                                                pki: LocalPKI) -> None:
    a, b = credential(fake, pki), credential(fake, pki, refresh_before=300)
    registry = Tokens(Config(credentials={"a": a, "b": b}))
    try:
        registry.start()
        pa, pb = registry.provider("a"), registry.provider("b")
        token = await pa.get()
        registry.update(Config(credentials={"a": credential(fake, pki),
                                            "b": credential(fake, pki, refresh_before=60),
                                            "c": credential(fake, pki)}))
        assert registry.provider("a") is pa  # equal by value: kept, with its token
        assert await pa.get() is token
        assert registry.provider("b") is not pb
        assert registry.provider("c").credential.refresh_before == 600
        registry.update(Config(credentials={"a": a}))
        with pytest.raises(KeyError, match="'c'"):
            registry.provider("c")
        await _wait_for(lambda: registry.provider("a").current is not None)
    finally:
        await registry.aclose()


async def test_closed_provider_serves_cache_then_asks_for_retry(fake: FakeEntra,
                                                                make: Any) -> None:
    provider = make()
    token = await provider.get()
    provider.close()
    assert await provider.get() is token
    with pytest.raises(TokenError) as info:
        await provider.refresh(token)
    assert info.value.transient
