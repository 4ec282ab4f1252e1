# One image for every voicepipe process; compose picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY gateway gateway
COPY workers workers
COPY voicepipe voicepipe
RUN pip install .
EXPOSE 8000
CMD ["voicepipe", "gateway", "--host", "0.0.0.0", "--port", "8000"]
