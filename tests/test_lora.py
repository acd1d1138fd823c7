"""LoRA candidates are merged once (cached by content hash) and scored as full models.

Both spellings are tested: the adapter kind (`adapter`, `base`) and, as older configs
wrote it, an adapter folder given as `path`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tests.conftest import DEFAULT_CONFIG, TINY_P0, run_cli

# Same float32 tolerance as vLLM against transformers on the full models.
HF_TOLERANCE_NATS = 1e-4
SMALL_RUN = ["prompts.limit=6", "sampling.num_samples=4"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on tiny-p0 with non-zero B, so it really changes the model."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TINY_P0, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, lora)
    path = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/not-on-this-machine"
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_lora_candidate_matches_hugging_face_with_the_adapter(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "merged"
    run_dir = tmp_path / "run"
    args = [
        "run",
        "--config",
        DEFAULT_CONFIG,
        "--out",
        run_dir,
        *SMALL_RUN,
        f"models.p1.path={adapter}",
        f"models.p1.base={TINY_P0}",
        f"merged_models_dir={cache}",
    ]
    assert run_cli(*args) == 0
    assert f"p1: making the merge of LoRA adapter {adapter} into {TINY_P0}" in (
        capsys.readouterr().err
    )
    (merged,) = cache.iterdir()
    identity = json.loads((run_dir / "manifest.json").read_text())["models"]["p1"]
    assert identity["kind"] == "lora"
    assert identity["path"] == str(merged)
    assert identity["inputs"]["adapter"]["path"] == str(adapter)
    assert identity["inputs"]["base"]["path"] == str(TINY_P0)

    base = AutoModelForCausalLM.from_pretrained(TINY_P0, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()  # unmerged: applied on the fly
    prompts = {
        r["prompt_id"]: r["prompt_token_ids"]
        for r in pq.read_table(run_dir / "prompts").to_pylist()
    }
    worst = 0.0
    for row in pq.read_table(run_dir / "scores" / "p1").to_pylist():
        ids = prompts[row["prompt_id"]] + row["completion_token_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(with_adapter(torch.tensor([ids])).logits[0].double(), -1)
        first = len(ids) - row["L"]
        expected = [logprobs[j - 1, ids[j]].item() for j in range(first, len(ids))]
        worst = max(worst, float(np.max(np.abs(np.subtract(expected, row["token_logprobs"])))))
    assert worst < HF_TOLERANCE_NATS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert abs(summary["delta_H_nats"]) > 0  # the adapter moved the model

    # A second run, with the adapter kind's spelling, reuses the merge.
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    args[args.index(run_dir)] = tmp_path / "second"
    args[args.index(f"models.p1.path={adapter}")] = f"models.p1={{adapter: {adapter}}}"
    assert run_cli(*args) == 0
    assert f"p1: using the cached merge of LoRA adapter {adapter}" in capsys.readouterr().err
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp
    second = json.loads((tmp_path / "second" / "manifest.json").read_text())["models"]["p1"]
    assert second == identity


def test_adapter_without_a_local_base_is_refused(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(
        "run",
        "--config",
        DEFAULT_CONFIG,
        "--out",
        tmp_path / "run",
        *SMALL_RUN,
        f"models.p1.path={adapter}",
        f"merged_models_dir={tmp_path / 'merged'}",
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'some-org/not-on-this-machine'" in err
    assert "models.p1.base" in err
    assert not (tmp_path / "run").exists()
