"""Sandbox mode: the relay runs against local stand-ins instead of Microsoft's services.

``smtp-oauth-relay run --sandbox`` (and ``make run``) needs no Microsoft account: a fake
Entra ID issues tokens over HTTPS, a fake Exchange Online demands STARTTLS and a valid
XOAUTH2 token and a fake Microsoft Graph a token for Graph with Mail.Send, exactly as the
real ones do, and both keep every delivered message as a file.
The user's profiles, users and routing are used unchanged; only credentials and upstreams
are pointed at the stand-ins, and the spool lives in the sandbox directory. Sandbox mode
is only ever entered on request and announced loudly — it is never a fallback for a
config that lacks credentials.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from relay.config import Config, Credential, Graph, SecretRef, Upstream
from relay.core.net import host_port
from relay.sandbox.entra import FakeEntra
from relay.sandbox.exchange import FakeExchange
from relay.sandbox.graph import GRAPH_AUDIENCE, FakeGraph
from relay.sandbox.pki import create_pki

SANDBOX_UPSTREAM = "sandbox"


def spool_directory(directory: Path) -> Path:
    """The relay's spool in sandbox mode, in the sandbox directory ``directory``: where
    ``queue --sandbox`` finds it without reading any configuration."""
    return directory.resolve() / "spool"


class Sandbox:
    """Starts the stand-ins and rewrites a config to use them."""

    def __init__(self, directory: Path, *, token_lifetime: float = 3600,
                 smtp_port: int | None = None, http_port: int | None = None) -> None:
        self.directory = directory.resolve()
        # Ports chosen on the command line (`make run SMTP_PORT=...`) over the config's:
        # the first listener's and the HTTP endpoint's.
        self.smtp_port = smtp_port
        self.http_port = http_port
        self._secrets: dict[tuple[str, str], str] = {}      # per (tenant, client id)
        self.maildir = self.directory / "mail"
        self._pki = create_pki(self.directory / "pki")
        self.entra = FakeEntra(self._pki, token_lifetime=token_lifetime)
        self.exchange = FakeExchange(self._pki, self.entra.validate_token, maildir=self.maildir)
        self.graph = FakeGraph(
            self._pki, lambda token: self.entra.validate_token(token, GRAPH_AUDIENCE),
            maildir=self.maildir)

    async def start(self) -> None:
        self.maildir.mkdir(parents=True, exist_ok=True)
        self.entra.start()
        try:
            self.graph.start()
            await self.exchange.start()
        except BaseException:
            self.graph.stop()
            self.entra.stop()
            raise

    async def stop(self) -> None:
        try:
            await self.exchange.stop()
        finally:
            self.graph.stop()
            self.entra.stop()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def apply(self, config: Config) -> Config:
        """Point every credential and profile of ``config`` at the stand-ins, and its
        ports at those chosen on the command line; the stand-ins take it at once."""
        sandboxed = self.rewrite(config)
        self.adopt(sandboxed)
        return sandboxed

    def rewrite(self, config: Config) -> Config:
        """:meth:`apply` without telling the stand-ins: for a reload, which may yet be
        refused. Each app keeps its secret for as long as the sandbox runs, so a
        credential that did not change is the same credential (and keeps its token)."""
        credentials: dict[str, Credential] = {}
        for name, cred in config.credentials.items():
            app = (cred.tenant_id.lower(), cred.client_id.lower())
            secret = self._secrets.setdefault(app, secrets.token_urlsafe(24))
            credentials[name] = Credential(
                tenant_id=cred.tenant_id, client_id=cred.client_id, cloud=cred.cloud,
                authority=self.entra.url, scope=cred.scopes[0],
                client_secret=SecretRef(value=secret), ca_file=self._pki.ca_file,
                refresh_before=cred.refresh_before, secret_expires=cred.secret_expires)
        upstream = Upstream(host=self.exchange.host, port=self.exchange.port, tls="starttls",
                            ca_file=self._pki.ca_file, timeout=30)
        profiles = {name: profile.model_copy(update={"upstream": SANDBOX_UPSTREAM})
                    for name, profile in config.profiles.items()}
        spool = config.spool.model_copy(update={"directory": spool_directory(self.directory)})
        server, http = config.server, config.http
        if self.smtp_port is not None:
            first = server.listeners[0].model_copy(update={"port": self.smtp_port})
            server = server.model_copy(update={"listeners": [first, *server.listeners[1:]]})
        if self.http_port is not None:
            http = http.model_copy(update={"port": self.http_port})
        return config.model_copy(update={
            "server": server,
            "http": http,
            "spool": spool,
            "credentials": credentials,
            "upstreams": {SANDBOX_UPSTREAM: upstream},
            "graph": Graph(url=self.graph.url, ca_file=self._pki.ca_file, timeout=30),
            "profiles": profiles,
        })

    def adopt(self, config: Config) -> None:
        """Have the stand-ins know what a :meth:`rewrite` config uses: its apps with their
        secrets at Entra ID, its profiles' Send As permissions at Exchange (as an
        administrator would grant them)."""
        graph = {p.credential for p in config.profiles.values() if p.transport == "graph"}
        for name, cred in config.credentials.items():
            assert cred.client_secret is not None and cred.client_secret.value is not None
            # The permissions an administrator grants: Graph's only where a profile uses it.
            roles = ("SMTP.SendAsApp", "Mail.Send") if name in graph else ("SMTP.SendAsApp",)
            self.entra.add_app(cred.tenant_id, cred.client_id,
                               secret=cred.client_secret.value, roles=roles)
        for profile in config.profiles.values():
            self.graph.add_mailbox(profile.mailbox, *profile.send_as)
            for pattern in profile.send_as:
                self.exchange.allow_send_as(profile.mailbox, pattern)

    def banner(self, listening: list[tuple[str, int]]) -> str:
        where = ", ".join(host_port(h, p) for h, p in listening)
        lines = [
            "SANDBOX MODE - nothing is sent to Microsoft, no mail leaves this machine.",
            f"Entra ID (token endpoint) is simulated at {self.entra.url}",
            f"Exchange Online is simulated at {self.exchange.host}:{self.exchange.port} "
            "(STARTTLS + XOAUTH2 enforced)",
            f"Microsoft Graph (sendMail, for transport: graph) is simulated at "
            f"{self.graph.url}",
            f"Delivered messages are kept in {self.maildir}",
            f"The relay's queue (spool) is {spool_directory(self.directory)}",
            f"Send mail to the relay at {where}",
        ]
        width = max(len(line) for line in lines) + 4
        bar = "#" * width
        body = "\n".join(f"# {line.ljust(width - 4)} #" for line in lines)
        return f"{bar}\n{body}\n{bar}"
