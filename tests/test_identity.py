"""Credentials without a long-lived secret, and secrets rotated on disk.

Against the fake Entra over HTTPS: workload identity federation (a token of an outside
OIDC issuer, read fresh from its file for every request, as AKS projects it), the
managed identity endpoint (Azure's instance metadata service, system- and user-assigned),
and a client secret or certificate replaced in its file while the relay runs.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigError, Credential
from relay.oauth.provider import TokenProvider
from relay.oauth.token import TokenError
from relay.sandbox.entra import FakeEntra
from relay.sandbox.issuer import OIDCIssuer
from relay.sandbox.pki import LocalPKI
from tests.conftest import build_config
from tests.test_tokens import CLIENT, TENANT, _no_proxy, pki, providers

IDENTITY = "99999999-8888-7777-6666-555555555555"
SUBJECT = "system:serviceaccount:mail:smtp-oauth-relay"
__all__ = ["_no_proxy", "pki", "providers"]   # the fixtures of tests/test_tokens.py


@pytest.fixture(autouse=True)
def _no_platform_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """msal looks for App Service, Machine Learning and Arc endpoints before the VM's."""
    for var in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET",
                "IMDS_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake(pki: LocalPKI) -> Iterator[FakeEntra]:
    with FakeEntra(pki) as entra:
        yield entra


def provider(fake: FakeEntra, pki: LocalPKI, made: list[TokenProvider],
             **kind: Any) -> TokenProvider:
    cred = Credential(tenant_id=TENANT, client_id=kind.pop("client_id", CLIENT),
                      authority=fake.url, ca_file=pki.ca_file, **kind)
    p = TokenProvider("main", cred)
    made.append(p)
    return p


# --- workload identity federation ------------------------------------------------------------

@pytest.fixture
def issuer(fake: FakeEntra) -> OIDCIssuer:
    """The platform's token issuer, which the fake Entra trusts for the app's SUBJECT."""
    trusted = OIDCIssuer()
    fake.add_federated_credential(TENANT, CLIENT, trusted.url, SUBJECT, trusted.public_key)
    return trusted


async def test_a_federated_token_file_is_read_fresh_for_every_request(
        fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider],
        tmp_path: Path, issuer: OIDCIssuer) -> None:
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(issuer.token(SUBJECT))
    p = provider(fake, pki, providers, federated_token_file=token_file)

    first = await p.get()
    assert first.claims["appid"] == CLIENT and first.audience == "https://outlook.office365.com"
    # The platform rewrites the file; a token it would not trust any more shows that the
    # relay sends what is in the file now, not what it read before.
    token_file.write_text(issuer.token("system:serviceaccount:other:intruder"))
    with pytest.raises(TokenError, match="AADSTS700213"):
        await p.refresh(stale=first)
    token_file.write_text(issuer.token(SUBJECT))
    second = await p.refresh(stale=first)
    assert second.access_token != first.access_token


async def test_an_unknown_issuer_or_an_expired_federated_token_is_refused(
        fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider],
        tmp_path: Path, issuer: OIDCIssuer) -> None:
    stranger = OIDCIssuer("https://token.actions.example")
    token_file = tmp_path / "token"
    token_file.write_text(stranger.token(SUBJECT))
    with pytest.raises(TokenError, match="AADSTS700211"):
        await provider(fake, pki, providers, federated_token_file=token_file).get()
    token_file.write_text(issuer.token(SUBJECT, lifetime=-600))
    with pytest.raises(TokenError, match="AADSTS700024"):
        await provider(fake, pki, providers, federated_token_file=token_file).get()


async def test_a_missing_federated_token_file_is_named_and_waited_for(
        fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider],
        tmp_path: Path, issuer: OIDCIssuer) -> None:
    missing = tmp_path / "not-projected-yet"
    with pytest.raises(TokenError) as err:
        await provider(fake, pki, providers, federated_token_file=missing).get()
    assert "credentials.main.federated_token_file" in err.value.message
    assert str(missing) in err.value.message and err.value.transient


# --- managed identity ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["system", "user"])
async def test_the_managed_identity_endpoint_gives_the_token(
        fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider],
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", fake.url)
    fake.add_managed_identity(TENANT, "00000000-0000-0000-0000-0000000000aa", system=True)
    fake.add_managed_identity(TENANT, IDENTITY, system=False)
    p = provider(fake, pki, providers, managed_identity=kind, client_id=IDENTITY)
    token = await p.get()
    expected = IDENTITY if kind == "user" else "00000000-0000-0000-0000-0000000000aa"
    assert token.claims["appid"] == expected
    assert token.audience == "https://outlook.office365.com"
    assert token.expires_in() > 3000


async def test_no_managed_identity_here_is_a_clear_error(
        fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", fake.url)
    p = provider(fake, pki, providers, managed_identity="user", client_id=IDENTITY)
    with pytest.raises(TokenError, match="Identity not found"):
        await p.get()


async def test_an_unreachable_identity_endpoint_is_named_as_such(
        fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{port}")
    p = provider(fake, pki, providers, managed_identity="system")
    with pytest.raises(TokenError) as err:
        await p.get()
    assert f"127.0.0.1:{port}" in err.value.message and err.value.transient


# --- rotation on disk ------------------------------------------------------------------------

async def test_a_secret_rotated_in_its_file_is_used_from_the_next_token_on(
        fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("old-secret-value-0123456789")
    fake.add_app(TENANT, CLIENT, secret="old-secret-value-0123456789")
    p = provider(fake, pki, providers, client_secret={"file": str(secret_file)})
    first = await p.get()
    # The administrator adds a new secret in Entra, writes it to the file and removes the
    # old one: the next token comes with the new secret, with no failed request first.
    fake.add_app(TENANT, CLIENT, secret="new-secret-value-9876543210")
    secret_file.write_text("new-secret-value-9876543210")
    requests = fake.token_requests
    caplog.set_level(logging.INFO, logger="relay.oauth.provider")
    second = await p.refresh(stale=first)
    assert second.access_token != first.access_token
    assert fake.token_requests == requests + 1
    assert "its client secret changed on disk" in caplog.text
    assert "new-secret-value" not in caplog.text


async def test_a_certificate_rotated_in_its_files_is_used_from_the_next_token_on(
        fake: FakeEntra, pki: LocalPKI, providers: list[TokenProvider],
        tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from tests.test_tokens import _app_certificate

    _, old = _app_certificate(tmp_path)
    fake.add_app(TENANT, CLIENT, certificate_pem=old.public_bytes(serialization.Encoding.PEM))
    p = provider(fake, pki, providers, certificate={
        "pfx_file": str(tmp_path / "app.pfx"), "passphrase": {"value": "pfx-pass-phrase"}})
    first = await p.get()
    # A new certificate is uploaded to the app (the old one removed) and its files
    # replaced: the next token is signed for with the new one, with no failed request.
    _, new = _app_certificate(tmp_path)
    fake.add_app(TENANT, CLIENT, certificate_pem=new.public_bytes(serialization.Encoding.PEM))
    requests = fake.token_requests
    second = await p.refresh(stale=first)
    assert second.access_token != first.access_token
    assert fake.token_requests == requests + 1


# --- configuration ---------------------------------------------------------------------------

def test_exactly_one_kind_of_credential(tmp_path: Path) -> None:
    base = {"tenant_id": TENANT, "client_id": CLIENT}
    with pytest.raises(ConfigError, match="exactly one of client_secret, certificate, "
                                          "federated_token_file, managed_identity or "
                                          "delegated"):
        build_config({"credentials": {"main": {**base, "managed_identity": "system"}}})
    cfg = build_config({"credentials": {"main": {
        **base, "client_secret": None, "managed_identity": "system"}}})
    assert cfg.credentials["main"].kind == "managed identity (system-assigned)"
    with pytest.raises(ConfigError, match="managed_identity"):
        build_config({"credentials": {"main": {**base, "client_secret": None,
                                               "managed_identity": "yes"}}})


def test_doctor_has_no_secret_to_watch_for_a_platform_credential(tmp_path: Path) -> None:
    from relay.ops.doctor import Doctor

    for kind in ({"managed_identity": "user"},
                 {"federated_token_file": str(tmp_path / "token")}):
        cfg = build_config({"credentials": {"main": {"client_secret": None, **kind}}})
        step = Doctor(cfg)._expiry("main")
        assert step.status.value == "ok" and "no long-lived secret" in step.detail
