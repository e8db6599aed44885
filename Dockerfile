# ai-billing: `billing-service serve` on a slim Python base, as a non-root user.
#
# Build stage: installs the client and the service (with the tracing extra) into a virtualenv
# with uv, exactly as uv.lock pins them (the same lock scripts/serve and scripts/test install
# from). The runtime stage copies only that virtualenv: no compiler, no uv, no caches, no
# sources, no tests. tests/ops/test_image.py runs the same install steps outside Docker.

FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/billing

WORKDIR /src
# The version scripts/uv pins (tests/ops/test_image.py checks that they agree).
RUN pip install uv==0.13.9
COPY clients/ clients/
COPY pyproject.toml uv.lock README.md ./
COPY service/ service/
RUN uv sync --locked --no-editable --extra tracing


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
