"""The stats stage on synthetic run directories (no model): paired frames, the summary
and per_prompt.parquet against the independent implementation in tests/reference.py,
for sampling from the reference alone and from a mixture of models."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.stats.summary as summary_module
from pipeline.artifacts import SEQUENCE_SCHEMA, part_name, write_table
from pipeline.config import RunConfig, load_config
from pipeline.errors import PipelineError
from pipeline.stats.registry import (
    PER_PROMPT_SCHEMA,
    SUMMARY_SCHEMA,
    candidate_keys,
)
from pipeline.stats.summary import (
    PER_PROMPT_PARQUET,
    compute_summary,
    generation_diagnostics,
    paired_frame,
    shard_parts,
    write_summary,
)
from tests.conftest import DEFAULT_CONFIG
from tests.reference import reference_per_prompt, reference_summary
from tests.synthetic import write_run


def _config(*overrides: str) -> RunConfig:
    return load_config(DEFAULT_CONFIG, list(overrides))


def test_one_sampling_model_gives_unit_reference_weights_exactly(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, ["p0", "p1"], ["p0"], prompts=4, per_model=3)
    frame = paired_frame(run_dir, "p0", "p1", True, ["p0"], 3)
    assert frame["log_w0"].to_list() == [0.0] * 12
    assert frame["log_w1"].to_list() == frame["d"].to_list()
    assert frame["stratum"].to_list() == [0] * 12


def test_mixture_log_weights_use_the_balance_heuristic(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, ["p0", "p1", "p2"], ["p0", "p1"], prompts=3, per_model=2)
    frame = paired_frame(run_dir, "p0", "p2", False, ["p0", "p1"], 2)
    s = {
        m: np.concatenate(
            [pq.read_table(p)["S"].to_numpy() for p in sorted((run_dir / "scores" / m).iterdir())]
        )
        for m in ("p0", "p1", "p2")
    }
    log_q = np.log((np.exp(s["p0"]) + np.exp(s["p1"])) / 2)
    assert frame["log_w0"].to_numpy() == pytest.approx(s["p0"] - log_q, abs=1e-12)
    assert frame["log_w1"].to_numpy() == pytest.approx(s["p2"] - log_q, abs=1e-12)
    # Shard 0 holds prompt 0, shard 1 prompts 1 and 2: p0's draws, then p1's.
    assert frame["stratum"].to_list() == [0, 0, 1, 1] + [0] * 4 + [1] * 4
    # The mixture's weights are bounded by the number of sampling models.
    assert np.exp(frame["log_w0"].to_numpy()).max() <= 2


def test_decode_diagnostic_compares_with_the_model_that_sampled(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, ["p0", "p1"], ["p0", "p1"], prompts=2, per_model=2)
    diagnostics = generation_diagnostics(
        shard_parts(run_dir, ["p0", "p1"], ["p0", "p1"]), ["p0", "p1"], 2
    )
    assert diagnostics["max_abs_decode_vs_prefill_logprob_diff"] == 0.0
    # Move one decode-time log-prob of a p1 sample by 0.5: exactly that is seen (p0's
    # scores of p1's samples differ from p1's everywhere).
    path = run_dir / "samples" / "p1" / part_name(1)
    rows = pq.read_table(path).to_pylist()
    rows[0]["token_logprobs"][0] += 0.5
    write_table(pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA), path, {"content": "x"})
    diagnostics = generation_diagnostics(
        shard_parts(run_dir, ["p0", "p1"], ["p0", "p1"]), ["p0", "p1"], 2
    )
    assert diagnostics["max_abs_decode_vs_prefill_logprob_diff"] == pytest.approx(0.5, abs=1e-6)


SETTINGS = [
    ("sequence", True, ["p0"]),
    ("per_token", False, ["p0"]),
    ("sequence", False, ["p0", "p1"]),
    ("per_token", True, ["p0", "p1"]),
]


@pytest.mark.parametrize(("unit", "include_eos", "sampling"), SETTINGS)
def test_every_figure_equals_the_reference(
    tmp_path: Path, unit: str, include_eos: bool, sampling: list[str]
) -> None:
    run_dir = write_run(tmp_path, ["p0", "p1"], sampling, prompts=6, per_model=4)
    config = _config(
        f"entropy.unit={unit}",
        f"entropy.include_eos={str(include_eos).lower()}",
        "sampling.num_samples=4",
        f"sampling.models=[{', '.join(sampling)}]",
    )
    summary = compute_summary(run_dir, config)
    expected = reference_summary(
        run_dir, "p0", "p1", unit, include_eos, sampling_models=sampling, num_samples=4
    )
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert list(summary["candidates"]["p1"]) == candidate_keys()


@pytest.mark.parametrize(("unit", "include_eos"), [("sequence", False), ("per_token", True)])
def test_per_prompt_table_equals_the_reference(
    tmp_path: Path, unit: str, include_eos: bool
) -> None:
    run_dir = write_run(tmp_path, ["p0", "p1"], ["p0"], prompts=5, per_model=6)
    config = _config(f"entropy.unit={unit}", f"entropy.include_eos={str(include_eos).lower()}")
    summary = compute_summary(run_dir, config)
    table = pq.read_table(run_dir / PER_PROMPT_PARQUET)
    assert table.schema.remove_metadata().equals(PER_PROMPT_SCHEMA)
    metadata = table.schema.metadata
    assert metadata[b"unit"] == unit.encode()
    assert metadata[b"content"] == b"per_prompt"
    expected = reference_per_prompt(run_dir, "p0", "p1", unit, include_eos)
    rows = table.to_pylist()
    assert [r["prompt_id"] for r in rows] == sorted(expected)
    for row in rows:
        assert row["candidate"] == "p1"
        assert row["num_sequences"] == 6
        for key, value in expected[row["prompt_id"]].items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # The summary lists the prompts that moved most relative to their error.
    z = {r["prompt_id"]: abs(r["delta_H_nats"] / r["delta_H_se_nats"]) for r in rows}
    listed = [p["prompt_id"] for p in summary["prompts_largest_delta_H"]]
    assert listed == sorted(z, key=z.__getitem__, reverse=True)


def test_summary_files_follow_the_declared_schemas(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, ["p0", "p1"], ["p0"], prompts=3, per_model=1)
    summary = compute_summary(run_dir, _config("sampling.num_samples=1"))
    # One completion per prompt: prompt-set SEs are undefined -> null, with a warning.
    assert math.isnan(summary["H0_se_nats"])
    assert any("single completion" in w for w in summary["warnings"])
    write_summary(run_dir, {**summary, "config_hash": "abc", "run_started_at": "now"})
    table = pq.read_table(run_dir / "summary.parquet")
    assert table.schema.remove_metadata().equals(SUMMARY_SCHEMA)
    row = table.to_pylist()[0]
    assert row["H0_se_nats"] is None
    assert row["candidate"] == "p1"
    assert row["config_hash"] == "abc"
    assert row["num_warnings"] == len(summary["candidates"]["p1"]["warnings"])
    per_prompt = pq.read_table(run_dir / PER_PROMPT_PARQUET).to_pylist()
    assert all(r["H0_se_nats"] is None and r["H0_nats"] is not None for r in per_prompt)


def test_non_finite_scores_are_refused_naming_the_candidate(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, ["p0", "p1"], ["p0"], prompts=2, per_model=3)
    path = run_dir / "scores" / "p1" / part_name(0)
    rows = pq.read_table(path).to_pylist()
    rows[1]["S"] = -math.inf
    write_table(pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA), path, {"content": "synthetic"})
    with pytest.raises(PipelineError, match=r"candidate 'p1': .*non-finite.*prompt 'prompt-00'"):
        compute_summary(run_dir, _config("sampling.num_samples=3"))


def test_population_estimand_bootstraps_prompts_and_warns_when_they_are_few(
    tmp_path: Path,
) -> None:
    run_dir = write_run(tmp_path / "six", ["p0", "p1"], ["p0"], prompts=6, per_model=4)
    config = _config("sampling.num_samples=4", "uncertainty.estimand=population")
    summary = compute_summary(run_dir, config)
    assert summary["uncertainty_estimand"] == "population"
    assert "cluster bootstrap" in summary["uncertainty_method"]
    assert summary["H0_low_nats"] < summary["H0_nats"] < summary["H0_high_nats"]
    assert any("only 6 prompts" in w for w in summary["warnings"])
    run_dir = write_run(tmp_path / "one", ["p0", "p1"], ["p0"], prompts=1, per_model=4)
    summary = compute_summary(run_dir, config)
    assert math.isnan(summary["delta_H_se_nats"])
    assert any("no standard error can be estimated" in w for w in summary["warnings"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["weights.mode=none"],
        ["weights.mode=clip", "entropy.unit=sequence"],
        ["weights.mode=psis", "entropy.include_eos=false"],
        ["sampling.models=[p0, p1]", "weights.mode=psis"],
    ],
)
def test_the_summary_does_not_depend_on_the_shard_layout(
    tmp_path: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statistics are reduced batch by batch: the same sequences in one shard, or
    in seven shards (some of one prompt) read one shard at a time or a few together,
    give the same figures and per-prompt rows."""
    sampling = ["p0", "p1"] if "sampling.models=[p0, p1]" in overrides else ["p0"]
    config = _config("sampling.num_samples=4", *overrides)
    found = {}
    # Shards of 1, 2, 2, 1, 2, 2, 2 prompts; batches of at least 20 rows: shards 0-2,
    # 3-5 and 6 (4 rows a prompt), or 0-1, 2-3, 4-5 and 6 (8 rows, two sampling models).
    layouts = {(1, summary_module.STATS_BATCH_ROWS): 1, (7, 1): 7, (7, 20): 2 + len(sampling)}
    for (shards, batch_rows), batches in layouts.items():
        monkeypatch.setattr(summary_module, "STATS_BATCH_ROWS", batch_rows)
        run_dir = write_run(
            tmp_path / f"{shards}-{batch_rows}", ["p0", "p1"], sampling, 12, 4, shards=shards
        )
        assert len(shard_parts(run_dir, sampling, ["p0", "p1"])) == batches
        summary = compute_summary(run_dir, config)
        rows = pl.read_parquet(run_dir / PER_PROMPT_PARQUET).sort("prompt_id")
        found[shards, batch_rows] = summary["candidates"]["p1"], rows
    (one, one_rows), *others = found.values()
    assert one["weights_mode"] == config.weights.mode
    if config.weights.mode == "psis":
        assert one["pareto_k"] is not None
    for other, other_rows in others:
        for key, value in one.items():
            if isinstance(value, float):
                assert other[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key
            else:
                assert other[key] == value, key
        assert other_rows.equals(one_rows)


@pytest.mark.slow
def test_the_summary_is_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """Two processes (other string hash seeds) compute the same summary to the last bit:
    nothing in the statistics may depend on the iteration order of a set."""
    run_dir = write_run(tmp_path, ["p0", "p1"], ["p0", "p1"], prompts=8, per_model=4)
    script = (
        "import json, sys; from pathlib import Path; "
        "from pipeline.config import load_config; "
        "from pipeline.stats.summary import compute_summary; "
        "config = load_config(Path(sys.argv[1]), ['sampling.num_samples=4', "
        "'sampling.models=[p0, p1]']); "
        "print(json.dumps(compute_summary(Path(sys.argv[2]), config), sort_keys=True))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script, str(DEFAULT_CONFIG), str(run_dir)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    ]
    assert outputs[0] == outputs[1] == outputs[2]
