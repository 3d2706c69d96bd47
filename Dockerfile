# smtp-oauth-relay as a container (e.g. a sidecar next to a legacy application).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10025 --home-dir /var/lib/smtp-oauth-relay --create-home relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER relay
WORKDIR /var/lib/smtp-oauth-relay
VOLUME ["/var/lib/smtp-oauth-relay"]
EXPOSE 2525
# Mount the config at /etc/smtp-oauth-relay/config.yaml; pass the client secret as an env
# variable or a Docker secret ({file: /run/secrets/client-secret} in the config).
# Inside a container the listener must bind 0.0.0.0 (or the pod IP) to be reachable; limit
# server.relay_networks to the networks that may send without AUTH.
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtp-oauth-relay"]
CMD ["run", "--config", "/etc/smtp-oauth-relay/config.yaml"]
