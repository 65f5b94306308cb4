# The bot's runtime image: onnxruntime, python-telegram-bot, SQLAlchemy; no torch.
#
#   docker build -t speechbot .
#   docker run -d --name speechbot -e TELEGRAM_BOT_TOKEN=... -v speechbot-data:/data speechbot
#
# GPU inference: build on a CUDA base with onnxruntime-gpu and run with --gpus all. With MODEL_PATH unset the
# bot then serves the bundled voices' CUDA twins, bot/assets/*-cuda.onnx, their networks in fp32 (the int8
# files have no CUDA kernel). Not yet built or run on a GPU (docs/operations.md, "A GPU image"):
#   docker build -t speechbot:gpu --build-arg ONNXRUNTIME=gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
#   docker run -d --gpus all -e ONNX_PROVIDERS=cuda -e TELEGRAM_BOT_TOKEN=... -v speechbot-data:/data speechbot:gpu
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ARG ONNXRUNTIME=cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# CUDA base images come without Python; the slim Python image already has it.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY db ./db
# Two torch-free modules of training's package that the bot shares: text cleaning and sampling settings.
COPY model/__init__.py model/text.py model/sampling.py ./model/
# The runtime dependencies from pyproject.toml and the PostgreSQL driver (the `postgres` extra), so one
# image serves SQLite and PostgreSQL (compose.yaml); the `train` extra with torch is not installed.
# onnxruntime and onnxruntime-gpu provide the same module, so the GPU build swaps one for the other.
RUN pip install '.[postgres]' \
    && if [ "$ONNXRUNTIME" = "gpu" ]; then pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.20,<2"; fi \
    && for voice in speechbot speechbot-cuda speeches speeches-cuda; do \
           test -s /opt/venv/lib/python3*/site-packages/bot/assets/$voice.onnx || exit 1; \
       done

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin speechbot \
    && mkdir -p /data && chown speechbot /data
USER speechbot
VOLUME /data

ENV DATABASE_URL=sqlite:////data/bot.db \
    HEARTBEAT_FILE=/tmp/speechbot.heartbeat \
    WEBHOOK_LISTEN=0.0.0.0 \
    METRICS_LISTEN=0.0.0.0 \
    LOG_LEVEL=INFO

# Webhook mode only (WEBHOOK_URL set); long polling needs no open port. Metrics (METRICS_PORT set) take a port too.
EXPOSE 8443
# The bot touches HEARTBEAT_FILE every 30 s from its event loop; stale means stuck or dead.
HEALTHCHECK --interval=60s --timeout=10s --start-period=60s --retries=3 CMD ["speechbot", "healthcheck"]
# python-telegram-bot stops gracefully on SIGTERM (docker stop).
CMD ["speechbot", "run"]
