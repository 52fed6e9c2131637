# stream-mf: one image for every process (`updater`, `query`, `publish`, `recommend`, ...).
#   docker build -t stream-mf:0.1.0 .
#   docker run --rm stream-mf:0.1.0 --help
# Every runtime dependency ships manylinux wheels, so no compiler is needed; the package is
# installed into a venv in a build stage and only the venv is copied into the runtime image.
# No extras: the embedded broker (`embedded`) is for local runs and tests; the image talks to
# a real Kafka (docker-compose.yml).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# metadata first, then the code: pyproject.toml names README.md as the long description
COPY pyproject.toml README.md ./
COPY stream_mf ./stream_mf
COPY consumers ./consumers
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="stream-mf" \
      org.opencontainers.image.description="Streaming matrix-factorisation recommender over Kafka with RocksDB state" \
      org.opencontainers.image.licenses="Apache-2.0"

# a fixed, unprivileged uid/gid: the named state volume is initialised from this image's
# /var/lib/stream-mf, so it is owned by this user and the updater and query replicas agree
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
    && mkdir -p /var/lib/stream-mf/state \
    && chown -R app:app /var/lib/stream-mf

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/home/app/.cache/numba \
    STREAM_MF_STATE_DIR=/var/lib/stream-mf/state \
    STREAM_MF_METRICS__HOST=0.0.0.0 \
    STREAM_MF_METRICS__PORT=9464

USER app
WORKDIR /var/lib/stream-mf
EXPOSE 9464

# `stream-mf updater` / `stream-mf query` handle SIGTERM: the current batch is finished and
# committed before exit (give them a stop grace period of a few seconds)
ENTRYPOINT ["stream-mf"]
CMD ["--help"]
