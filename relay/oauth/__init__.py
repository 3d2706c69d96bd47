"""Access tokens from Microsoft Entra ID for the upstream's XOAUTH2 login.

- relay.oauth.registry: :class:`Tokens`, one provider per credential, kept across reloads;
- relay.oauth.provider: :class:`TokenProvider`, one credential's token, cached, fetched
  once for all callers and renewed before it expires;
- relay.oauth.token: :class:`Token`, what a token says about itself, :class:`TokenError`;
- relay.oauth.advice: what Entra ID's error codes mean and what fixes them;
- relay.oauth.certificates: the one place certificate files and their passphrase are read;
- relay.oauth.http: the HTTP session msal uses (pinned CA, proxies, timeouts).

Tokens are secrets: they are registered for scrubbing as soon as they are received and
never appear in a log line, an error or an exception.
"""
