"""History of runs: one table (terminal and Parquet) and one plot from every summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import run_cli


def test_history_gathers_runs_by_date_and_candidate(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    nights = {"2026-11-20": "run=010000-aaaa", "2026-11-21": "run=010000-bbbb"}
    for date, name in nights.items():
        shutil.copytree(demo_run, root / f"date={date}" / name)
    assert (
        run_cli("stats", root / "date=2026-11-21" / "run=010000-bbbb", "entropy.unit=per_token")
        == 0
    )
    capsys.readouterr()
    assert run_cli("history", root) == 0
    printed = capsys.readouterr().out
    assert "per_token" in printed
    assert "sequence" in printed
    history = pl.read_parquet(root / "history.parquet")
    assert history.height == 2
    assert history["candidate"].to_list() == ["p1", "p1"]
    assert sorted(history["unit"].to_list()) == ["per_token", "sequence"]
    png = (root / "history.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000
    # The layout is Hive-partitioned: Polars filters by date and candidate directly.
    night = (
        pl.scan_parquet(root / "**" / "summary.parquet", hive_partitioning=True)
        .filter(pl.col("date") == pl.date(2026, 11, 21), pl.col("candidate") == "p1")
        .collect()
    )
    assert night["unit"].to_list() == ["per_token"]
    assert night["run"].to_list() == ["010000-bbbb"]


def test_history_of_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("history", tmp_path) == 2
    assert "no summary.parquet" in capsys.readouterr().err
