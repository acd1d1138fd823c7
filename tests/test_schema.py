"""Schema evolution: each artifact kind states its layout version, and no number of
summary.json is lost on the way to summary.parquet (which ``history`` reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.artifacts import SCHEMA_VERSIONS, SUMMARY_SCHEMA


def _numbers(entries: dict[str, Any]) -> dict[str, float | int | bool]:
    return {k: v for k, v in entries.items() if isinstance(v, int | float | bool)}


def test_every_number_of_summary_json_is_a_column_of_summary_parquet(
    demo_run: Path, demo_summary: dict[str, Any]
) -> None:
    """A key added to the summary but not declared in the registry would be dropped."""
    columns = set(SUMMARY_SCHEMA.names)
    table = pq.read_table(demo_run / "summary.parquet")
    rows = {row["candidate"]: row for row in table.to_pylist()}
    run_numbers = _numbers({k: v for k, v in demo_summary.items() if k != "candidates"})
    assert run_numbers.keys() - columns == set()
    for candidate, estimates in demo_summary["candidates"].items():
        numbers = {**run_numbers, **_numbers(estimates)}
        assert numbers.keys() - columns == set(), candidate
        assert {k: rows[candidate][k] for k in numbers} == numbers
    assert {k: rows[c][k] for c in rows for k in ("run_id", "config_hash", "run_started_at")} == {
        "run_id": demo_summary["run_id"],
        "config_hash": demo_summary["config_hash"],
        "run_started_at": demo_summary["run_started_at"],
    }


def test_each_artifact_states_its_kind_and_layout_version(demo_run: Path) -> None:
    kinds = {
        "prompts/part-00000.parquet": ("prompts", "prompts"),
        "samples/part-00000.parquet": ("samples", "sequences"),
        "scores/p1/part-00000.parquet": ("scores", "sequences"),
        "summary.parquet": ("summary", "summary"),
        "per_prompt.parquet": ("per_prompt", "per_prompt"),
    }
    for name, (content, kind) in kinds.items():
        metadata = pq.read_schema(demo_run / name).metadata
        assert metadata[b"content"] == content.encode(), name
        assert metadata[b"schema_version"] == str(SCHEMA_VERSIONS[kind]).encode(), name
