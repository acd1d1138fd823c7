"""Mixture sampling, the run side: every sampling model draws G completions per prompt.

With ``sampling.models: [p0, p1]`` p1 samples too: its completions are
``samples/p1/part-N`` with ``sample_idx`` G..2G-1 and seeds of their own, and every
model scores both models' samples, row-aligned with them. The first sampling model's
samples are exactly those of a run without mixture sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import DEFAULT_CONFIG, engines_loaded, run_cli

SMALL = ["prompts.limit=6", "sampling.num_samples=4", "sampling.max_tokens=16"]


def _table(path: Path) -> pa.Table:
    return pq.read_table(path).replace_schema_metadata(None)


def test_every_sampling_model_samples_and_every_model_scores_all(tmp_path: Path) -> None:
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    assert run_cli("run", "--config", DEFAULT_CONFIG, "--out", plain, *SMALL) == 0
    assert (
        run_cli(
            "run", "--config", DEFAULT_CONFIG, "--out", mixed, *SMALL, "sampling.models=[p0,p1]"
        )
        == 0
    )
    part = "part-00000.parquet"
    # p0's draws do not depend on whether p1 samples too.
    assert _table(mixed / "samples" / part).equals(_table(plain / "samples" / part))
    from_p0, from_p1 = _table(mixed / "samples" / part), _table(mixed / "samples" / "p1" / part)
    assert sorted(set(from_p0["sample_idx"].to_pylist())) == [0, 1, 2, 3]
    assert sorted(set(from_p1["sample_idx"].to_pylist())) == [4, 5, 6, 7]
    # Their own seeds: p1's completions are not p0's.
    assert (
        from_p0["completion_token_ids"].to_pylist() != from_p1["completion_token_ids"].to_pylist()
    )
    for model in ("p0", "p1"):
        scores = _table(mixed / "scores" / model / part)
        # Row k scores sample row k of p0's samples followed by p1's.
        assert scores.select(["prompt_id", "sample_idx", "completion_token_ids"]).equals(
            pa.concat_tables([from_p0, from_p1]).select(
                ["prompt_id", "sample_idx", "completion_token_ids"]
            )
        )
    # p1's decode-time log-probs are its teacher-forced ones (bit-identical on CPU).
    p1_scores = _table(mixed / "scores" / "p1" / part).slice(from_p0.num_rows)
    assert p1_scores["S"].to_pylist() == from_p1["S"].to_pylist()
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert {"sample", "sample/p1"} <= manifest["stages"].keys()
    assert manifest["inputs"]["sample/p1"]["sampling model"] == "p1"
    assert len(manifest["inputs"]["score/p0"]["samples"]) == 2
    summary = json.loads((mixed / "summary.json").read_text())
    assert summary["num_sequences"] == 2 * 6 * 4
    # p1 scores on the engine it sampled with; p0's is loaded again after it.
    assert engines_loaded(mixed) == ["tiny-p0", "tiny-p1", "tiny-p0"]
