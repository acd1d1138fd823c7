"""Device profiles of the engines, and how a shard is handed to vLLM on each device.

CI has no GPU, so the CUDA profile is checked by its settings and by the calls the
sample stage makes to an engine: a recording stand-in for ``LLM.generate`` that
returns no completions (the real engine runs in every end-to-end test on CPU).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest

from pipeline.artifacts import PROMPTS_SCHEMA
from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engine import resolve_profile
from pipeline.errors import PipelineError
from pipeline.sample import sample_shard, token_budget_batches


def test_cpu_profile_defaults_and_explicit_values() -> None:
    profile = resolve_profile(EngineConfig(), "cpu", longest_prompt=10, num_samples=8)
    assert profile.device == "cpu"
    assert not profile.one_call_per_shard
    assert profile.enforce_eager is True
    assert profile.kv_cache_memory_bytes == 256 * 1024**2
    assert profile.max_num_batched_tokens == 4096
    assert profile.environment["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert profile.environment["OMP_WAIT_POLICY"] == "PASSIVE"
    # One prompt x G must fit a step, or its seeded prefill would be chunked.
    assert resolve_profile(EngineConfig(), "cpu", 1000, 8).max_num_batched_tokens == 8000
    explicit = EngineConfig(enforce_eager=False, kv_cache_memory_bytes=1 << 20)
    profile = resolve_profile(explicit, "cpu", 10, 8)
    assert (profile.enforce_eager, profile.kv_cache_memory_bytes) == (False, 1 << 20)


def test_cuda_profile_leaves_vllm_its_defaults() -> None:
    profile = resolve_profile(EngineConfig(tensor_parallel_size=4), "cuda", 1000, 8)
    assert profile.device == "cuda"
    assert profile.one_call_per_shard
    assert profile.enforce_eager is False
    assert profile.kv_cache_memory_bytes is None
    assert profile.max_num_batched_tokens is None
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in profile.environment
    assert "OMP_WAIT_POLICY" not in profile.environment


def test_tensor_parallel_needs_gpus() -> None:
    with pytest.raises(PipelineError, match="tensor_parallel_size=2 needs GPUs"):
        resolve_profile(EngineConfig(tensor_parallel_size=2), "cpu", 10, 8)


def test_token_budget_batches() -> None:
    assert list(token_budget_batches([3, 3, 3, 3], 2, 12)) == [range(0, 2), range(2, 4)]
    # A prompt whose cost alone exceeds the budget still gets a batch of its own.
    assert list(token_budget_batches([10, 1], 2, 5)) == [range(0, 1), range(1, 2)]
    assert list(token_budget_batches([3, 3, 3, 3], 2, None)) == [range(0, 4)]


class _RecordingEngine:
    """Records the prompts of each ``generate`` call; returns no completions."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, requests: list[Any], params: list[Any], use_tqdm: bool) -> list[Any]:
        self.calls.append(len(requests))
        return [SimpleNamespace(outputs=[]) for _ in requests]


@pytest.mark.engine  # imports vLLM for SamplingParams
@pytest.mark.parametrize(("device", "calls"), [("cuda", [64]), ("cpu", [32, 32])])
def test_a_shard_goes_to_vllm_in_one_call_on_cuda(device: str, calls: list[int]) -> None:
    prompts = pa.Table.from_pylist(
        [
            {"prompt_id": str(i), "source": "x", "prompt_token_ids": [1] * 16, "sampling_seed": i}
            for i in range(64)
        ],
        schema=PROMPTS_SCHEMA,
    )
    # CPU: a step holds 4096 tokens = 32 prompts of 16 tokens x 8 samples.
    profile = resolve_profile(EngineConfig(), device, longest_prompt=16, num_samples=8)  # type: ignore[arg-type]
    engine = _RecordingEngine()
    sample_shard(
        engine,  # type: ignore[arg-type]
        prompts,
        SamplingConfig(num_samples=8),
        frozenset({2}),
        profile,
        first_sample_idx=0,
        seeds=list(range(64)),
    )
    assert engine.calls == calls
