"""Sharded, resumable runs: kills, interrupts, damaged shards, provenance, new candidates.

Every test compares against one uninterrupted run of the same config: a resumed run
must end with identical artifacts (every Parquet table and its metadata) and an
identical summary.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import DEFAULT_CONFIG, ROOT, TINY_P0, TINY_P1, run_cli

# 24 prompts in 12 shards of 2, 8 samples each: each shard takes a noticeable moment.
SHARDED = ["prompts.limit=24", "shards.prompts_per_shard=2", "sampling.num_samples=8"]
SHARDS = 12


def _run(run_dir: Path, *extra: str | Path) -> int:
    return run_cli("run", "--config", DEFAULT_CONFIG, "--out", run_dir, *SHARDED, *extra)


def _parts(run_dir: Path) -> dict[str, Path]:
    return {str(p.relative_to(run_dir)): p for p in sorted(run_dir.rglob("part-*.parquet"))}


def assert_same_run(resumed: Path, reference: Path, same_config: bool = True) -> None:
    """Identical Parquet artifacts (data and metadata) and summary.json.

    The run's start time is the resumed run's own; with ``same_config=False`` (a model
    given by another path) the config hash may differ too.
    """
    parts, expected = _parts(resumed), _parts(reference)
    assert parts.keys() == expected.keys()
    for name, path in parts.items():
        a, b = pq.read_table(path), pq.read_table(expected[name])
        assert a.equals(b), name
        assert a.schema.metadata == b.schema.metadata, name
    summaries = [json.loads((d / "summary.json").read_text()) for d in (resumed, reference)]
    for summary in summaries:
        summary.pop("run_started_at")
    if not same_config:
        for summary in summaries:
            summary.pop("config_hash")
    assert summaries[0] == summaries[1]
    assert not list(resumed.rglob(".*.tmp-*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    assert _run(run_dir) == 0
    return run_dir


def _start(run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "--config",
        str(DEFAULT_CONFIG),
        "--out",
        str(run_dir),
        *SHARDED,
        *extra,
    ]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(process: subprocess.Popen[str], path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _stop_when(process: subprocess.Popen[str], path: Path, sig: int) -> str:
    """Send ``sig`` once ``path`` exists; return what the process wrote to stderr."""
    _wait_for(process, path)
    process.send_signal(sig)
    return process.communicate(timeout=60)[1]


def test_sigkill_during_sampling_then_resume(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = _start(run_dir)
    _stop_when(process, run_dir / "samples" / "part-00001.parquet", signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    made = len(list((run_dir / "samples").glob("part-*.parquet")))
    assert 2 <= made < SHARDS, "the kill must land in the middle of sampling"
    assert not (run_dir / "scores").exists()
    assert not (run_dir / "summary.json").exists()
    assert _run(run_dir) == 0
    assert_same_run(run_dir, uninterrupted)


def test_sigkill_during_scoring_then_resume(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = _start(run_dir)
    _stop_when(process, run_dir / "scores" / "p1" / "part-00001.parquet", signal.SIGKILL)
    scored = len(list((run_dir / "scores" / "p1").glob("part-*.parquet")))
    assert 2 <= scored < SHARDS, "the kill must land in the middle of scoring p1"
    sampled = {p: p.stat().st_mtime_ns for p in (run_dir / "samples").glob("part-*")}
    assert len(sampled) == SHARDS
    assert _run(run_dir) == 0
    # Nothing sampled again: the finished work was kept.
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "samples").glob("part-*")} == sampled
    assert_same_run(run_dir, uninterrupted)


def test_ctrl_c_stops_cleanly_and_resumes(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = _start(run_dir)
    stderr = _stop_when(process, run_dir / "samples" / "part-00001.parquet", signal.SIGINT)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert f"--out {run_dir}" in stderr
    assert "Traceback" not in stderr
    assert not list(run_dir.rglob(".*.tmp-*"))
    assert _run(run_dir) == 0
    assert_same_run(run_dir, uninterrupted)


def test_damaged_shards_and_leftover_temporaries(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    truncated = run_dir / "samples" / "part-00003.parquet"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (run_dir / "scores" / "p1" / "part-00005.parquet").unlink()
    leftover = run_dir / "scores" / "p0" / ".part-00002.parquet.tmp-4242"
    leftover.write_bytes(b"half a file")
    capsys.readouterr()
    assert _run(run_dir) == 0
    err = capsys.readouterr().err
    assert "sample: samples/part-00003.parquet is unreadable" in err
    assert f"removed a temporary file left by an interrupted run: {leftover}" in err
    assert_same_run(run_dir, uninterrupted)


def test_reading_a_damaged_shard_is_a_clear_error(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "scores" / "p1" / "part-00004.parquet").write_bytes(b"PAR1 not really")
    capsys.readouterr()
    assert run_cli("stats", run_dir) == 2
    err = capsys.readouterr().err
    assert "part-00004.parquet" in err
    assert "re-run" in err.lower()


def test_other_inputs_are_refused_and_force_redoes_them(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    capsys.readouterr()
    assert _run(run_dir, "sampling.max_tokens=16") == 2
    err = capsys.readouterr().err
    assert "was made from other inputs" in err
    assert '"max_tokens": 48' in err
    assert "--force" in err
    assert _run(run_dir, f"models.p1.path={TINY_P0}") == 2
    assert "score/p1: model content" in capsys.readouterr().err
    # Redo only p1's scores: the samples and p0's scores stay as they are.
    kept = {
        p: p.stat().st_mtime_ns
        for p in [
            *(run_dir / "samples").glob("part-*"),
            *(run_dir / "scores" / "p0").glob("part-*"),
        ]
    }
    assert _run(run_dir, f"models.p1.path={TINY_P0}", "--force") == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["delta_H_nats"] == 0.0
    assert _run(run_dir, "sampling.max_tokens=16", f"models.p1.path={TINY_P0}", "--force") == 0
    lengths = pq.read_table(run_dir / "samples", columns=["L"])["L"].to_pylist()
    assert max(lengths) <= 16


def test_other_library_version_is_refused(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["inputs"]["sample"]["library torch"] = "1.0.0"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert _run(run_dir) == 2
    assert 'library torch: "1.0.0" -> ' in capsys.readouterr().err


def test_adding_a_candidate_scores_only_that_candidate(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    before = {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("part-*.parquet")}
    assert _run(run_dir, f"models.p2.path={TINY_P0}") == 0
    after = {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("part-*.parquet")}
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == sorted(
        str(run_dir / "scores" / "p2" / f"part-{i:05d}.parquet") for i in range(SHARDS)
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["candidates"]) == ["p1", "p2"]
    assert summary["candidates"]["p2"]["delta_H_nats"] == 0.0
    reference = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["candidates"]["p1"] == reference["candidates"]["p1"]


def test_model_folder_vanishing_mid_run(uninterrupted: Path, tmp_path: Path) -> None:
    p1_copy = tmp_path / "p1"
    shutil.copytree(TINY_P1, p1_copy)
    run_dir = tmp_path / "run"
    process = _start(run_dir, f"models.p1.path={p1_copy}")
    _wait_for(process, run_dir / "samples" / "part-00000.parquet")
    shutil.move(p1_copy, tmp_path / "moved-away")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert f"model 'p1': folder {p1_copy} does not exist" in stderr
    assert len(list((run_dir / "scores" / "p0").glob("part-*"))) == SHARDS
    shutil.move(tmp_path / "moved-away", p1_copy)
    assert _run(run_dir, f"models.p1.path={p1_copy}") == 0
    assert_same_run(run_dir, uninterrupted, same_config=False)


def test_run_directory_that_cannot_be_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (A read-only folder cannot be tested here: the tests run as root, who may write
    # anywhere. A path below a regular file fails for everyone.)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _run(blocker / "run") == 2
    assert "cannot be created or written" in capsys.readouterr().err


def test_run_directory_permissions_are_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The writability check itself, with os.access reporting a read-only folder."""
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)
    assert _run(tmp_path / "run") == 2
    assert "cannot be created or written" in capsys.readouterr().err
