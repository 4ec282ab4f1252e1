# syntax=docker/dockerfile:1
# One image for every voicepipe process (compose picks the command), built in three stages:
#   deps     wheels of every dependency in pyproject.toml (llama-cpp-python compiles llama.cpp here);
#            it sees only pyproject.toml, so a code edit never rebuilds it
#   app      the wheel of voicepipe itself, from the source
#   runtime  slim Python without compilers, installed from those wheels, running as a non-root user
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS deps
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# llama.cpp is tuned to the CPU it is built on by default; for an image that runs on other
# machines pass e.g. --build-arg CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON"
ARG CMAKE_ARGS=""
ENV CMAKE_ARGS=${CMAKE_ARGS} PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write(chr(10).join(deps) + chr(10))" \
    && mkdir -p /wheels/deps && cp requirements.txt /wheels/deps/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels/deps -r requirements.txt

FROM ${PYTHON_IMAGE} AS app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY pyproject.toml README.md ./
COPY shared shared
COPY gateway gateway
COPY workers workers
COPY voicepipe voicepipe
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels/app .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# libgomp: the OpenMP runtime llama.cpp is linked against (the only native library not in a wheel)
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# The wheels are mounted from the build stages, not copied, so they add nothing to the image
RUN --mount=type=bind,from=deps,source=/wheels/deps,target=/wheels \
    pip install --no-index --find-links /wheels -r /wheels/requirements.txt
RUN --mount=type=bind,from=app,source=/wheels/app,target=/wheels \
    pip install --no-index --no-deps /wheels/*.whl
RUN useradd --system --uid 10001 --user-group --home-dir /app --create-home voicepipe
USER voicepipe
WORKDIR /app
EXPOSE 8000
# The gateway's liveness (the default command); compose gives every other service its own check
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["voicepipe", "gateway", "--host", "0.0.0.0", "--port", "8000"]
