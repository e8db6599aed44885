# ai-billing: `billing-service serve` on a slim Python base, as a non-root user.
#
# Build stage: installs the client stubs and the service (with the tracing extra) into a
# virtualenv. The runtime stage copies only that virtualenv: no compiler, no pip cache, no
# sources, no tests. tests/ops/test_image.py runs the same install steps outside Docker.

FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/billing
COPY clients/ clients/
COPY pyproject.toml README.md ./
COPY service/ service/
# Dependency ranges live in pyproject.toml (and clients/pyproject.toml).
# hadolint ignore=DL3013
RUN /opt/billing/bin/pip install ./clients ".[tracing]"


FROM python:3.11-slim-bookworm

ENV PATH=/opt/billing/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BILLING_LOG_FORMAT=json

RUN groupadd --system --gid 10001 billing \
    && useradd --system --uid 10001 --gid billing --home-dir /var/lib/billing --create-home billing

COPY --from=build /opt/billing /opt/billing

USER 10001:10001
WORKDIR /var/lib/billing

# gRPC API, health-only listener (kubelet probes), Prometheus metrics.
EXPOSE 50051 50052 9464

ENTRYPOINT ["billing-service"]
CMD ["serve"]
