"""History of runs: one table (terminal and Parquet) and one plot from every summary."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import SCHEMA_VERSION, SUMMARY_SCHEMA, write_json, write_table
from tests import lock_holder
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


def _fake_run(
    root: Path,
    date: str,
    name: str,
    *,
    status: str = "complete",
    summary_hash: str | None = None,
    summary_started_at: str | None = None,
    delta_h: float = -0.5,
    options: dict[str, Any] | None = None,
) -> Path:
    """A run directory with a manifest and a summary.parquet, written as `run` writes them."""
    run_dir = root / f"date={date}" / f"run={name}"
    run_dir.mkdir(parents=True)
    started_at = f"{date}T01:00:00+00:00"
    config_hash = f"hash-{name}"
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "started_at": started_at,
        "config_hash": config_hash,
    }
    write_json(manifest, run_dir / "manifest.json")
    row = {
        "candidate": "p1",
        "reference_model": "p0",
        "run_started_at": summary_started_at or started_at,
        "config_hash": summary_hash or config_hash,
        "unit": "sequence",
        "include_eos": True,
        "weights_mode": "none",
        "num_prompts": 4,
        "num_sequences": 32,
        "num_warnings": 0,
        "H0_nats": 2.0,
        "H1_nats": 2.0 + delta_h,
        "delta_H_nats": delta_h,
        **(options or {}),
    }
    write_table(
        pa.Table.from_pylist([row], schema=SUMMARY_SCHEMA),
        run_dir / "summary.parquet",
        {"content": "summary"},
    )
    return run_dir


def _warnings(err: str) -> dict[str, str]:
    """Warning lines of stderr, by the run directory they name."""
    found = {}
    for line in err.splitlines():
        if line.startswith("entropy-pipeline: warning: skipped "):
            run_dir, _, reason = line.removeprefix("entropy-pipeline: warning: skipped ").partition(
                ": "
            )
            found[run_dir] = reason
    return found


def test_history_of_a_missing_folder_or_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("history", tmp_path / "runs") == 2
    assert capsys.readouterr().err == (
        f"entropy-pipeline: error: {tmp_path / 'runs'} does not exist; pass the folder that "
        "holds the run directories (by default `runs`).\n"
    )
    (tmp_path / "runs").write_text("")
    assert run_cli("history", tmp_path / "runs") == 2
    assert capsys.readouterr().err == (
        f"entropy-pipeline: error: {tmp_path / 'runs'} is a file; pass the folder that holds "
        "the run directories.\n"
    )


@pytest.mark.parametrize("option", ["--table", "--plot"])
def test_history_output_under_a_file_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    root = tmp_path / "runs"
    _fake_run(root, "2026-11-20", "010000-aaaa")
    (tmp_path / "notes").write_text("mine")
    target = tmp_path / "notes" / "history.out"
    assert run_cli("history", root, option, target) == 2
    assert capsys.readouterr().err == (
        f"entropy-pipeline: error: {option} {target}: {tmp_path / 'notes'} is a file, not a "
        "folder; choose another path.\n"
    )
    assert run_cli("history", root, option, tmp_path) == 2
    assert capsys.readouterr().err == (
        f"entropy-pipeline: error: {option} {tmp_path} is a folder; name the file to write.\n"
    )
    assert sorted(p.name for p in root.iterdir()) == ["date=2026-11-20"]


def test_history_skips_each_run_it_cannot_show_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    good = [
        _fake_run(root, "2026-11-20", "010000-good", delta_h=-0.25),
        _fake_run(root, "2026-11-22", "010000-good", delta_h=-0.75),
    ]
    # Killed just after writing its summary: the manifest still says running.
    running = _fake_run(root, "2026-11-21", "010000-running", status="running")
    # A summary left beside data that changed (restarted with --force, other config).
    foreign = _fake_run(root, "2026-11-21", "020000-foreign", summary_hash="hash-other")
    restarted = _fake_run(
        root, "2026-11-21", "030000-restarted", summary_started_at="2026-11-19T01:00:00+00:00"
    )
    damaged = _fake_run(root, "2026-11-21", "040000-damaged")
    part = damaged / "summary.parquet"
    part.write_bytes(part.read_bytes()[:100])
    bad_manifest = _fake_run(root, "2026-11-21", "050000-manifest")
    (bad_manifest / "manifest.json").write_text('{"status": "comp')
    no_summary = _fake_run(root, "2026-11-21", "060000-nosummary")
    (no_summary / "summary.parquet").unlink()
    locked = _fake_run(root, "2026-11-21", "070000-locked")
    holder = lock_holder.start(locked)
    try:
        assert lock_holder.read_line(holder) == f"locked {holder.pid}"
        assert run_cli("history", root) == 0
    finally:
        lock_holder.stop(holder)
    captured = capsys.readouterr()
    reasons = _warnings(captured.err)
    assert reasons.pop(str(running)) == (
        "it did not finish (status 'running'): it is running, was interrupted, or failed."
    )
    assert reasons.pop(str(foreign)) == (
        "its summary.parquet is not the summary of the data beside it (config_hash "
        "'hash-other', manifest config_hash 'hash-020000-foreign'); run `entropy-pipeline "
        "stats` on it to recompute the summary."
    )
    assert reasons.pop(str(restarted)) == (
        "its summary.parquet is not the summary of the data beside it (run_started_at "
        "'2026-11-19T01:00:00+00:00', manifest started_at '2026-11-21T01:00:00+00:00'); run "
        "`entropy-pipeline stats` on it to recompute the summary."
    )
    assert reasons.pop(str(damaged)).startswith("its summary.parquet is damaged (")
    assert reasons.pop(str(bad_manifest)) == (
        f"{bad_manifest / 'manifest.json'} is damaged: not valid JSON (Unterminated string "
        "starting at: line 1 column 12 (char 11)). It is written atomically, so something "
        "else changed it; restore it from a backup or start a new run directory."
    )
    assert reasons.pop(str(no_summary)) == "it has no summary.parquet."
    assert reasons.pop(str(locked)).startswith(
        f"run directory {locked} is in use: run by pid {holder.pid} on "
    )
    assert reasons == {}
    history = pl.read_parquet(root / "history.parquet")
    assert history["run_dir"].to_list() == [str(run_dir) for run_dir in good]
    assert history["delta_H_nats"].to_list() == [-0.25, -0.75]
    assert "010000-good" in captured.out
    for run_dir in (running, foreign, restarted, damaged, bad_manifest, no_summary, locked):
        assert run_dir.name not in captured.out


def test_history_with_no_run_it_can_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    _fake_run(root, "2026-11-20", "010000-a", status="running")
    _fake_run(root, "2026-11-21", "010000-b", summary_hash="other")
    assert run_cli("history", root) == 2
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 2
    assert err.endswith(
        f"entropy-pipeline: error: none of the 2 run(s) under {root} can be shown "
        "(reasons above).\n"
    )
    assert not (root / "history.parquet").exists()


def test_history_spans_schema_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A summary of an older version (fewer columns, one since dropped) reads with nulls."""
    root = tmp_path / "runs"
    old = _fake_run(root, "2026-11-20", "010000-old")
    _fake_run(
        root,
        "2026-11-21",
        "010000-new",
        options={"weights_mode": "psis", "include_eos": False, "unit": "per_token"},
    )
    part = old / "summary.parquet"
    table = pq.read_table(part)
    table = table.drop_columns(["weights_mode", "include_eos", "kl_nats", "pareto_k"])
    table = table.append_column("retired_column", pa.array([1.5]))
    pq.write_table(table.replace_schema_metadata({b"schema_version": b"0"}), part)
    assert run_cli("history", root) == 0
    out = capsys.readouterr().out
    history = pl.read_parquet(root / "history.parquet")
    assert history.columns == [*SUMMARY_SCHEMA.names, "run_dir", "started_at"]
    assert history["weights_mode"].to_list() == [None, "psis"]
    assert history["include_eos"].to_list() == [None, False]
    assert history["kl_nats"].to_list() == [None, None]
    assert history["unit"].to_list() == ["sequence", "per_token"]
    # The options of each row are on the terminal too.
    header = next(line for line in out.splitlines() if "candidate" in line)
    assert [name.strip() for name in header.strip("│ ").split("┆")][:6] == [
        "started (UTC)",
        "run",
        "candidate",
        "unit",
        "EOS",
        "weights",
    ]
    new_row = next(line for line in out.splitlines() if "010000-new" in line)
    assert [cell.strip() for cell in new_row.strip("│ ").split("┆")][3:6] == [
        "per_token",
        "false",
        "psis",
    ]


def test_a_summary_column_of_another_type_skips_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    odd = _fake_run(root, "2026-11-20", "010000-odd")
    _fake_run(root, "2026-11-21", "010000-fine")
    table = pq.read_table(odd / "summary.parquet")
    index = table.schema.get_field_index("H0_nats")
    table = table.set_column(index, "H0_nats", pa.array(["two"]))
    pq.write_table(table, odd / "summary.parquet")
    assert run_cli("history", root) == 0
    assert _warnings(capsys.readouterr().err) == {
        str(odd): "its summary.parquet has column H0_nats of type string, not double."
    }


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs filled to the last byte; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (test_errors.py simulates a full disk)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(filler, b"\0" * 4096)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
        finally:
            os.close(filler)
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("option", ["--table", "--plot"])
def test_history_on_a_full_disk_is_one_line_with_status_1(
    tmp_path: Path, full_disk: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    root = tmp_path / "runs"
    _fake_run(root, "2026-11-20", "010000-aaaa")
    target = full_disk / "history.out"
    assert run_cli("history", root, option, target) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("entropy-pipeline: error: ")
    assert "No space left on device (ENOSPC)" in lines[0]
    assert lines[0].endswith(
        "Free some space (or choose a folder on another disk) and run the command again; "
        "an interrupted run resumes where it stopped."
    )
    if option == "--plot":  # written by this module, which names the file
        assert f"(ENOSPC): {target}." in lines[0]
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
