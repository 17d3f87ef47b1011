# The spicesync worker image: Debian's Python 3.11, the locked dependencies (uv.lock, no dev or
# extras) in /opt/spicesync, run as an unprivileged user; the entry point is the CLI and the
# default command the worker (`... migrate`, `... setup-namespace` run the operator commands).
# Build: `docker build -t spicesync:0.1.0 .`; offline, on a locally made base image:
# deploy/README.md ("Building the image").
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# Debian's packages are not pinned (DL3008): a suite keeps only the current version of each, so
# a pin breaks the build at the next security update. BASE_IMAGE pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# Behind a TLS-intercepting proxy, PyPI's certificate is signed by the proxy's CA: give its
# bundle as a file inside the build (podman build -v BUNDLE:/run/ca.crt:ro --build-arg
# CA_BUNDLE=/run/ca.crt); pip and uv then verify against it. Nothing of it stays in the image.
ARG CA_BUNDLE=""
# The same uv as the Makefile's, from PyPI.
RUN if [ -n "$CA_BUNDLE" ]; then export PIP_CERT="$CA_BUNDLE"; fi \
    && python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9
ENV UV_PROJECT_ENVIRONMENT=/opt/spicesync \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
# Third-party dependencies first (a layer that changes only with the lock file) ...
COPY pyproject.toml uv.lock README.md ./
COPY packaging/client/pyproject.toml packaging/client/hatch_build.py packaging/client/
RUN if [ -n "$CA_BUNDLE" ]; then export SSL_CERT_FILE="$CA_BUNDLE"; fi \
    && /opt/uv/bin/uv sync --frozen --no-dev --no-editable --no-install-project \
        --no-install-package spicesync-client
# ... then spicesync itself, as wheels (not editable: the source is not in the final image).
COPY spicesync/ spicesync/
COPY workflows/ workflows/
COPY activities/ activities/
COPY workers/ workers/
COPY starters/ starters/
COPY bench/ bench/
COPY chaos/ chaos/
RUN if [ -n "$CA_BUNDLE" ]; then export SSL_CERT_FILE="$CA_BUNDLE"; fi \
    && /opt/uv/bin/uv sync --frozen --no-dev --no-editable \
    && /opt/spicesync/bin/spicesync --help > /dev/null

FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && useradd --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin spicesync \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/spicesync
COPY --from=build /opt/spicesync /opt/spicesync
# Production settings; secrets and addresses come from the deployment (deploy/env.example).
# The worker writes nothing by default in production; the state directory is where anything
# would go (mount a writable volume there under a read-only root filesystem). Metrics and
# health listen on every interface of the container, so Prometheus and the kubelet reach them
# (worker 9464 and 9466; outbox relay 9465 and 9467; CDC relay 9468 and 9469; NATS relay 9470
# and 9471).
ENV PATH=/opt/spicesync/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SPICESYNC_ENV=production \
    SPICESYNC_STATE_DIR=/var/lib/spicesync \
    SPICESYNC_METRICS_ADDRESS=0.0.0.0:9464 \
    SPICESYNC_HEALTH_ADDRESS=0.0.0.0:9466 \
    SPICESYNC_OUTBOX_METRICS_ADDRESS=0.0.0.0:9465 \
    SPICESYNC_OUTBOX_HEALTH_ADDRESS=0.0.0.0:9467 \
    SPICESYNC_CDC_METRICS_ADDRESS=0.0.0.0:9468 \
    SPICESYNC_CDC_HEALTH_ADDRESS=0.0.0.0:9469 \
    SPICESYNC_NATS_METRICS_ADDRESS=0.0.0.0:9470 \
    SPICESYNC_NATS_HEALTH_ADDRESS=0.0.0.0:9471
WORKDIR /var/lib/spicesync
USER 10001:10001
EXPOSE 9464 9465 9466 9467 9468 9469 9470 9471
# SIGTERM drains in-flight activities for SPICESYNC_SHUTDOWN_GRACE_SECONDS, then exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9466/livez', timeout=4)"]
ENTRYPOINT ["spicesync"]
CMD ["worker"]
