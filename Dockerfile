# The CPU image: the API, the migration job, Celery beat and CPU workers.
#   docker build -t modelpress .
# GPU workers run Dockerfile.gpu's image (CUDA, onnxruntime-gpu, TensorRT, the kernels); torch is pinned to the
# version in constraints.txt in both.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELPRESS_DATA_DIR=/data

WORKDIR /srv/modelpress

# Dependencies first so that code changes do not reinstall them. onnx2torch, onnx2tf (the LiteRT exporter) and
# tf-keras go in without their declared dependencies, as the Makefile installs them: their pins would replace ours
# (onnx2tf's tensorflow 2.19, onnx, onnxruntime, numpy; tf-keras's full `tensorflow` beside tensorflow-cpu).
COPY pyproject.toml constraints.txt README.md ./
COPY app/__init__.py app/__init__.py
COPY workers/__init__.py workers/__init__.py
RUN pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu . \
 && pip install --no-deps -c constraints.txt onnx2torch onnx2tf tf-keras \
 && rm -rf "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tests"

COPY app app
COPY workers workers
COPY kernels kernels
COPY migrations migrations
COPY alembic.ini ./
RUN pip install --no-deps -c constraints.txt . \
 && useradd --system --uid 10001 --home-dir /srv/modelpress modelpress \
 && mkdir -p /data && chown modelpress /data

USER 10001
VOLUME ["/data"]
EXPOSE 8000
# The API's check; compose gives beat (and the migration job) their own.
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"]
CMD ["modelpress", "api", "--host", "0.0.0.0", "--port", "8000"]
