# PocketLLM Server image: `pocketllm serve` by default; the same image runs `pocketllm worker` and
# `pocketllm migrate` (see compose.yaml and docs/deployment.md).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the files the package build needs: pyproject.toml names README.md as the readme, and the version
# is read from src/pocketllm/__init__.py.
COPY pyproject.toml README.md /tmp/build/
COPY src /tmp/build/src
RUN pip install /tmp/build && rm -rf /tmp/build

# An unprivileged user that owns the data directory (SQLite, generated secrets and local files when
# DATABASE_URL, JWT_SECRET, ENCRYPTION_KEY and STORAGE_URL are not set).
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home --shell /usr/sbin/nologin pocketllm
ENV DATA_DIR=/data
WORKDIR /data
USER pocketllm

EXPOSE 8000

# The slim image has no curl; urlopen raises on a refused connection or a non-2xx status, so the check
# exits non-zero. It fits `pocketllm serve` on port 8000; worker and migrate containers turn it off.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["pocketllm", "serve", "--host", "0.0.0.0", "--port", "8000"]
