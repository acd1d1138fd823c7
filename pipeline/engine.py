"""vLLM engines as the sample and score stages need them.

Import this module only where a model runs: importing vLLM takes seconds, and the
``stats`` stage never needs it. ``open_engine`` sets the environment vLLM reads at
import time, builds an ``LLM`` with the settings that make its log-probs trustworthy
(raw log-probs, no prefix caching, no model generation defaults) and shuts it down
afterwards so that the next model's engine has the memory.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import EngineConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from vllm import LLM

# Set before vLLM is imported. In-process engine: start-up in seconds, and one
# process to interrupt. Passive OpenMP waiting: spinning threads slowed sampling
# 8-13x when anything else ran on the machine (DESIGN.md §4).
_ENVIRONMENT_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_WAIT_POLICY": "PASSIVE",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TOKENIZERS_PARALLELISM": "false",
}


def _configure_environment() -> None:
    for key, value in _ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # vLLM's kernel registry touches a deprecated torch attribute while scanning
    # modules; the warning is about vLLM's code, not the user's, so keep it off screen.
    warnings.filterwarnings(
        "ignore", message="`torch.distributed.reduce_op` is deprecated", category=FutureWarning
    )


@contextmanager
def open_engine(
    model_name: str,
    model_path: Path,
    engine: EngineConfig,
    max_model_len: int,
    max_num_batched_tokens: int,
    seed: int,
) -> Iterator[LLM]:
    """An ``LLM`` for ``model_path``, shut down when the block ends.

    A model vLLM cannot load (corrupt weights, unsupported architecture) is reported
    as a ``PipelineError`` naming the model, with vLLM's own message.
    """
    _configure_environment()
    from vllm import LLM

    options = {}
    if engine.kv_cache_memory_bytes is not None:
        options["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
    try:
        llm = LLM(
            model=str(model_path),
            dtype=engine.dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            enforce_eager=engine.enforce_eager,
            # With prefix caching on, prompt log-probs can depend on request order.
            enable_prefix_caching=False,
            # Sampling parameters come from our config alone, never from the model's
            # generation_config.json.
            generation_config="vllm",
            logprobs_mode="raw_logprobs",
            **options,
        )
    except Exception as err:  # vLLM raises many types; all mean "cannot load this model"
        raise PipelineError(
            f"model {model_name!r}: vLLM could not load {model_path}: {err}"
        ) from err
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
