# A CPU image that serves run directories (or ONNX exports) with `tunesmith serve`: docs/serving.md#docker.
#   docker build -t tunesmith-serve .
#   docker run --rm -p 8000:8000 -e TUNESMITH_API_KEY=secret -v "$PWD/runs/sentiment:/runs/model:ro" tunesmith-serve
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    TUNESMITH_CACHE=/tmp/tunesmith-cache
WORKDIR /app

# torch first, from the CPU wheels: the default index would pull a multi-GB CUDA build
RUN pip install torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[onnx]"

# not root; the model folder is mounted read-only
RUN useradd --create-home --uid 10001 tunesmith
USER tunesmith
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
# 0.0.0.0 inside the container; publish the port on the host as narrowly as needed (-p 127.0.0.1:8000:8000)
ENTRYPOINT ["tunesmith", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/runs/model"]
