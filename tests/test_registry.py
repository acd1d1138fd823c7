"""The estimate registry: what is derived from it stays in step with it, README included."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.report import format_summary
from pipeline.stats.registry import (
    ATOMS,
    DIAGNOSTICS,
    ESTIMATES,
    INTERVAL_PARTS,
    SUMMARY_SCHEMA,
    UNITS,
    atoms_needed,
    candidate_keys,
    estimate_keys,
    render_estimates_table,
    render_summary_keys,
    update_document,
)
from pipeline.stats.summary import compute_summary
from tests.conftest import DEFAULT_CONFIG, ROOT
from tests.synthetic import write_run


def test_readme_blocks_are_generated_from_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    assert render_estimates_table() in readme
    assert render_summary_keys() in readme
    assert update_document(readme) == readme, (
        "README.md is stale: run `python -m pipeline.stats.registry README.md`"
    )


def test_update_document_refuses_a_document_without_markers() -> None:
    with pytest.raises(ValueError, match="estimates:start"):
        update_document("# no markers here\n")


def test_needs_are_traced_from_the_formulas() -> None:
    by_name = {e.name: e for e in ESTIMATES}
    assert by_name["H0"].needs == ("w0", "w0_S0", "w0_L")
    assert by_name["kl"].needs == ("w1", "w1_L_full", "w1_d")
    assert set(by_name["delta_H1"].needs) == {
        "w0",
        "w0_S0",
        "w0_L",
        "w0_e",
        "cov_S0_d",
        "cov_L_d",
    }
    # Every declared atom is used by some estimate: none is computed for nothing.
    assert set(atoms_needed()) == set(ATOMS)


def test_formulas_evaluate_on_plain_numbers_in_both_units() -> None:
    means = dict.fromkeys(ATOMS, 2.0)
    for e in ESTIMATES:
        for unit in UNITS:
            assert math.isfinite(e.formula(means, unit)), (e.name, unit)


def test_summary_keys_and_schema_derive_from_the_declarations() -> None:
    keys = candidate_keys()
    assert len(keys) == len(set(keys))
    for e in ESTIMATES:
        expected = {f"{e.name}_nats", f"{e.name}_bits"}
        if e.interval:
            expected |= {f"{e.name}_{p}_{u}" for p in INTERVAL_PARTS for u in ("nats", "bits")}
        assert set(estimate_keys(e)) == expected
        assert expected <= set(SUMMARY_SCHEMA.names)
    for key in DIAGNOSTICS:
        assert (key.name in SUMMARY_SCHEMA.names) == (key.type is not None), key.name
    assert SUMMARY_SCHEMA.field("num_warnings").type == pa.int64()
    assert len(SUMMARY_SCHEMA.names) == len(set(SUMMARY_SCHEMA.names))


def test_report_shows_every_estimate_with_the_candidates_name(tmp_path: Path) -> None:
    write_run(tmp_path, ["p0", "p1"], ["p0"], prompts=4, per_model=4)
    config = load_config(DEFAULT_CONFIG, ["sampling.num_samples=4"])
    report = format_summary(compute_summary(tmp_path, config))
    for e in ESTIMATES:
        assert e.label.format(reference="p0", candidate="p1") in report, e.name
    assert "H(p1)" in report
    assert "H({candidate})" not in report
    assert "prompts with the largest |delta H| / SE:" in report
    assert "prompt_set" in report
