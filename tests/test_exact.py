"""The real pipeline (vLLM sampling and scoring) against exact answers.

The enumerable pair (configs/enumerable.yaml) has 5 token ids and completions of at
most 4 tokens, so tests/exact.py lists every completion and computes the truth in
float64 with Hugging Face transformers. Each estimate must lie within 4 bootstrap
standard errors of it: with a fixed run seed this is deterministic, and 4 SE leaves
room for five estimates x four settings without admitting a biased estimator (a
wrong EOS rule or weight moves them by many SE).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, run_cli
from tests.exact import exact_quantities

ENUM_CONFIG = ROOT / "configs" / "enumerable.yaml"
ENUM_P0 = ROOT / "data" / "models" / "enum-p0"
ENUM_P1 = ROOT / "data" / "models" / "enum-p1"
SETTINGS = [("sequence", True), ("per_token", True), ("sequence", False), ("per_token", False)]


@pytest.fixture(scope="module")
def enum_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("enum") / "run"
    assert run_cli("run", "--config", ENUM_CONFIG, "--out", run_dir) == 0
    return run_dir


@pytest.fixture(scope="module")
def exact(enum_run: Path) -> dict:
    prompts = pq.read_table(enum_run / "prompts").to_pylist()
    return exact_quantities(
        ENUM_P0,
        ENUM_P1,
        [p["prompt_token_ids"] for p in prompts],
        eos=1,
        vocab_size=5,
        max_tokens=4,
    )


def _stats(enum_run: Path, tmp_path: Path, *overrides: str) -> dict:
    run_dir = tmp_path / "run"
    shutil.copytree(enum_run, run_dir)
    assert run_cli("stats", run_dir, *overrides) == 0
    return json.loads((run_dir / "summary.json").read_text())


def test_enumeration_is_complete(exact: dict) -> None:
    assert exact[("sequence", True)]["total_probability_p0"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("unit", "include_eos"), SETTINGS)
def test_estimates_match_exact_values(
    enum_run: Path, exact: dict, tmp_path: Path, unit: str, include_eos: bool
) -> None:
    summary = _stats(
        enum_run,
        tmp_path,
        f"entropy.unit={unit}",
        f"entropy.include_eos={str(include_eos).lower()}",
    )
    truth = exact[(unit, include_eos)]
    assert summary["num_sequences"] == 12 * 64
    for name in ("H0", "H1", "delta_H", "kl", "delta_H1"):
        estimate, se = summary[f"{name}_nats"], summary[f"{name}_se_nats"]
        assert se > 0, name
        assert abs(estimate - truth[name]) < 4 * se, (name, estimate, truth[name], se)
        low, high = summary[f"{name}_low_nats"], summary[f"{name}_high_nats"]
        assert low < estimate < high, name


@pytest.mark.parametrize("include_eos", [True, False])
def test_length_normalised_first_order_term(
    enum_run: Path, exact: dict, tmp_path: Path, include_eos: bool
) -> None:
    summary = _stats(
        enum_run,
        tmp_path,
        "entropy.length_normalize_deltah1=true",
        f"entropy.include_eos={str(include_eos).lower()}",
    )
    truth = exact[("sequence", include_eos)]["delta_H1_length_normalized"]
    assert abs(summary["delta_H1_nats"] - truth) < 4 * summary["delta_H1_se_nats"]


@pytest.mark.parametrize("mode", ["clip", "psis"])
def test_stabilised_weights_stay_near_the_truth(
    enum_run: Path, exact: dict, tmp_path: Path, mode: str
) -> None:
    """p1 is close to p0 here, so clipping and smoothing should barely move the estimate."""
    summary = _stats(enum_run, tmp_path, f"weights.mode={mode}")
    truth = exact[("sequence", True)]
    assert summary["weights_mode"] == mode
    assert abs(summary["H1_nats"] - truth["H1"]) < 4 * summary["H1_se_nats"]
    if mode == "psis":
        assert summary["pareto_k"] < summary["pareto_k_threshold"]
        assert summary["pareto_k_exceeded"] is False
    else:
        assert 0 <= summary["fraction_clipped"] < 0.05
