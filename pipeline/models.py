"""Model folders, their content hashes and the tokenizer contract between a run's models.

Nothing here runs a model: it checks and hashes model folders for provenance
(``pipeline.candidates`` builds the models' identities on these hashes), loads
tokenizers and checks that every model of a run shares one, because token ids travel unchanged
from sampling to scoring (docs/design.md §3) and mean the same thing only under one
vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_HASH_CHUNK = 1 << 20


def require_model_dir(name: str, path: Path) -> None:
    """Refuse a model path that is not a Hugging Face model folder."""
    if not path.is_dir():
        raise PipelineError(f"model {name!r}: folder {path} does not exist.")
    if not (path / "config.json").is_file():
        raise PipelineError(
            f"model {name!r}: {path} has no config.json; expected a Hugging Face model "
            "folder (config, weights and tokenizer). A PEFT LoRA adapter folder "
            "(adapter_config.json) is merged into its base before scoring."
        )


def model_content_hash(path: Path) -> str:
    """SHA-256 over every file of a model folder (relative names and bytes, sorted)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def model_context_length(path: Path) -> int:
    """The model's ``max_position_embeddings`` from its ``config.json``."""
    config = json.loads((path / "config.json").read_text())
    length = config.get("max_position_embeddings")
    if not isinstance(length, int):
        raise PipelineError(
            f"{path}/config.json has no max_position_embeddings; set "
            "engine.max_model_len explicitly."
        )
    return length


def load_tokenizer(name: str, path: Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored with a model."""
    from transformers import AutoTokenizer

    require_model_dir(name, path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise PipelineError(f"model {name!r}: cannot load a tokenizer from {path}: {err}") from None


def _tokenizer_contract(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    return {
        "vocabulary": tokenizer.get_vocab(),
        "special tokens": {
            role: getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "pad", "unk")
        },
    }


def check_shared_tokenizer(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    """Refuse models whose vocabularies or special-token ids differ.

    The first model is the reference; each other one must match it exactly.
    """
    (reference_name, reference), *others = tokenizers.items()
    expected = _tokenizer_contract(reference)
    for name, tokenizer in others:
        actual = _tokenizer_contract(tokenizer)
        for part, value in expected.items():
            if actual[part] != value:
                detail = ""
                if part == "vocabulary":
                    differing = set(value.items()) ^ set(actual[part].items())
                    detail = f" ({len(differing) // 2 or len(differing)} entries differ)"
                else:
                    detail = f" ({value} vs {actual[part]})"
                raise PipelineError(
                    f"models {reference_name!r} and {name!r} do not share a tokenizer: "
                    f"their {part} differ{detail}. Importance weights compare the same "
                    "token ids under both models, so both must use one tokenizer."
                )
