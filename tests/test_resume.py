"""Sharded, resumable runs: kills, interrupts, locks, damaged or foreign shards, changed
models, provenance, new candidates.

Every test compares against one uninterrupted run of the same config: a resumed run
must end with identical artifacts (every Parquet table and its metadata) and an
identical summary.json; a run or ``stats`` that cannot give right numbers must be
refused with one line naming the cause.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import SEQUENCE_SCHEMA, SUMMARY_FILES
from pipeline.lock import LOCK_FILE
from tests import lock_holder
from tests.cli_process import CliProcess
from tests.conftest import DEFAULT_CONFIG, TINY_P0, TINY_P1, run_cli
from tests.damage import flip_bit_in_values, rewrite

# 24 prompts in 12 shards of 2, 4 samples each: each shard takes a noticeable moment.
SHARDED = ["prompts.limit=24", "shards.prompts_per_shard=2", "sampling.num_samples=4"]
SHARDS = 12
# The tests that run the command line in a process of their own run on one pytest-xdist
# worker (one fork server, tests/cli_process.py), the others on the other (`make test`
# runs --dist loadgroup): each group makes its own uninterrupted run.
IN_OWN_PROCESS = pytest.mark.xdist_group("test_resume.py:own-process")


def _run(run_dir: Path, *extra: str | Path) -> int:
    return run_cli("run", "--config", DEFAULT_CONFIG, "--out", run_dir, *SHARDED, *extra)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line stderr holds (an error), without its prefix."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("entropy-pipeline: error: ")
    return lines[0].removeprefix("entropy-pipeline: error: ")


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
        summary.pop("run_id")
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


def _start(run_dir: Path, *extra: str) -> CliProcess:
    return CliProcess("run", "--config", DEFAULT_CONFIG, "--out", run_dir, *SHARDED, *extra)


def _wait_for(
    process: CliProcess,
    path: Path,
    also: Callable[[], bool] = lambda: True,
    timeout: float = 300,
) -> None:
    """Wait until ``path`` exists and ``also()`` holds (a file may vanish meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if path.exists() and also():
                return
        except FileNotFoundError:
            pass
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _stop_when(process: CliProcess, path: Path, sig: int) -> str:
    """Send ``sig`` once ``path`` exists; return what the process wrote to stderr."""
    _wait_for(process, path)
    process.send_signal(sig)
    return process.communicate(timeout=60)[1]


@IN_OWN_PROCESS
def test_sigkill_during_sampling_then_resume(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = _start(run_dir)
    _stop_when(process, run_dir / "samples" / "part-00001.parquet", signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    made = len(list((run_dir / "samples").glob("part-*.parquet")))
    assert 2 <= made < SHARDS, "the kill must land in the middle of sampling"
    assert not (run_dir / "scores").exists()
    assert not (run_dir / "summary.json").exists()
    # The killed run's lock record stays; its lock went with it, so nothing waits.
    stale = json.loads((run_dir / LOCK_FILE).read_text())
    assert (stale["purpose"], stale["pid"]) == ("run", process.pid)
    assert _run(run_dir) == 0
    assert_same_run(run_dir, uninterrupted)


@IN_OWN_PROCESS
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


@IN_OWN_PROCESS
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
    assert "sample: samples/part-00003.parquet is damaged (" in err
    assert f"removed a temporary file left by an interrupted run: {leftover}" in err
    assert_same_run(run_dir, uninterrupted)


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the first shard's prompts with another seed: its parts are foreign."""
    run_dir = tmp_path_factory.mktemp("other-seed") / "run"
    assert _run(run_dir, "seed=1", "prompts.limit=2") == 0
    return run_dir


def _nan_in_first_row(path: Path) -> None:
    rows = pq.read_table(path).to_pylist()
    rows[0]["token_logprobs"][0] = math.nan
    rows[0]["S"] = math.nan
    rewrite(path, pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA))


# Damage -> (the part, what is done to it, what stats says it is).
DAMAGES: dict[str, tuple[str, Callable[[Path, Path], object], str]] = {
    "flipped bit": (
        "scores/p1/part-00004.parquet",
        lambda part, _: flip_bit_in_values(part, "token_logprobs"),
        "damaged (could not verify page integrity, CRC checksum verification failed for "
        "page_ordinal 0)",
    ),
    "foreign": (
        "scores/p1/part-00000.parquet",
        lambda part, other: shutil.copy(other / "scores/p1/part-00000.parquet", part),
        "written from other inputs (its fingerprint is not this run's)",
    ),
    "deleted score": ("scores/p0/part-00007.parquet", lambda part, _: part.unlink(), "missing"),
    "deleted samples": ("samples/part-00002.parquet", lambda part, _: part.unlink(), "missing"),
    "nan": (
        "scores/p1/part-00003.parquet",
        lambda part, _: _nan_in_first_row(part),
        "holding a non-finite token log-prob (nan; prompt 'story-006', sample_idx 0, token 0)",
    ),
    "stray": (
        "scores/p1/part-00012.parquet",
        lambda part, _: shutil.copy(part.with_name("part-00011.parquet"), part),
        "not one of the run's 12 shards",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_stats_refuses_a_bad_shard_by_name_and_run_redoes_it(
    uninterrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    damage: str,
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    name, spoil, problem = DAMAGES[damage]
    other = request.getfixturevalue("other_seed") if damage == "foreign" else tmp_path
    spoil(run_dir / name, other)
    summary = (run_dir / "summary.json").read_bytes()
    capsys.readouterr()
    assert run_cli("stats", run_dir) == 2
    assert _error_line(capsys) == (
        f"{run_dir / name} is {problem}, so statistics of run {run_dir} would be wrong. "
        f"Run `entropy-pipeline run --out {run_dir}` with the run's config to redo it."
    )
    assert (run_dir / "summary.json").read_bytes() == summary  # refused before writing
    assert _run(run_dir) == 0
    assert_same_run(run_dir, uninterrupted)


@IN_OWN_PROCESS
def test_other_inputs_are_refused_and_force_redoes_them(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    capsys.readouterr()
    assert _run(run_dir, "sampling.max_tokens=16") == 2
    line = _error_line(capsys)
    assert line.startswith(f"run directory {run_dir} was made from other inputs (sample: ")
    assert "sample: sampling.max_tokens: 48 -> 16; score/p0: samples: [" in line
    assert line.endswith(
        "). Use the original config and models to resume, a new --out for a new run, or "
        "--force to redo the stages that differ."
    )
    assert _run(run_dir, f"models.p1.path={TINY_P0}") == 2
    assert "(score/p1: model content: " in _error_line(capsys)
    # Redo only p1's scores: the samples and p0's scores stay as they are. The old
    # statistics go before the first new shard is written: killed then, no summary.
    kept = {
        p: p.stat().st_mtime_ns
        for p in [
            *(run_dir / "samples").glob("part-*"),
            *(run_dir / "scores" / "p0").glob("part-*"),
        ]
    }
    first = run_dir / "scores" / "p1" / "part-00000.parquet"
    old = first.stat().st_mtime_ns
    process = _start(run_dir, f"models.p1.path={TINY_P0}", "--force")
    _wait_for(process, first, lambda: first.stat().st_mtime_ns != old)
    process.kill()
    process.communicate()
    assert not [name for name in SUMMARY_FILES if (run_dir / name).exists()]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    assert _run(run_dir, f"models.p1.path={TINY_P0}") == 0  # the new inputs are recorded
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


def _start_sampling_with_own_p1(
    tmp_path: Path,
) -> tuple[Path, Path, CliProcess]:
    """A run whose candidate is a private copy of p1, once its first shard is sampled."""
    p1_copy = tmp_path / "p1"
    shutil.copytree(TINY_P1, p1_copy)
    run_dir = tmp_path / "run"
    process = _start(run_dir, f"models.p1.path={p1_copy}")
    _wait_for(process, run_dir / "samples" / "part-00000.parquet")
    return p1_copy, run_dir, process


@IN_OWN_PROCESS
def test_model_folder_vanishing_mid_run(uninterrupted: Path, tmp_path: Path) -> None:
    p1_copy, run_dir, process = _start_sampling_with_own_p1(tmp_path)
    shutil.move(p1_copy, tmp_path / "moved-away")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert f"model 'p1': folder {p1_copy} does not exist" in stderr
    assert len(list((run_dir / "scores" / "p0").glob("part-*"))) == SHARDS
    shutil.move(tmp_path / "moved-away", p1_copy)
    assert _run(run_dir, f"models.p1.path={p1_copy}") == 0
    assert_same_run(run_dir, uninterrupted, same_config=False)


def test_run_directory_below_a_file_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (A read-only folder cannot be tested here: the tests run as root, who may write
    # anywhere. A path below a regular file fails for everyone.)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _run(blocker / "run") == 2
    assert _error_line(capsys) == (
        f"run directory {blocker / 'run'} cannot be created (Not a directory: a file is in "
        "the way); choose another --out."
    )


def test_run_directory_without_permission_is_an_environment_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The writability check itself, with os.access reporting a read-only folder."""
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)
    assert _run(tmp_path / "run") == 1
    assert _error_line(capsys) == (
        f"run directory {tmp_path / 'run'} cannot be written (permission denied); choose "
        "another --out."
    )


def test_a_run_directory_in_use_is_refused_at_once_and_left_alone(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run, and stats, on a directory another process holds: one line naming
    the holder, nothing touched; once the holder is killed, the directory is free."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)

    def content() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p != lock}

    lock = run_dir / LOCK_FILE
    before = content()
    holder = lock_holder.start(run_dir)
    try:
        assert lock_holder.read_line(holder) == f"locked {holder.pid}"
        capsys.readouterr()
        for argv in (
            ["run", "--config", DEFAULT_CONFIG, "--out", run_dir, *SHARDED],
            ["stats", run_dir, "entropy.unit=per_token"],
        ):
            assert run_cli(*argv) == 2
            line = _error_line(capsys)
            assert line.startswith(
                f"run directory {run_dir} is in use: run by pid {holder.pid} on "
                f"{socket.gethostname()} since "
            )
            assert "lock_holder" in line
        assert content() == before
    finally:
        lock_holder.stop(holder)  # SIGKILL
    assert run_cli("stats", run_dir) == 0
    assert_same_run(run_dir, uninterrupted)


@IN_OWN_PROCESS
def test_two_runs_started_together_on_one_directory(uninterrupted: Path, tmp_path: Path) -> None:
    """Two nightly jobs on one --out: one runs, the other is refused naming it."""
    run_dir = tmp_path / "run"
    processes = [_start(run_dir), _start(run_dir)]
    errors = {p.pid: p.communicate(timeout=900)[1] for p in processes}
    codes = {p.pid: p.returncode for p in processes}
    assert sorted(codes.values()) == [0, 2], errors
    winner = next(pid for pid, code in codes.items() if code == 0)
    loser = next(pid for pid, code in codes.items() if code == 2)
    refusal = errors[loser].splitlines()[-1]
    assert refusal.startswith(
        f"entropy-pipeline: error: run directory {run_dir} is in use: run by pid {winner} on "
    )
    # The statistics again in this process, as the reference's were: across processes
    # their last bits can differ (reported to the stats engineer).
    assert run_cli("stats", run_dir) == 0
    assert_same_run(run_dir, uninterrupted)


@IN_OWN_PROCESS
def test_sigkill_right_after_the_summary_is_written(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    run_dir = runs / "run"
    shutil.copytree(uninterrupted, run_dir)
    # The moment between the summary and the manifest saying complete.
    killed = CliProcess(
        "run",
        "--config",
        DEFAULT_CONFIG,
        "--out",
        run_dir,
        *SHARDED,
        die_after="pipeline.run.write_summary",
    )
    _, stderr = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "running"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["run_id"], summary["config_hash"]) == (
        manifest["run_id"],
        manifest["config_hash"],
    )
    capsys.readouterr()
    assert run_cli("history", runs) == 2  # the only run cannot be shown
    assert (
        f"entropy-pipeline: warning: skipped {run_dir}: it did not finish (status 'running')"
        in capsys.readouterr().err
    )
    assert run_cli("stats", run_dir) == 2
    assert "did not finish" in _error_line(capsys)
    assert _run(run_dir) == 0
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert run_cli("history", runs) == 0
    assert_same_run(run_dir, uninterrupted)


def test_run_again_with_other_statistics_options_recomputes_them(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """No shard is made again; the statistics are; the run ends complete and stats works."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    parts = {p: p.stat().st_mtime_ns for p in run_dir.rglob("part-*.parquet")}
    assert _run(run_dir, "entropy.unit=per_token") == 0
    assert {p: p.stat().st_mtime_ns for p in parts} == parts
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert json.loads((run_dir / "summary.json").read_text())["unit"] == "per_token"
    assert run_cli("stats", run_dir, "entropy.unit=sequence") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["candidates"] == reference["candidates"]


@IN_OWN_PROCESS
def test_a_model_changed_mid_run_stops_it(uninterrupted: Path, tmp_path: Path) -> None:
    """p1's weights replaced by p0's while p0 samples (same size, same modification time)."""
    p1_copy, run_dir, process = _start_sampling_with_own_p1(tmp_path)
    weights = p1_copy / "model.safetensors"
    kept = weights.stat()
    shutil.copy2(TINY_P0 / "model.safetensors", weights)
    os.utime(weights, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stderr
    assert stderr.splitlines()[-1].startswith(
        f"entropy-pipeline: error: model 'p1' changed after the run recorded it: {p1_copy} now "
        "has content sha256 "
    )
    assert not list(run_dir.glob("scores/p1/part-*"))
    assert not (run_dir / "summary.json").exists()
    shutil.copy2(TINY_P1 / "model.safetensors", weights)
    assert _run(run_dir, f"models.p1.path={p1_copy}") == 0
    assert_same_run(run_dir, uninterrupted, same_config=False)
