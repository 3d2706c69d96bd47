# smtp-oauth-relay as a container image (stand-alone, or a sidecar next to a legacy app).
#
#   docker build -t smtp-oauth-relay .
#   docker run -d --name relay --stop-timeout 45 -p 127.0.0.1:2525:2525 \
#     -v /etc/smtp-oauth-relay/config.yaml:/etc/smtp-oauth-relay/config.yaml:ro \
#     -v relay-spool:/var/lib/smtp-oauth-relay \
#     -e RELAY_CLIENT_SECRET=... smtp-oauth-relay
#
# Config: mount it at /etc/smtp-oauth-relay/config.yaml. Inside a container a listener must
# bind 0.0.0.0 to be reachable through -p; keep server.relay_networks to the networks that
# may send without AUTH. Secrets: {env: RELAY_CLIENT_SECRET}, or a Docker/Kubernetes secret
# file with {file: /run/secrets/client-secret}. A template config, every key documented:
#   docker run --rm smtp-oauth-relay example-config > config.yaml
# Stopping: the relay drains for up to delivery.shutdown_timeout (30s) after SIGTERM, and
# Docker kills it after 10s unless told otherwise: give `docker stop -t` / `--stop-timeout`
# (Compose: stop_grace_period) a value above shutdown_timeout.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
# Wheels first (the project's and its dependencies'), then a venv with nothing else in it:
# the final image gets the venv only, without pip, setuptools or build leftovers.
RUN pip wheel --wheel-dir /wheels . \
 && python -m venv /opt/smtp-oauth-relay \
 && /opt/smtp-oauth-relay/bin/pip install --no-index --find-links /wheels smtp-oauth-relay \
 && /opt/smtp-oauth-relay/bin/pip uninstall --yes pip setuptools \
 && /opt/smtp-oauth-relay/bin/smtp-oauth-relay --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="smtp-oauth-relay" \
      org.opencontainers.image.description="SMTP relay to Exchange Online with OAuth 2.0 (XOAUTH2)" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER, and
# host directories for bind mounts can be chowned to it in advance (10025:10025).
RUN groupadd --system --gid 10025 smtp-oauth-relay \
 && useradd --system --uid 10025 --gid 10025 --no-create-home \
      --home-dir /var/lib/smtp-oauth-relay --shell /usr/sbin/nologin smtp-oauth-relay \
 && install -d -o 10025 -g 10025 -m 0700 /var/lib/smtp-oauth-relay \
 && install -d -m 0755 /etc/smtp-oauth-relay
COPY --from=build /opt/smtp-oauth-relay /opt/smtp-oauth-relay
# PYTHONFAULTHANDLER: a fatal signal leaves a traceback in the log, not just an exit code.
# PYTHONSAFEPATH: `python -m ...` (the health check) must not import from the working
# directory, which is the spool volume.
ENV PATH=/opt/smtp-oauth-relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    PYTHONSAFEPATH=1
USER 10025:10025
WORKDIR /var/lib/smtp-oauth-relay
# The spool ($STATE_DIRECTORY is unset here, so spool.directory defaults to
# /var/lib/smtp-oauth-relay/spool). Accepted mail lives here until it is delivered: keep it
# on a named volume or a persistent disk, never on the container's writable layer.
VOLUME ["/var/lib/smtp-oauth-relay"]
# 2525: SMTP from the applications; 8025: /healthz, /readyz, /metrics (http: section).
EXPOSE 2525 8025
# No curl in a slim image: the relay's own interpreter asks /healthz at the address in the
# same config file (falls back to the SMTP greeting when http is disabled).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["python", "-m", "relay.healthcheck", "--config", "/etc/smtp-oauth-relay/config.yaml"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtp-oauth-relay"]
CMD ["run", "--config", "/etc/smtp-oauth-relay/config.yaml"]
