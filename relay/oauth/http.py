"""The HTTP session msal talks to Entra ID through: a pinned CA, proxies, timeouts.

- :class:`EntraSession`: a ``requests`` session that trusts exactly ``ca_file`` (when one is
  set), honours HTTPS_PROXY / NO_PROXY, and gives every request a timeout;
- :data:`HTTP_TIMEOUT`: the (connect, read) timeout for every request to Entra ID.

requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment silently override a
``verify=`` given to it, so a configured ``credentials.<name>.ca_file`` (a TLS-inspecting
proxy's CA, a test CA) would be ignored on a machine that sets them for other programs.
The CA is therefore pinned after the environment has been merged; ``trust_env`` stays on,
since the proxy settings come from the environment too.
"""

from __future__ import annotations

from typing import Any

import requests

HTTP_TIMEOUT = (10.0, 30.0)  # (connect, read) seconds for every request to Entra ID


class EntraSession(requests.Session):
    """A requests session that trusts exactly ``ca_file`` (when set) and honours proxies.

    requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override ``verify``, so the CA is
    pinned after the environment has been merged; ``trust_env`` stays on for HTTPS_PROXY.
    """

    def __init__(self, ca_file: str | None, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._ca_file = ca_file
        self._timeout = timeout
        adapter = requests.adapters.HTTPAdapter(max_retries=1)  # as msal's own default
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self._ca_file:
            settings["verify"] = self._ca_file
        return settings

    def request(self, method: str | bytes, url: str | bytes,
                *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        return super().request(method, url, *args, **kwargs)
