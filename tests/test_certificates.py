"""App certificates read in one place (relay.oauth.certificates) for the token providers,
``doctor`` and the expiry metrics: the same checks, the same messages naming the setting,
and the passphrase registered for redaction whoever reads the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from relay.config import CertificateCredential
from relay.core.log import scrub
from relay.oauth.certificates import (
    CertificateError,
    app_certificate,
    load_certificate,
    msal_credential,
)
from tests.test_tokens import _app_certificate

WHERE = "credentials.main.certificate"


def _pfx(tmp_path: Path, passphrase: str) -> CertificateCredential:
    return CertificateCredential(pfx_file=tmp_path / "app.pfx",
                                 passphrase={"value": passphrase})


def test_pfx_gives_key_and_certificate_and_redacts_the_passphrase(tmp_path: Path) -> None:
    _, cert = _app_certificate(tmp_path)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    credential = msal_credential(_pfx(tmp_path, "pfx-pass-phrase"), WHERE)
    assert credential["public_certificate"] == pem
    assert credential["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert "pfx-pass-phrase" not in scrub("opened with pfx-pass-phrase")


def test_expiry_readers_redact_the_passphrase_too(tmp_path: Path) -> None:
    """doctor's copy of the PFX loading did not register the passphrase for redaction."""
    key, cert = _app_certificate(tmp_path)
    (tmp_path / "app.pfx").write_bytes(serialization.pkcs12.serialize_key_and_certificates(
        b"app", key, cert, None, serialization.BestAvailableEncryption(b"doctor-only-pass")))
    leaf = app_certificate(_pfx(tmp_path, "doctor-only-pass"), WHERE)
    assert leaf is not None and leaf.serial_number == cert.serial_number
    assert "doctor-only-pass" not in scrub("doctor-only-pass")


def test_pem_key_with_certificate_or_thumbprint(tmp_path: Path) -> None:
    _, cert = _app_certificate(tmp_path)
    key = {"private_key_file": tmp_path / "app.key", "passphrase": {"value": "key-pass-phrase"}}
    with_cert = CertificateCredential(**key, public_certificate_file=tmp_path / "app.pem")
    assert "public_certificate" in msal_credential(with_cert, WHERE)
    assert app_certificate(with_cert, WHERE) == cert
    thumb = CertificateCredential(**key, thumbprint="ab:" * 19 + "cd")
    assert msal_credential(thumb, WHERE)["thumbprint"] == "AB" * 19 + "CD"
    assert app_certificate(thumb, WHERE) is None


def test_errors_name_the_setting(tmp_path: Path) -> None:
    _app_certificate(tmp_path)
    with pytest.raises(CertificateError, match=r"^cannot open credentials\.main\.certificate"
                       r"\.pfx_file .*\(wrong passphrase, or not a PKCS#12 file\)$"):
        app_certificate(_pfx(tmp_path, "wrong"), WHERE)
    with pytest.raises(CertificateError, match=r"^cannot read credentials\.main\.certificate"
                       r"\.public_certificate_file .*missing\.pem: No such file"):
        load_certificate(tmp_path / "missing.pem", f"{WHERE}.public_certificate_file")
    with pytest.raises(CertificateError, match=r"app\.key is not a PEM certificate"):
        load_certificate(tmp_path / "app.key", f"{WHERE}.public_certificate_file")
    other = tmp_path / "other"
    other.mkdir()
    _app_certificate(other)
    mismatched = CertificateCredential(
        private_key_file=tmp_path / "app.key", passphrase={"value": "key-pass-phrase"},
        public_certificate_file=other / "app.pem")
    with pytest.raises(CertificateError, match="private key does not belong to the public"):
        msal_credential(mismatched, WHERE)
    wrong_key_pass = CertificateCredential(
        private_key_file=tmp_path / "app.key", passphrase={"value": "nope-nope"},
        thumbprint="ab" * 20)
    with pytest.raises(CertificateError, match="wrong or missing passphrase"):
        msal_credential(wrong_key_pass, WHERE)
