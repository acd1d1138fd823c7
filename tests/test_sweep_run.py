"""A step-size sweep run end to end on the demo pair, through the real CLI and vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.sweep import SWEEP_FIGURE
from tests.conftest import DEFAULT_CONFIG, TINY_P1, run_cli

# Same float32 tolerance as vLLM against transformers on the full models.
HF_TOLERANCE_NATS = 1e-4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores(run_dir: Path, model: str) -> list[dict]:
    return pq.read_table(run_dir / "scores" / model).to_pylist()


def test_a_sweep_scores_every_step_size_on_the_same_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert (
        run_cli(
            "run",
            "--config",
            DEFAULT_CONFIG,
            "--out",
            run_dir,
            "prompts.limit=4",
            "sampling.num_samples=4",
            f"models.p1={{from: p0, to: {TINY_P1}, etas: [0, 1]}}",
            f"merged_models_dir={tmp_path / 'cache'}",
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "step-size sweep p0 -> tiny-p1" in err
    assert f"sweep figure written to {run_dir / SWEEP_FIGURE}" in err
    assert (run_dir / SWEEP_FIGURE).read_bytes().startswith(PNG_SIGNATURE)

    manifest = json.loads((run_dir / "manifest.json").read_text())
    identity = manifest["models"]["p1@eta=1"]
    assert identity["kind"] == "interpolate"
    assert Path(identity["path"]).parent == tmp_path / "cache"
    assert identity["inputs"]["eta"] == 1.0
    assert identity["inputs"]["from"]["model"] == "p0"
    assert identity["inputs"]["to"]["path"] == str(TINY_P1)

    # eta = 0 is p0 itself: the same log-probs to the bit, so delta H is exactly 0.
    reference, at_zero = _scores(run_dir, "p0"), _scores(run_dir, "p1@eta=0")
    assert [r["token_logprobs"] for r in at_zero] == [r["token_logprobs"] for r in reference]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["candidates"]) == {"p1@eta=0", "p1@eta=1"}
    assert summary["candidates"]["p1@eta=0"]["delta_H_nats"] == 0.0
    assert summary["candidates"]["p1@eta=0"]["delta_H1_nats"] == 0.0
    assert summary["candidates"]["p1@eta=1"]["delta_H_nats"] != 0.0

    # eta = 1 is tiny-p1: its scores agree with transformers on tiny-p1.
    model = AutoModelForCausalLM.from_pretrained(TINY_P1, dtype=torch.float32).eval()
    prompts = {
        r["prompt_id"]: r["prompt_token_ids"]
        for r in pq.read_table(run_dir / "prompts").to_pylist()
    }
    worst = 0.0
    for row in _scores(run_dir, "p1@eta=1"):
        ids = prompts[row["prompt_id"]] + row["completion_token_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        first = len(ids) - row["L"]
        expected = [logprobs[j - 1, ids[j]].item() for j in range(first, len(ids))]
        worst = max(worst, float(np.max(np.abs(np.subtract(expected, row["token_logprobs"])))))
    assert worst < HF_TOLERANCE_NATS

    # `stats` with other options redraws the figure from the same scores.
    (run_dir / SWEEP_FIGURE).unlink()
    assert run_cli("stats", run_dir, "uncertainty.level=0.9") == 0
    assert "step-size sweep p0 -> tiny-p1" in capsys.readouterr().err
    assert (run_dir / SWEEP_FIGURE).read_bytes().startswith(PNG_SIGNATURE)
