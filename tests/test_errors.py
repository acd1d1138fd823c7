"""Every error is one line on stderr, with exit status 2 for bad input and 1 for the
environment (disk, permissions) or the unexpected; ``--debug`` adds the traceback."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.artifacts
import pipeline.history
from pipeline.artifacts import write_table
from pipeline.errors import environment_problem
from tests.conftest import run_cli


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _raising(error: BaseException) -> object:
    def gather(runs_root: Path) -> None:
        raise error

    return gather


def test_an_unexpected_error_is_one_line_with_its_type_and_the_debug_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pipeline.history, "gather_history", _raising(ValueError("boom\nmore")))
    assert run_cli("history", tmp_path) == 1
    assert _error_lines(capsys) == [
        "entropy-pipeline: error: unexpected ValueError: boom (run the command again with "
        "--debug to see the traceback)"
    ]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_adds_the_traceback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    monkeypatch.setattr(pipeline.history, "gather_history", _raising(ValueError("boom")))
    argv = {"before": ["--debug", "history", tmp_path], "after": ["history", tmp_path, "--debug"]}
    assert run_cli(*argv[where]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "ValueError: boom\n" in err
    assert err.endswith("entropy-pipeline: error: unexpected ValueError: boom\n")


def test_debug_keeps_the_exit_status_of_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("history", tmp_path / "nowhere", "--debug") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.endswith(
        f"entropy-pipeline: error: {tmp_path / 'nowhere'} does not exist; pass the folder "
        "that holds the run directories (by default `runs`).\n"
    )


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/runs/x/manifest.json"),
            "Permission denied (EACCES): /runs/x/manifest.json. Check the permissions of "
            "that path, or choose another folder.",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "No space left on device (ENOSPC). Free some space (or choose a folder on "
            "another disk) and run the command again; an interrupted run resumes where it "
            "stopped.",
        ),
        (
            OSError(errno.EIO, "Input/output error", "/runs/x"),
            "Input/output error (EIO): /runs/x. Check the path and the file system.",
        ),
    ],
)
def test_an_environment_error_is_one_line_with_status_1(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: OSError,
    line: str,
) -> None:
    monkeypatch.setattr(pipeline.history, "gather_history", _raising(error))
    assert run_cli("history", tmp_path) == 1
    assert _error_lines(capsys) == [f"entropy-pipeline: error: {line}"]


def test_a_table_write_that_fails_names_its_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow's errors name no file; the one-line report must."""

    def full_disk(writer: pq.ParquetWriter, table: pa.Table, **_: object) -> None:
        # The temporary file exists (the writer opened it) and holds a header.
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.artifacts.pq.ParquetWriter, "write_table", full_disk)
    path = tmp_path / "scores" / "p1" / "part-00000.parquet"
    with pytest.raises(OSError, match="No space left on device") as caught:
        write_table(pa.table({"n": [1]}), path, {"content": "scores"})
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(path))
    assert list(path.parent.iterdir()) == []
    assert str(environment_problem(caught.value)) == (
        f"No space left on device (ENOSPC): {path}. Free some space (or choose a folder on "
        "another disk) and run the command again; an interrupted run resumes where it stopped."
    )
    assert environment_problem(caught.value).exit_status == 1
