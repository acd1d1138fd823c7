"""One writer per run directory: an advisory lock the kernel releases when its holder dies.

``RunLock(run_dir, purpose)`` takes an exclusive ``flock`` on ``run_dir/.lock`` and
writes who holds it (purpose, pid, host, command, start time) into that file. A second
process asking for the lock is refused at once with that description. Because the
kernel drops a ``flock`` when the last descriptor of its open file closes, a holder
killed by SIGKILL, a crash or a power cut leaves nothing that blocks the next run: the
file stays, the lock does not, and whatever the file still says is ignored.

``check_not_locked(run_dir)`` is the non-blocking test for readers, which must never
read a directory while it is being written.

The lock file is never deleted: deleting it would let two processes lock two different
files of one name (one holding the old, unlinked file, one a new file). A forked child
does not keep its parent's lock alive (its copy of the descriptor is closed at fork), so
a worker process that outlives a killed run does not block the resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from pipeline.errors import EnvironmentProblem, PipelineError

LOCK_FILE = ".lock"

# A reader's probe holds a shared lock for microseconds; a writer that meets one
# retries for this long before concluding that another writer holds the directory.
_PROBE_GRACE_SECONDS = 0.5
_RETRY_SECONDS = 0.02

# Locks this process holds, by the lock file's (device, inode), with their descriptors.
_HELD: dict[tuple[int, int], int] = {}


def _forget_locks_in_child() -> None:
    # Closing (never unlocking: that would release the parent's lock too) drops the
    # child's reference, so the lock goes when the parent's last descriptor does.
    for descriptor in _HELD.values():
        os.close(descriptor)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _holder(descriptor: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    try:
        recorded = json.loads(os.pread(descriptor, 65536, 0).decode())
        return (
            f"{recorded['purpose']} by pid {recorded['pid']} on {recorded['host']} since "
            f"{recorded['started_at']} (`{recorded['command']}`)"
        )
    except (ValueError, KeyError, TypeError):
        # The holder has locked but not yet written, or a reader is probing.
        return "another process"


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags, 0o644)
    except IsADirectoryError:
        raise PipelineError(
            f"{path} is a folder; it should be the lock file of the run directory. Remove it."
        ) from None


def _refused(run_dir: Path, holder: str) -> PipelineError:
    return PipelineError(
        f"run directory {run_dir} is in use: {holder}. Wait for it to finish or stop it "
        "(a run killed by any means releases the directory at once), or choose another "
        "directory."
    )


def _flock(descriptor: int, operation: int, path: Path) -> bool:
    """Try ``flock(operation | LOCK_NB)``; False when another process holds the lock."""
    try:
        fcntl.flock(descriptor, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise EnvironmentProblem(
                f"the file system of {path} does not support file locks ({err.strerror}); "
                "put the run directory on a local disk or a file system with locks."
            ) from None
        raise
    return True


class RunLock:
    """Exclusive use of a run directory for as long as the ``with`` block runs.

    Parameters
    ----------
    run_dir
        The run directory; created (with its parents) if missing.
    purpose
        What the holder does there (``"run"``, ``"stats"``), shown to anyone refused.

    Raises
    ------
    PipelineError
        On entry, when another process holds the directory (the message says who), or
        when ``run_dir`` is a file.
    EnvironmentProblem
        When the file system does not support locks.

    Examples
    --------
    >>> with RunLock(run_dir, "run"):  # doctest: +SKIP
    ...     write_the_artifacts(run_dir)
    """

    def __init__(self, run_dir: Path, purpose: str) -> None:
        self.run_dir = run_dir
        self.purpose = purpose
        self._descriptor: int | None = None
        self._key: tuple[int, int] | None = None

    def __enter__(self) -> RunLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise PipelineError(
                f"{self.run_dir} is a file, not a run directory; choose a folder (a new "
                "one, or a run directory to resume)."
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        descriptor = _open(path, os.O_RDWR | os.O_CREAT)
        try:
            status = os.fstat(descriptor)
            key = (status.st_dev, status.st_ino)
            if key in _HELD:
                raise RuntimeError(
                    f"this process already holds the lock of {self.run_dir}; RunLock is "
                    "not re-entrant"
                )
            deadline = time.monotonic() + _PROBE_GRACE_SECONDS
            while not _flock(descriptor, fcntl.LOCK_EX, path):
                if time.monotonic() >= deadline:
                    raise _refused(self.run_dir, _holder(descriptor))
                time.sleep(_RETRY_SECONDS)
            record = {
                "purpose": self.purpose,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": shlex.join(sys.argv),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            os.close(descriptor)  # also releases the lock if it was taken
            raise
        self._descriptor, self._key = descriptor, key
        _HELD[key] = descriptor
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._descriptor is None or self._key is None:
            return
        descriptor, self._descriptor = self._descriptor, None
        _HELD.pop(self._key, None)
        try:
            # Say nothing about a holder once there is none.
            os.ftruncate(descriptor, 0)
        finally:
            os.close(descriptor)


def check_not_locked(run_dir: Path) -> None:
    """Refuse to read ``run_dir`` while another process holds its lock.

    Non-blocking, and writes nothing (a read-only run directory is fine). A directory
    locked by this very process passes: the holder may read what it wrote.

    Raises
    ------
    PipelineError
        When another process holds the directory; the message says who.
    """
    path = run_dir / LOCK_FILE
    try:
        descriptor = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # never locked
    try:
        status = os.fstat(descriptor)
        if (status.st_dev, status.st_ino) in _HELD:
            return
        if not _flock(descriptor, fcntl.LOCK_SH, path):
            raise _refused(run_dir, _holder(descriptor))
    finally:
        os.close(descriptor)  # releases the probe's shared lock
