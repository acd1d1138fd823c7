"""The command line in a process of its own, forked from a server that imported it once.

Kill and interrupt tests need the CLI in another process: a SIGKILL must hit the run,
not the test. A fresh interpreter spends longer importing torch, transformers and vLLM
than a small run takes (``benchmarks/run_overhead.py``: cold against warm runs); a
process forked from a ``multiprocessing`` fork server that imported them once (per
test worker) starts at once. The child runs
``pipeline.cli.main`` in its main thread with its output sent to files, so signals
reach the run as they reach ``entropy-pipeline run`` started from a shell (SIGINT
raises KeyboardInterrupt, SIGKILL ends it), and its exit status is the CLI's.

The fork server is started with the environment a CPU engine sets
(``pipeline.engine.resolve_profile``), since vLLM reads some of it at import time.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from multiprocessing.context import ForkServerContext
from pathlib import Path

# What a run imports at its start or lazily later (vLLM loads its engine core, model
# runner and model classes only when an engine starts).
_PRELOAD = [
    "pipeline.cli",
    "pipeline.run",
    "pipeline.worker",
    "pipeline.sample",
    "pipeline.score",
    "pipeline.figures",
    "pipeline.stats.summary",
    "transformers",
    "vllm",
    "vllm.entrypoints.llm",
    "vllm.v1.engine.core",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.worker.cpu_model_runner",
    "vllm.model_executor.models.llama",
    "matplotlib.pyplot",
]


@functools.cache
def _fork_server() -> ForkServerContext:
    """The fork server's context; the server itself starts with the first child."""
    from pipeline.config import EngineConfig
    from pipeline.engine import resolve_profile

    for key, value in resolve_profile(EngineConfig(), "cpu", 1, 1).environment.items():
        os.environ.setdefault(key, value)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _main(argv: list[str], output: str, die_after: str | None) -> None:
    """The child: the CLI with stdout and stderr in ``output``.{out,err}."""
    for fd, suffix in ((1, "out"), (2, "err")):
        file = os.open(f"{output}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if die_after is not None:
        module_name, _, name = die_after.rpartition(".")
        module = importlib.import_module(module_name)
        function = getattr(module, name)

        def then_die(*args: object, **kwargs: object) -> object:
            result = function(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(module, name, then_die)
    from pipeline.cli import main

    sys.exit(main(argv))


class CliProcess:
    """``entropy-pipeline ARGV`` in a forked process; a small part of ``Popen``'s API.

    With ``die_after="module.function"`` the child SIGKILLs itself right after that
    function returns (the module attribute is replaced in the child only).
    """

    def __init__(self, *argv: str | Path, die_after: str | None = None) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="entropy-pipeline-cli-"))
        self._process = _fork_server().Process(
            target=_main, args=([str(a) for a in argv], str(self._folder / "cli"), die_after)
        )
        self._process.start()
        assert self._process.pid is not None
        self.pid: int = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        if self.returncode is None and not self._process.is_alive():
            self.returncode = self._process.exitcode
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process."""
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (at most ``timeout`` s); return what it wrote to stdout and stderr."""
        self._process.join(timeout)
        if self._process.is_alive():
            raise TimeoutError(f"pid {self.pid} still runs after {timeout} s")
        self.poll()
        # Files the child never opened (it died first) read as empty.
        stdout, stderr = (
            path.read_text() if path.exists() else ""
            for path in (self._folder / "cli.out", self._folder / "cli.err")
        )
        shutil.rmtree(self._folder)
        return stdout, stderr
