"""Helpers shared by the benchmark scripts.

The scripts run as ``python benchmarks/<script>.py``, which puts this folder first on
``sys.path``, so they import this module as ``_common``. It uses the standard library
only and never imports ``pipeline``: ``numpy_baseline.py`` must stay independent of it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024**2
# A hand-written section of a results file from this heading on survives a rerun.
NOTES_HEADING = "## Notes"

# Called with the child's pid and an event set once the child has exited.
Watcher = Callable[[int, threading.Event], None]


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of a script's docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def measure(
    command: list[str],
    stdout: Path,
    stderr: Path,
    timeout: float | None,
    *,
    cwd: Path | None = None,
    watch: Watcher | None = None,
) -> tuple[float, float, int, int]:
    """Run ``command`` to completion in a fresh process and measure it.

    Parameters
    ----------
    command : list of str
        The child's argument vector.
    stdout, stderr : Path
        Files that receive the child's output.
    timeout : float, optional
        Kill the child after this many seconds (its return code is then negative).
    cwd : Path, optional
        The child's working directory (default: this process's).
    watch : callable, optional
        Run in a daemon thread while the child runs, as ``watch(pid, stop)``; ``stop``
        is set once the child has exited, and the thread is joined before returning.

    Returns
    -------
    tuple of (float, float, int, int)
        Wall seconds, CPU seconds (user + system), peak RSS in bytes (the child's own
        ``ru_maxrss``, from ``os.wait4``), and the exit code.
    """
    stop = threading.Event()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err)
        watcher = threading.Thread(target=watch, args=(child.pid, stop), daemon=True)
        if watch:
            watcher.start()
        killer = threading.Timer(timeout, child.kill) if timeout else None
        if killer:
            killer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            if killer:
                killer.cancel()
            stop.set()
        wall = time.perf_counter() - started
        if watch:
            watcher.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    # Linux reports ru_maxrss in KiB.
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, child.returncode


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file (a child's stderr, say)."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def entropy_pipeline_executable() -> str:
    """The ``entropy-pipeline`` script next to this Python, else the one on PATH."""
    entropy_pipeline = Path(sys.executable).parent / "entropy-pipeline"
    if not entropy_pipeline.exists():
        entropy_pipeline = Path(shutil.which("entropy-pipeline") or "entropy-pipeline")
    return str(entropy_pipeline)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_gib() -> float:
    """Physical memory in GiB from /proc/meminfo (NaN when unavailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def versions(libraries: Iterable[str]) -> dict[str, str]:
    """Python and the installed versions of ``libraries`` (the ones that decide timings)."""
    found = {"python": platform.python_version()}
    for name in libraries:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def pipeline_revision(checkout: Path = ROOT) -> str:
    """A checkout's commit and whether its ``pipeline/`` differs from it (read-only git).

    The checkout is this repository unless another is given.
    """

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", *arguments], cwd=checkout, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "pipeline")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = len(dirty.splitlines())
    return f"commit {commit}" + (
        f", with {changed} uncommitted change(s) under pipeline/" if changed else ", clean"
    )


def machine_context(libraries: Iterable[str]) -> dict[str, Any]:
    """Date, CPU, cores, memory, OS and library versions for a results file.

    Parameters
    ----------
    libraries : iterable of str
        Distributions whose versions to report (after Python's).

    Returns
    -------
    dict
        ``date``, ``cpu``, ``cores``, ``memory_gib``, ``os`` and ``versions``.
    """
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions(libraries),
    }


def write_report(path: Path, lines: list[str]) -> None:
    """Write the Markdown ``lines`` to ``path``, keeping its old ``NOTES_HEADING`` section.

    Parameters
    ----------
    path : Path
        The results file; a section of an existing one that starts with
        ``NOTES_HEADING`` is appended to the new text.
    lines : list of str
        The report, one line each.
    """
    notes = ""
    if path.is_file():
        existing = path.read_text()
        if f"\n{NOTES_HEADING}" in existing:
            notes = existing[existing.index(f"\n{NOTES_HEADING}") + 1 :]
    text = "\n".join(lines)
    path.write_text(text + ("\n" + notes if notes else ""))


def machine_and_versions(context: dict[str, Any], load_note: str) -> list[str]:
    """The "Machine" and "Versions" sections of a results file, from ``machine_context``.

    ``load_note`` follows the load averages: what the load means for these timings.
    """
    return [
        "## Machine",
        "",
        f"- CPU: {context['cpu']}, {context['cores']} cores (os.cpu_count), no GPU",
        f"- memory: {context['memory_gib']:.1f} GiB",
        f"- OS: {context['os']}",
        "- load average (1, 5, 15 min) before: "
        + ", ".join(f"{x:.2f}" for x in context["load_before"])
        + "; after: "
        + ", ".join(f"{x:.2f}" for x in context["load_after"])
        + f". {load_note}",
        "",
        "## Versions",
        "",
        f"- entropy-pipeline source: {context['revision_before']} at the start, "
        f"{context['revision_after']} at the end",
        *(f"- {k} {v}" for k, v in context["versions"].items()),
        "",
    ]
