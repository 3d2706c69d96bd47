"""A stand-in for Entra ID's token endpoint, strict enough that msal works against it unchanged.

The relay talks to it exactly as to login.microsoftonline.com: msal fetches the tenant's
OpenID configuration over HTTPS and posts a client-credentials grant authenticated by a
client secret or by a certificate-signed JWT assertion. Mistakes the real service rejects
(wrong secret, expired secret, unknown app or tenant, a scope without ``/.default``, a
forged assertion) are rejected here with the same status, error and AADSTS code, so the
relay's error explanations are tested against realistic replies.

Tokens are JWTs signed with a key only this process knows (HS256 rather than Entra's RS256:
nothing outside the sandbox has to verify them). A fake Exchange checks them with
:meth:`FakeEntra.validate_token`. :meth:`FakeEntra.revoke_all` rolls that key over, which
invalidates every token issued so far, as a real key rollover or revocation would.
With ``signing="RS256"`` tokens are signed as Entra signs them, with an RSA key whose public
half (:attr:`FakeEntra.public_key_pem`, named by :attr:`FakeEntra.kid`) lets a server
outside this process, such as a real Dovecot, verify them itself.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote_plus, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay.sandbox.https import HTTPSServer, JSONHandler, serve
from relay.sandbox.issuer import FEDERATED_AUDIENCE
from relay.sandbox.pki import LocalPKI
from relay.sandbox.userflows import DEVICE_CODE_GRANT, FlowError, UserFlows

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_RESOURCES = frozenset({
    "https://outlook.office365.com",
    "https://outlook.office.com",
    "https://outlook.office365.us",
    "https://partner.outlook.cn",
    "https://graph.microsoft.com",
})
_RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
_TOKEN_TARGET_LENGTH = 1700  # real app-only tokens for Exchange are ~1.5-2 kB
_MAX_BODY = 64 * 1024
_ASSERTION_SKEW = 300  # Entra tolerates 5 minutes of clock skew on client assertions


class InvalidToken(Exception):
    """A bearer token that a resource server must refuse; ``reason`` never contains the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _EntraError(Exception):
    """An error reply in Entra's format, raised inside request handling."""

    def __init__(self, status: int, error: str, code: int, text: str) -> None:
        super().__init__(text)
        self.status, self.error, self.code, self.text = status, error, code, text


@dataclass
class _App:
    tenant_id: str
    client_id: str
    secret: str | None
    certificate: x509.Certificate | None
    roles: tuple[str, ...]
    secret_expired: bool
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # Federated identity credentials: (issuer, subject, the issuer's public key).
    federated: list[tuple[str, str, Any]] = field(default_factory=list)

    def thumbprints(self) -> set[str]:
        """x5t and x5t#S256 header values (base64url) that identify the app's certificate."""
        if self.certificate is None:
            return set()
        return {_b64(self.certificate.fingerprint(hashes.SHA1())),  # noqa: S303 - x5t is SHA-1
                _b64(self.certificate.fingerprint(hashes.SHA256()))}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json_b64(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _split_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """(header, payload, signing input, signature); ValueError when it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT (expected three dot-separated parts)")
    try:
        header = json.loads(_unb64(parts[0]))
        payload = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, binascii.Error):
        raise ValueError("not a JWT (undecodable part)") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise ValueError("not a JWT (header or payload is not an object)")
    return header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


class _Handler(JSONHandler):
    server_version = "FakeEntra/1.0"

    def do_GET(self) -> None:
        status, body = self.server.owner._handle_get(self.path, self.headers.get("Metadata"))
        self.reply(status, body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.reply(413, {"error": "invalid_request"}, {"Connection": "close"})
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        self.reply(*self.server.owner._handle_post(
            self.path, self.headers.get("Content-Type", ""),
            self.headers.get("Authorization"), body))


class FakeEntra:
    """Entra ID's OpenID discovery and v2.0 token endpoint on 127.0.0.1, over HTTPS.

    ``token_lifetime`` may be changed at any time; it applies to tokens issued afterwards.
    So may ``extra_claims``: claims merged into every token issued afterwards (a value of
    None removes the claim), to imitate tokens the relay must recognise as unusable, such
    as a delegated token (``scp`` instead of ``roles``) or one from another tenant.
    ``resources`` lists the resource URIs (scope minus ``/.default``) that exist in every
    tenant. ``clock`` drives token issue and validation times, so a test can age tokens.
    ``signing`` is the tokens' algorithm: HS256 (a secret key) or RS256 (an RSA key pair,
    as Entra uses, for servers that check tokens with :attr:`public_key_pem`).
    """

    def __init__(self, pki: LocalPKI, *, token_lifetime: float = 3600,
                 clock: Callable[[], float] = time.time,
                 signing: Literal["HS256", "RS256"] = "HS256") -> None:
        if signing not in ("HS256", "RS256"):
            raise ValueError(f"unsupported signing algorithm {signing!r}")
        self.signing = signing
        self.token_lifetime = token_lifetime
        self.resources: set[str] = set(DEFAULT_RESOURCES)
        self.extra_claims: dict[str, Any] = {}
        self._gate = threading.Event()  # cleared: token requests hang (a stuck Entra ID)
        self._gate.set()
        self._clock = clock
        self._pki = pki
        self._lock = threading.Lock()
        self._apps: dict[tuple[str, str], _App] = {}
        self._identities: dict[str, _App] = {}    # managed identities by client id
        self.users = UserFlows()                   # users' sign-ins (delegated)
        self._tenants: set[str] = set()
        self._key, self._kid = self._new_key()
        self._failures: list[tuple[int, dict[str, Any] | None, int | None]] = []
        self._token_requests = 0
        self._discovery_requests = 0
        self._issued: deque[str] = deque(maxlen=10_000)
        self._server: HTTPSServer | None = None
        self._thread: threading.Thread | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeEntra is not started")
        return f"https://{self.host}:{self.port}"

    def start(self) -> FakeEntra:
        if self._server is not None:
            return self
        self._server, self._thread = serve(self, _Handler, self._pki, self.host, "fake-entra")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._gate.set()  # requests held by hold_token_requests() end now
        server.stop(self._thread)

    def __enter__(self) -> FakeEntra:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- configuration and observation ---------------------------------------------------

    def add_app(self, tenant_id: str, client_id: str, *, secret: str | None = None,
                certificate_pem: str | bytes | None = None,
                roles: tuple[str, ...] | list[str] = ("SMTP.SendAsApp",),
                secret_expired: bool = False, public: bool = False) -> None:
        """Register an app (and its tenant); give a secret, a certificate, or both; or
        ``public``: a public client for users' sign-ins (the device-code flow)."""
        if secret is None and certificate_pem is None and not public:
            raise ValueError("an app needs a secret or a certificate")
        cert = None
        if certificate_pem is not None:
            pem = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
            cert = x509.load_pem_x509_certificate(pem)
        app = _App(tenant_id, client_id, secret, cert, tuple(roles), secret_expired)
        with self._lock:
            self._tenants.add(tenant_id.lower())
            self._apps[(tenant_id.lower(), client_id.lower())] = app

    def add_federated_credential(self, tenant_id: str, client_id: str, issuer: str,
                                 subject: str, public_key: Any, *,
                                 roles: tuple[str, ...] = ("SMTP.SendAsApp",)) -> None:
        """Trust tokens of an outside OIDC issuer (a Kubernetes cluster, GitHub Actions)
        for ``subject`` as the app's credential, as a federated identity credential does;
        the app is registered without a secret if it is not yet."""
        key = (tenant_id.lower(), client_id.lower())
        with self._lock:
            self._tenants.add(tenant_id.lower())
            app = self._apps.get(key)
            if app is None:
                app = self._apps[key] = _App(tenant_id, client_id, None, None, roles, False)
            app.federated.append((issuer, subject, public_key))

    def add_managed_identity(self, tenant_id: str, client_id: str, *, system: bool = True,
                             roles: tuple[str, ...] = ("SMTP.SendAsApp",)) -> None:
        """The managed identity of the machine the relay runs on (``system``: the one a
        request without client_id gets), served at the instance metadata endpoint."""
        with self._lock:
            self._tenants.add(tenant_id.lower())
            self._identities[client_id.lower()] = _App(tenant_id, client_id, None, None,
                                                       tuple(roles), False)
            if system:
                self._identities[""] = self._identities[client_id.lower()]

    def fail_next(self, status: int = 500, count: int = 1, body: dict[str, Any] | None = None,
                  *, retry_after: int | None = None) -> None:
        """Answer the next ``count`` token requests with ``status`` (Entra-style body).

        msal replays a 5xx/429 to its caller for ``Retry-After`` seconds (5 when absent)
        without asking again; ``retry_after=0`` lets a test retry at once.
        """
        with self._lock:
            self._failures.extend([(status, body, retry_after)] * count)

    def hold_token_requests(self) -> None:
        """Make token requests hang until :meth:`release_token_requests` (at most 30 s):
        an Entra ID that accepts connections but does not answer."""
        self._gate.clear()

    def release_token_requests(self) -> None:
        self._gate.set()

    def clear_failures(self) -> None:
        """Forget failures queued by :meth:`fail_next` (the outage is over)."""
        with self._lock:
            self._failures.clear()

    def revoke_all(self) -> None:
        """Roll the signing key over: every token issued so far stops validating."""
        key, kid = self._new_key()
        with self._lock:
            self._key, self._kid = key, kid

    def _new_key(self) -> tuple[bytes | rsa.RSAPrivateKey, str]:
        if self.signing == "RS256":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048), \
                secrets.token_hex(8)
        return secrets.token_bytes(32), secrets.token_hex(8)

    @property
    def kid(self) -> str:
        """The ``kid`` header of tokens signed with the current key."""
        with self._lock:
            return self._kid

    @property
    def public_key_pem(self) -> bytes:
        """The current RS256 verification key (PEM, SubjectPublicKeyInfo)."""
        with self._lock:
            key = self._key
        if not isinstance(key, rsa.RSAPrivateKey):
            raise RuntimeError("HS256 tokens have no public key (use signing='RS256')")
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def token_requests(self) -> int:
        with self._lock:
            return self._token_requests

    @property
    def discovery_requests(self) -> int:
        with self._lock:
            return self._discovery_requests

    @property
    def issued_tokens(self) -> list[str]:
        """Every access token handed out (the latest 10,000), e.g. to scan logs for them."""
        with self._lock:
            return list(self._issued)

    # --- tokens -------------------------------------------------------------------------

    def validate_token(self, token: str, audience_prefix: str | None = None) -> dict[str, Any]:
        """Check a bearer token as a resource server would; returns its claims."""
        try:
            header, claims, signing_input, signature = _split_jwt(token)
        except ValueError as exc:
            raise InvalidToken(str(exc)) from None
        with self._lock:
            key, kid = self._key, self._kid
        if header.get("alg") != self.signing:
            raise InvalidToken(f"unexpected signing algorithm {header.get('alg')!r}")
        if header.get("kid") != kid:
            raise InvalidToken("signed with a key that is no longer valid (key rolled over)")
        if not self._verify(key, signing_input, signature):
            raise InvalidToken("bad signature")
        now = self._clock()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or now >= exp:
            raise InvalidToken("token expired")
        if isinstance(nbf, int | float) and now < nbf:
            raise InvalidToken("token not yet valid")
        aud = claims.get("aud")
        if audience_prefix is not None and not (isinstance(aud, str)
                                                and aud.startswith(audience_prefix)):
            raise InvalidToken(f"wrong audience {aud!r} (expected {audience_prefix}...)")
        return claims

    def _issue(self, app: _App, resource: str, by_certificate: bool,
               given: dict[str, Any] | None = None) -> tuple[str, int]:
        now = self._clock()
        iat = int(now)
        lifetime = self.token_lifetime
        # Entra's exp is iat + lifetime in whole seconds; here it is exact, so that the
        # second-long lifetimes tests use are not cut short by rounding. Tokens for outside
        # verifiers (RS256) have Entra's whole seconds: JWT parsers may refuse a fraction.
        exp: float = now + lifetime if self.signing == "HS256" else iat + int(lifetime)
        sts = f"https://sts.windows.net/{app.tenant_id}/"
        claims: dict[str, Any] = {
            "aud": resource, "iss": sts, "iat": iat, "nbf": iat, "exp": exp,
            "aio": _b64(secrets.token_bytes(60)),
            "app_displayname": f"sandbox app {app.client_id}",
            "appid": app.client_id, "appidacr": "2" if by_certificate else "1",
            "idp": sts, "idtyp": "app", "oid": app.object_id,
            "rh": "0." + _b64(secrets.token_bytes(48)) + ".",
            "roles": list(app.roles), "sid": str(uuid.uuid4()), "sub": app.object_id,
            "tid": app.tenant_id, "uti": _b64(secrets.token_bytes(16)), "ver": "1.0",
            "wids": ["0997a1d0-0d1d-4acb-b408-d5ca73121e90"], "xms_idrel": "7 14",
        }
        for name, value in {**(given or {}), **self.extra_claims}.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        with self._lock:
            key, kid = self._key, self._kid
        header = {"typ": "JWT", "alg": self.signing, "kid": kid}
        signature_length = 45 if self.signing == "HS256" else 344  # base64url, 32/256 bytes
        unpadded = len(_json_b64(header)) + len(_json_b64(claims)) + signature_length
        claims["xms_ftd"] = _b64(secrets.token_bytes(
            max(16, (_TOKEN_TARGET_LENGTH - unpadded) * 3 // 4 * 3 // 4)))
        signing_input = f"{_json_b64(header)}.{_json_b64(claims)}"
        token = f"{signing_input}.{_b64(self._sign(key, signing_input.encode('ascii')))}"
        with self._lock:
            self._issued.append(token)
        # Whole seconds, rounded down: a client must never believe a token lives longer.
        return token, max(0, int(lifetime))

    @staticmethod
    def _sign(key: bytes | rsa.RSAPrivateKey, data: bytes) -> bytes:
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return hmac.new(key, data, hashlib.sha256).digest()

    @staticmethod
    def _verify(key: bytes | rsa.RSAPrivateKey, data: bytes, signature: bytes) -> bool:
        if isinstance(key, rsa.RSAPrivateKey):
            try:
                key.public_key().verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                return False
            return True
        return hmac.compare_digest(hmac.new(key, data, hashlib.sha256).digest(), signature)

    # --- request handling (called from server threads) -----------------------------------

    @staticmethod
    def _error(status: int, error: str, code: int, text: str) -> _EntraError:
        return _EntraError(status, error, code, text)

    @staticmethod
    def _error_body(error: str, code: int, text: str) -> dict[str, Any]:
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": error,
            "error_description": f"AADSTS{code}: {text} Trace ID: {trace} "
                                 f"Correlation ID: {corr} Timestamp: {stamp}",
            "error_codes": [code], "timestamp": stamp, "trace_id": trace,
            "correlation_id": corr, "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        }

    def _known_tenant(self, tenant: str) -> bool:
        with self._lock:
            return tenant.lower() in self._tenants

    def _tenant_not_found(self, tenant: str) -> _EntraError:
        return self._error(400, "invalid_tenant", 90002,
                           f"Tenant '{tenant}' not found. Check to make sure you have the correct "
                           "tenant ID and are signing into the correct cloud. Check with your "
                           "subscription administrator, this may happen if there are no active "
                           "subscriptions for the tenant.")

    def _handle_get(self, path: str, metadata: str | None = None) -> tuple[int, dict[str, Any]]:
        if urlsplit(path).path == "/metadata/identity/oauth2/token":
            return self._managed_identity_token(path, metadata)
        m = re.fullmatch(r"/([^/]+)/v2\.0/\.well-known/openid-configuration",
                         urlsplit(path).path)
        if not m:
            return 404, {"error": "not_found"}
        with self._lock:
            self._discovery_requests += 1
        tenant = unquote_plus(m.group(1))
        if not self._known_tenant(tenant):
            e = self._tenant_not_found(tenant)
            return e.status, self._error_body(e.error, e.code, e.text)
        base = f"{self.url}/{tenant}"
        return 200, {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{self.url}/{tenant}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "tid"],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }

    def _handle_post(self, path: str, content_type: str, authorization: str | None,
                     body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        device = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/devicecode", urlsplit(path).path)
        if device:
            form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
            return 200, self.users.start_device_flow(
                form.get("client_id", ""), form.get("scope", ""),
                f"{self.url}/devicelogin"), {}
        m = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", urlsplit(path).path)
        if not m:
            return 404, {"error": "not_found"}, {}
        with self._lock:
            self._token_requests += 1
            failure = self._failures.pop(0) if self._failures else None
        self._gate.wait(timeout=30)
        if failure is not None:
            status, fbody, retry_after = failure
            if fbody is None:
                error = "temporarily_unavailable" if status in (429, 503) else (
                    "server_error" if status >= 500 else "invalid_request")
                fbody = self._error_body(error, 90033,
                                         "A transient error has occurred. Please try again.")
            headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
            return status, fbody, headers
        try:
            status, reply = self._token(unquote_plus(m.group(1)), m.group(1), content_type,
                                        authorization, body)
        except _EntraError as e:
            return e.status, self._error_body(e.error, e.code, e.text), {}
        return status, reply, {}

    def _token(self, tenant: str, raw_tenant: str, content_type: str,
               authorization: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
        if not self._known_tenant(tenant):
            raise self._tenant_not_found(tenant)
        if "application/x-www-form-urlencoded" not in content_type.lower():
            raise self._error(400, "invalid_request", 900144,
                              "The request body must contain the following parameter: "
                              "'grant_type'.")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"),
                                             keep_blank_values=True).items()}
        basic_id, basic_secret = self._basic(authorization)
        grant = form.get("grant_type")
        if not grant:
            raise self._missing("grant_type")
        if grant in (DEVICE_CODE_GRANT, "refresh_token", "authorization_code"):
            return self._user_grant(tenant, grant, form)
        if grant != "client_credentials":
            raise self._error(400, "unsupported_grant_type", 70003,
                              f"The app requested an unsupported grant type '{grant}'.")
        client_id = form.get("client_id") or basic_id
        if not client_id:
            raise self._missing("client_id")
        with self._lock:
            app = self._apps.get((tenant.lower(), client_id.lower()))
        if app is None:
            raise self._error(400, "unauthorized_client", 700016,
                              f"Application with identifier '{client_id}' was not found in the "
                              f"directory '{tenant}'. This can happen if the application has "
                              "not been installed by the administrator of the tenant or "
                              "consented to by any user in the tenant. You may have sent your "
                              "authentication request to the wrong tenant.")
        by_certificate = self._authenticate(app, raw_tenant, form, basic_secret)
        resource = self._resource(form.get("scope"), tenant)
        token, expires_in = self._issue(app, resource, by_certificate)
        return 200, {"token_type": "Bearer", "expires_in": expires_in,
                     "ext_expires_in": expires_in, "access_token": token}

    def _user_grant(self, tenant: str, grant: str,
                    form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """A delegated token for a user's sign-in (relay.sandbox.userflows)."""
        client_id = form.get("client_id", "")
        with self._lock:
            app = self._apps.get((tenant.lower(), client_id.lower()))
        if app is None:
            raise self._error(400, "unauthorized_client", 700016,
                              f"Application with identifier '{client_id}' was not found.")
        try:
            if grant == DEVICE_CODE_GRANT:
                user, scopes, refresh = self.users.redeem_device_code(
                    client_id, form.get("device_code", ""))
            elif grant == "authorization_code":
                user, scopes, refresh = self.users.redeem_code(
                    client_id, form.get("code", ""), form.get("code_verifier", ""),
                    form.get("redirect_uri", ""))
            else:
                user, scopes, refresh = self.users.redeem_refresh_token(
                    client_id, form.get("refresh_token", ""), form.get("scope", ""))
        except FlowError as e:
            raise self._error(400, e.error, e.code, e.text) from None
        resource, _, _ = scopes[0].rpartition("/") if scopes else ("", "", "")
        permissions = " ".join(s.rpartition("/")[2] for s in scopes)
        token, expires_in = self._issue(app, resource, False, given={
            "roles": None, "scp": permissions, "upn": user, "unique_name": user,
            "idtyp": "user", "name": user.partition("@")[0]})
        return 200, {"token_type": "Bearer", "scope": " ".join(scopes),
                     "expires_in": expires_in, "ext_expires_in": expires_in,
                     "access_token": token, "refresh_token": refresh}

    def _managed_identity_token(self, path: str,
                                metadata: str | None) -> tuple[int, dict[str, Any]]:
        """Azure's instance metadata service (IMDS): a token for the machine's identity."""
        if (metadata or "").lower() != "true":
            return 400, {"error": "invalid_request",
                         "error_description": "Required metadata header not specified"}
        query = parse_qs(urlsplit(path).query)
        resource = (query.get("resource") or [""])[0].rstrip("/")
        with self._lock:
            self._token_requests += 1
            identity = self._identities.get((query.get("client_id") or [""])[0].lower())
        if identity is None:
            return 400, {"error": "invalid_request",
                         "error_description": "Identity not found"}
        if resource not in self.resources:
            return 400, {"error": "invalid_resource",
                         "error_description": f"AADSTS500011: The resource principal named "
                                              f"{resource} was not found in the tenant."}
        token, expires_in = self._issue(identity, resource, by_certificate=False)
        return 200, {"access_token": token, "expires_in": str(expires_in),
                     "expires_on": str(int(time.time()) + expires_in), "resource": resource,
                     "token_type": "Bearer"}

    def _missing(self, name: str) -> _EntraError:
        return self._error(400, "invalid_request", 900144,
                           f"The request body must contain the following parameter: '{name}'.")

    def _check_federated(self, app: _App, header: dict[str, Any], claims: dict[str, Any],
                         signing_input: bytes, signature: bytes) -> None:
        """A token of an outside issuer presented as the app's credential."""
        issuer, subject = claims.get("iss"), claims.get("sub")
        known = [f for f in app.federated if f[0] == issuer]
        if not known:
            raise self._error(400, "invalid_request", 700211,
                              f"No matching federated identity record found for presented "
                              f"assertion issuer '{issuer}'.")
        matching = [f for f in known if f[1] == subject]
        if not matching:
            raise self._error(400, "invalid_request", 700213,
                              f"No matching federated identity record found for presented "
                              f"assertion subject '{subject}'.")
        try:
            if header.get("alg") != "RS256":
                raise InvalidSignature
            matching[0][2].verify(signature, signing_input, padding.PKCS1v15(),
                                  hashes.SHA256())
        except InvalidSignature:
            raise self._error(401, "invalid_client", 700027,
                              "Client assertion failed signature validation.") from None
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if FEDERATED_AUDIENCE not in audiences:
            raise self._error(400, "invalid_request", 700212,
                              "No matching federated identity record found for presented "
                              f"assertion audience '{audience}'.")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or time.time() > exp + _ASSERTION_SKEW:
            raise self._error(400, "invalid_client", 700024,
                              "Client assertion is not within its valid time range.")

    @staticmethod
    def _basic(authorization: str | None) -> tuple[str | None, str | None]:
        if not authorization or not authorization.lower().startswith("basic "):
            return None, None
        try:
            raw = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        user, _, password = raw.partition(":")
        return unquote_plus(user), unquote_plus(password)

    def _resource(self, scope: str | None, tenant: str) -> str:
        if not scope:
            raise self._missing("scope")
        wanted = [s for s in scope.split() if s.lower() not in _RESERVED_SCOPES]
        if len(wanted) != 1 or not wanted[0].endswith("/.default"):
            raise self._error(400, "invalid_scope", 1002012,
                              f"The provided value for scope {scope} is not valid. Client "
                              "credential flows must have a scope value with /.default "
                              "suffixed to the resource identifier (application ID URI).")
        resource = wanted[0][: -len("/.default")]
        if resource not in self.resources:
            raise self._error(400, "invalid_resource", 500011,
                              f"The resource principal named {resource} was not found in the "
                              f"tenant named {tenant}. This can happen if the application has "
                              "not been installed by the administrator of the tenant or "
                              "consented to by any user in the tenant. You might have sent "
                              "your authentication request to the wrong tenant.")
        return resource

    def _authenticate(self, app: _App, raw_tenant: str, form: dict[str, str],
                      basic_secret: str | None) -> bool:
        """Check the client's secret or assertion; True when it used a certificate."""
        secret = form.get("client_secret") or basic_secret
        assertion = form.get("client_assertion")
        if secret and assertion:
            raise self._error(401, "invalid_client", 50027,
                              "Only one client credential may be presented: "
                              "client_secret or client_assertion.")
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise self._error(400, "invalid_request", 50027,
                                  f"client_assertion_type must be '{JWT_BEARER}'.")
            self._check_assertion(app, raw_tenant, assertion)
            return True
        if not secret:
            raise self._error(401, "invalid_client", 7000218,
                              "The request body must contain the following parameter: "
                              "'client_assertion' or 'client_secret'.")
        if app.secret is None or not hmac.compare_digest(app.secret.encode(), secret.encode()):
            raise self._error(401, "invalid_client", 7000215,
                              "Invalid client secret provided. Ensure the secret being sent in "
                              "the request is the client secret value, not the client secret "
                              f"ID, for a secret added to app '{app.client_id}'.")
        if app.secret_expired:
            raise self._error(401, "invalid_client", 7000222,
                              f"The provided client secret keys for app '{app.client_id}' are "
                              "expired. Visit the Azure portal to create new keys for your "
                              "app: https://aka.ms/NewClientSecret, or consider using "
                              "certificate credentials for added security: "
                              "https://aka.ms/certCreds.")
        return False

    def _check_assertion(self, app: _App, raw_tenant: str, assertion: str) -> None:
        try:
            header, claims, signing_input, signature = _split_jwt(assertion)
        except ValueError:
            raise self._error(401, "invalid_client", 50027,
                              "JWT token is invalid or malformed.") from None
        if claims.get("iss") != app.client_id and not (header.get("x5t")
                                                       or header.get("x5t#S256")):
            self._check_federated(app, header, claims, signing_input, signature)
            return
        thumb = str(header.get("x5t#S256") or header.get("x5t") or "")
        # msal pads its base64url thumbprints with '='; Entra accepts both forms.
        if app.certificate is None or thumb.rstrip("=") not in app.thumbprints():
            raise self._error(401, "invalid_client", 700027,
                              "The certificate with identifier used to sign the client "
                              "assertion is not registered on application. [Reason - The key "
                              f"was not found., Thumbprint of key used by client: '{thumb}']")
        key = app.certificate.public_key()
        alg = header.get("alg")
        try:
            if not isinstance(key, rsa.RSAPublicKey):
                raise InvalidSignature
            if alg == "RS256":
                key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
            elif alg == "PS256":
                key.verify(signature, signing_input,
                           padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                       salt_length=hashes.SHA256.digest_size),
                           hashes.SHA256())
            else:
                raise InvalidSignature
        except InvalidSignature:
            raise self._error(401, "invalid_client", 700027,
                              "Client assertion failed signature validation.") from None
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            raise self._error(401, "invalid_client", 700021,
                              "Client assertion application identifier doesn't match "
                              "'client_id' parameter.")
        if claims.get("aud") != f"{self.url}/{raw_tenant}/oauth2/v2.0/token":
            raise self._error(401, "invalid_client", 700023,
                              "Client assertion audience claim does not match Realm issuer.")
        now = time.time()  # msal stamps assertions with the wall clock, not the test's clock
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if (not isinstance(exp, int | float) or now > exp + _ASSERTION_SKEW
                or (isinstance(nbf, int | float) and now < nbf - _ASSERTION_SKEW)):
            raise self._error(401, "invalid_client", 700024,
                              "Client assertion is not within its valid time range.")
        if not claims.get("jti"):
            raise self._error(401, "invalid_client", 50027,
                              "Client assertion contains no jti claim.")
