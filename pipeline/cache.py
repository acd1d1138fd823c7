"""Folders built once and published atomically: the candidates' cache and the demo models.

A folder is built in a temporary sibling, ``.tmp-<name>-<host>-<pid>-<random>``, and
renamed into place when complete. A reader therefore finds either no folder or a
complete one, whatever stops the builder (an exception, Ctrl-C, SIGKILL, a full disk):
the name of an entry is only ever created by that rename. A cache entry is named by a
content hash of everything it is made from, so a changed input gets a new entry and a
stale one is never used. Two processes building one entry at once both build it; the
first rename wins and the other discards its copy (entries with one name are equal).

The temporary folder of a killed builder is removed by the next build of the same
name on the same host, once the process that made it is gone.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

_TEMPORARY = ".tmp-"


def _temporary_prefix(name: str) -> str:
    return f"{_TEMPORARY}{name}-{socket.gethostname()}-{os.getpid()}-"


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_abandoned(parent: Path, name: str) -> list[Path]:
    """Remove temporary folders of ``name`` whose builder on this host has exited.

    Returns the folders removed. A temporary folder of another host, or of a process
    that still runs, is kept: it may be a build in progress.
    """
    removed = []
    prefix, host = f"{_TEMPORARY}{name}-", socket.gethostname()
    for candidate in parent.glob(f"{prefix}*"):
        # Host names may hold '-', the random suffix of mkdtemp never does.
        owner, _, rest = candidate.name.removeprefix(prefix).rpartition("-")
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and rest and not _is_running(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def publish_folder(target: Path, build: Callable[[Path], None], *, replace: bool = False) -> bool:
    """Make folder ``target`` by ``build(temporary)`` and a rename; True if it was published.

    Parameters
    ----------
    target
        The folder to create. Its parent is created if missing.
    build
        Writes the folder's content into the empty temporary folder it is given.
    replace
        False (a cache entry): when ``target`` exists once the build is done (another
        process was faster), the new copy is discarded and False returned. True (a
        rebuilt artifact): an existing ``target`` is replaced; for the moment between
        the two renames no folder of that name exists, never a partial one.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent, target.name)
    temporary = Path(tempfile.mkdtemp(dir=parent, prefix=_temporary_prefix(target.name)))
    try:
        build(temporary)
        temporary.chmod(0o755)  # mkdtemp makes it private; the entry is shared like a model
        if replace and target.exists():
            retired = Path(tempfile.mkdtemp(dir=parent, prefix=_temporary_prefix(target.name)))
            target.rename(retired / "old")
            temporary.rename(target)
            shutil.rmtree(retired)
            return True
        try:
            temporary.rename(target)  # refuses to replace a non-empty folder
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(temporary)
            return False
        return True
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def cached_folder(root: Path, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The cache entry ``root/key``, built by ``build`` unless it exists.

    ``key`` must be a content hash of everything ``build`` reads (see the module
    notes). Returns the entry and whether this call built it.
    """
    target = root / key
    if target.is_dir():
        return target, False
    return target, publish_folder(target, build)
