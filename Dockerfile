# The awork-uploads image: workers, Flower, the sandbox and the producer CLI (`awork-uploads ...`).
# Used by compose.yaml; `docker build -t awork-uploads .` works on its own too.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY producers ./producers
COPY workers ./workers
COPY ops ./ops
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check ".[worker,api,ops]"

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/venv /opt/venv
# A fixed non-root user; /staging (shared bytes) and /data (Flower's state) belong to it, so
# fresh named volumes mounted there do too.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home app \
    && mkdir -p /staging /data \
    && chown app:app /staging /data
USER app
WORKDIR /home/app
# 9808: worker metrics (WORKER_METRICS_PORT); 5555: Flower; 8765/8766: the sandbox; 8780: the HTTP API.
EXPOSE 9808 5555 8765 8766 8780
ENTRYPOINT ["awork-uploads"]
CMD ["worker"]
