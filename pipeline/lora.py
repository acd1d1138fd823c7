"""LoRA candidates: merge a PEFT adapter into its base model once, then score it in full.

vLLM mis-scores LoRA adapters with ``prompt_logprobs`` when requests are batched (open
upstream issues, docs/design.md §4), so an adapter is never given to vLLM: it is merged
into a full checkpoint with PEFT (W + B A x scale, in float32) and the checkpoint is
scored like any other model. Merges are cached under ``<cache>/<hash>/`` where the
hash covers the adapter's and the base model's content, so a nightly run reuses the
merge of an unchanged adapter and can never pick up a stale one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.models import model_content_hash, require_model_dir

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: Path) -> bool:
    """True for a PEFT adapter folder (``adapter_config.json``, no ``config.json``)."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def _base_of(name: str, adapter: Path, base: Path | None) -> Path:
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


def merged_checkpoint(name: str, adapter: Path, base: Path | None, cache_root: Path) -> Path:
    """Folder of the full checkpoint of ``adapter`` merged into its base (made once)."""
    base = _base_of(name, adapter, base)
    require_model_dir(f"{name} (base)", base)
    key = hashlib.sha256(
        f"{model_content_hash(adapter)}\0{model_content_hash(base)}".encode()
    ).hexdigest()[:24]
    target = cache_root / key
    if (target / "config.json").is_file():
        print(f"  {name}: using the cached merge of {adapter} ({target})", file=sys.stderr)
        return target
    print(f"  {name}: merging LoRA adapter {adapter} into {base}", file=sys.stderr, flush=True)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_root.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (ValueError, OSError, KeyError) as err:
        raise PipelineError(
            f"model {name!r}: cannot apply adapter {adapter} to {base}: {err}"
        ) from None
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".merge-") as temporary:
        merged.save_pretrained(temporary)
        AutoTokenizer.from_pretrained(base).save_pretrained(temporary)
        shutil.rmtree(target, ignore_errors=True)
        Path(temporary).rename(target)
        Path(temporary).mkdir()  # TemporaryDirectory removes this empty stand-in.
    return target
