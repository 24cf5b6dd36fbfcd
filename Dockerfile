# One image for the API, the migration job and the workers.
#   docker build -t modelpress .                                  # CPU: onnxruntime
#   docker build -t modelpress:gpu --build-arg ORT_PACKAGE=onnxruntime-gpu .
# The worker image for GPU nodes swaps onnxruntime for onnxruntime-gpu (same API);
# torch stays pinned to the version in constraints.txt.
FROM python:3.11-slim AS base

ARG ORT_PACKAGE=onnxruntime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELPRESS_DATA_DIR=/data

WORKDIR /srv/modelpress

# Dependencies first so that code changes do not reinstall them.
COPY pyproject.toml constraints.txt README.md ./
COPY app/__init__.py app/__init__.py
COPY workers/__init__.py workers/__init__.py
RUN pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu . \
 && pip install --no-deps -c constraints.txt onnx2torch \
 && rm -rf "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tests" \
 && if [ "$ORT_PACKAGE" != "onnxruntime" ]; then \
      pip uninstall -y onnxruntime && pip install "$ORT_PACKAGE"; \
    fi

COPY app app
COPY workers workers
COPY kernels kernels
COPY migrations migrations
COPY alembic.ini ./
RUN pip install --no-deps -c constraints.txt . \
 && useradd --system --uid 10001 --home-dir /srv/modelpress modelpress \
 && mkdir -p /data && chown modelpress /data

USER modelpress
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)" || exit 1
CMD ["modelpress", "api", "--host", "0.0.0.0", "--port", "8000"]
