"""An outside OIDC issuer, as a Kubernetes cluster or GitHub Actions is for Entra ID: it
signs short-lived tokens for a subject, which workload identity federation trusts.

- :class:`OIDCIssuer`: an RSA key and an issuer URL; :meth:`~OIDCIssuer.token` makes a
  token such as the one AKS projects into a pod (``AZURE_FEDERATED_TOKEN_FILE``).
"""

from __future__ import annotations

import base64
import json
import time
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

FEDERATED_AUDIENCE = "api://AzureADTokenExchange"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class OIDCIssuer:
    """Signs tokens as ``url`` (e.g. a cluster's service account issuer)."""

    def __init__(self, url: str = "https://oidc.sandbox.test/cluster") -> None:
        self.url = url
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self._key.public_key()

    def token(self, subject: str, *, audience: str = FEDERATED_AUDIENCE,
              lifetime: float = 3600.0) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "kid": self.kid, "typ": "JWT"}
        claims = {"iss": self.url, "sub": subject, "aud": [audience], "iat": now,
                  "nbf": now, "exp": now + int(lifetime), "jti": uuid.uuid4().hex}
        signing_input = ".".join(_b64(json.dumps(part).encode()) for part in (header, claims))
        signature = self._key.sign(signing_input.encode("ascii"), padding.PKCS1v15(),
                                   hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"
