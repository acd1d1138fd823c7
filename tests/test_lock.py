"""The run-directory lock: one writer at a time, who holds it is named, a killed holder
never blocks. Contention and kills use real processes (``tests/lock_holder.py``)."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.lock import LOCK_FILE, RunLock, check_not_locked
from tests import lock_holder

Holder = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def start_holder() -> Iterator[Holder]:
    """Start ``tests.lock_holder`` processes; kill those still running at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(run_dir: Path, *options: str | Path) -> subprocess.Popen[str]:
        started.append(lock_holder.start(run_dir, *options))
        return started[-1]

    yield start
    for process in started:
        lock_holder.stop(process)


def test_the_holder_is_recorded_and_forgotten(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "run"  # made, with its parents
    before = time.time()
    with RunLock(run_dir, "stats"):
        record = json.loads((run_dir / LOCK_FILE).read_text())
        # The holder may read the directory it writes.
        check_not_locked(run_dir)
    assert record["purpose"] == "stats"
    assert record["pid"] == os.getpid()
    assert record["host"] == socket.gethostname()
    assert record["command"] == shlex.join(sys.argv)  # this test process's command line
    started = time.mktime(time.strptime(record["started_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert record["started_at"].endswith("+00:00")
    assert abs(started - time.timezone - before) < 5
    # The file stays (deleting it would race), empty: nobody holds the directory.
    assert (run_dir / LOCK_FILE).read_text() == ""
    check_not_locked(run_dir)


def test_another_process_is_refused_by_name_and_a_sigkill_frees_the_directory(
    tmp_path: Path, start_holder: Holder
) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    assert lock_holder.read_line(holder) == f"locked {holder.pid}"
    with pytest.raises(PipelineError) as refused, RunLock(run_dir, "run"):
        pass
    message = str(refused.value)
    assert f"run directory {run_dir} is in use: run by pid {holder.pid} on " in message
    assert socket.gethostname() in message
    assert "lock_holder.py" in message  # the holder's command line
    with pytest.raises(PipelineError, match=f"in use: run by pid {holder.pid} "):
        check_not_locked(run_dir)

    holder.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    # The dead holder's record is still in the file; the kernel has dropped its lock.
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid
    check_not_locked(run_dir)
    started = time.monotonic()
    with RunLock(run_dir, "run"):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert time.monotonic() - started < 0.2, "a stale lock must not even delay a resume"


def test_two_processes_started_together_exactly_one_wins(
    tmp_path: Path, start_holder: Holder
) -> None:
    run_dir, go = tmp_path / "run", tmp_path / "go"
    first, second = start_holder(run_dir, "--go", go), start_holder(run_dir, "--go", go)
    go.touch()
    lines = {first.pid: lock_holder.read_line(first), second.pid: lock_holder.read_line(second)}
    winners = [pid for pid, line in lines.items() if line == f"locked {pid}"]
    assert len(winners) == 1, lines
    loser = second if winners == [first.pid] else first
    assert loser.wait(timeout=30) == 2
    assert lines[loser.pid].startswith(
        f"refused: run directory {run_dir} is in use: run by pid {winners[0]} on "
    )


def test_a_forked_child_does_not_keep_a_killed_holders_lock(
    tmp_path: Path, start_holder: Holder
) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir, "--fork")
    assert lock_holder.read_line(holder) == f"locked {holder.pid}"
    child = int(lock_holder.read_line(holder).removeprefix("child "))
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child (think: an engine worker) outlives the holder
        with RunLock(run_dir, "run"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_readers_probe_does_not_refuse_a_writer(tmp_path: Path) -> None:
    """check_not_locked holds a shared lock for an instant; a writer meeting it waits."""
    run_dir = tmp_path / "run"
    with RunLock(run_dir, "run"):
        pass
    probe = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.1, os.close, [probe]).start()
    with RunLock(run_dir, "run"):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_misuse_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("data")
    with (
        pytest.raises(PipelineError, match="is a file, not a run directory"),
        RunLock(a_file, "run"),
    ):
        pass
    run_dir = tmp_path / "run"
    with (
        RunLock(run_dir, "run"),
        pytest.raises(RuntimeError, match="not re-entrant"),
        RunLock(run_dir, "stats"),
    ):
        pass
    # Released despite the error inside: another holder gets it.
    with RunLock(run_dir, "run"):
        pass
    # A reader writes nothing, not even the lock file.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    check_not_locked(fresh)
    assert list(fresh.iterdir()) == []
