"""Hold a run directory's lock in a process of its own, for tests that kill or contend.

``python -m tests.lock_holder RUN_DIR [--go FILE] [--fork]``: prints ``ready``, waits
until FILE exists (so that several holders start at the same moment), takes
``RunLock(RUN_DIR, "run")``, prints ``locked <pid>`` (and ``child <pid>`` of a forked
child that sleeps too with ``--fork``) and sleeps until it is killed. When refused,
prints ``refused: <message>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.lock import RunLock

ROOT = Path(__file__).resolve().parent.parent


def start(run_dir: Path, *options: str | Path) -> subprocess.Popen[str]:
    """Start a holder; returns once it is ready (not yet holding the lock)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.lock_holder", str(run_dir), *map(str, options)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert read_line(process) == "ready"
    return process


def read_line(process: subprocess.Popen[str]) -> str:
    """The holder's next line of output."""
    assert process.stdout is not None
    return process.stdout.readline().rstrip("\n")


def stop(process: subprocess.Popen[str]) -> None:
    """Kill a holder (if still running) and close its pipe."""
    process.kill()
    process.wait()
    assert process.stdout is not None
    process.stdout.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--go", type=Path, default=None)
    parser.add_argument("--fork", action="store_true")
    args = parser.parse_args()
    print("ready", flush=True)
    while args.go is not None and not args.go.exists():
        time.sleep(0.001)
    try:
        with RunLock(args.run_dir, "run"):
            print(f"locked {os.getpid()}", flush=True)
            if args.fork:
                child = os.fork()
                if child == 0:
                    time.sleep(600)
                    os._exit(0)
                print(f"child {child}", flush=True)
            time.sleep(600)
    except PipelineError as err:
        print(f"refused: {err}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
