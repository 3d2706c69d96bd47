"""FakeEntra's RS256 mode: tokens that a server outside this process can verify itself."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay.sandbox.entra import FakeEntra, InvalidToken
from relay.sandbox.pki import create_pki


def _part(token: str, i: int) -> bytes:
    piece = token.split(".")[i]
    return base64.urlsafe_b64decode(piece + "=" * (-len(piece) % 4))


def _token(entra: FakeEntra, ca_file: Path) -> tuple[str, int]:
    with requests.Session() as s:
        s.trust_env = False               # REQUESTS_CA_BUNDLE must not override verify=
        r = s.post(f"{entra.url}/contoso/oauth2/v2.0/token", verify=str(ca_file), timeout=10,
                   data={"grant_type": "client_credentials", "client_id": "app",
                         "client_secret": "s3cret",
                         "scope": "https://outlook.office365.com/.default"})
    r.raise_for_status()
    return r.json()["access_token"], r.json()["expires_in"]


@pytest.mark.parametrize("signing", ["HS256", "RS256"])
def test_tokens_are_signed_with_the_chosen_algorithm(tmp_path: Path, signing: Any) -> None:
    pki = create_pki(tmp_path / "pki")
    with FakeEntra(pki, signing=signing) as entra:
        entra.add_app("contoso", "app", secret="s3cret")
        token, expires_in = _token(entra, pki.ca_file)
        header, claims = json.loads(_part(token, 0)), json.loads(_part(token, 1))
        assert header == {"typ": "JWT", "alg": signing, "kid": entra.kid}
        assert expires_in == 3600
        assert entra.validate_token(token)["appid"] == "app"
        assert 1500 <= len(token) <= 2000              # the size of a real Exchange token
        if signing == "RS256":
            # Whole seconds, as Entra issues them (outside JWT parsers refuse fractions).
            assert isinstance(claims["exp"], int) and claims["exp"] == claims["iat"] + 3600
            key = serialization.load_pem_public_key(entra.public_key_pem)
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(_part(token, 2), token.rsplit(".", 1)[0].encode(), padding.PKCS1v15(),
                       hashes.SHA256())               # raises if the signature is wrong
        else:
            with pytest.raises(RuntimeError, match="no public key"):
                _ = entra.public_key_pem
        old_kid = entra.kid
        entra.revoke_all()
        assert entra.kid != old_kid
        with pytest.raises(InvalidToken, match="rolled over"):
            entra.validate_token(token)


def test_the_default_is_hs256(tmp_path: Path) -> None:
    assert FakeEntra(create_pki(tmp_path / "pki")).signing == "HS256"


def test_an_unknown_algorithm_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ES256"):
        FakeEntra(create_pki(tmp_path / "pki"), signing="ES256")
