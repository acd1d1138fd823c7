"""LoRA candidates: a PEFT adapter merged into its base model, to be scored in full.

vLLM mis-scores LoRA adapters with ``prompt_logprobs`` when requests are batched (open
upstream issues, docs/design.md §4), so an adapter is never given to vLLM: it is merged
into a full checkpoint with PEFT (W + B A x scale, in float32) and the checkpoint is
scored like any other model. ``pipeline.candidates`` caches the merge under a content
hash of adapter and base, so a nightly run reuses the merge of an unchanged adapter
and can never pick up a stale one.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import PipelineError

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: Path) -> bool:
    """True for a PEFT adapter folder (``adapter_config.json``, no ``config.json``)."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(name: str, adapter: Path, base: Path | None) -> Path:
    """The base model folder of ``adapter``: ``base``, else the one it records if local."""
    if not is_adapter(adapter):
        raise PipelineError(
            f"model {name!r}: {adapter} is not a PEFT LoRA adapter folder (it needs "
            f"{ADAPTER_CONFIG} and no config.json)."
        )
    if base is not None:
        return base
    recorded = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    raise PipelineError(
        f"model {name!r}: {adapter} is a LoRA adapter whose base model "
        f"({recorded!r}) is not a local folder; set models.{name}.base to the base "
        "model's folder."
    )


def merge_adapter(name: str, adapter: Path, base: Path, out: Path) -> None:
    """Write ``base`` with ``adapter`` merged in (float32), and base's tokenizer, to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (ValueError, OSError, KeyError) as err:
        raise PipelineError(
            f"model {name!r}: cannot apply adapter {adapter} to {base}: {err}"
        ) from None
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
