"""The errors the command line turns into one clean line, and their exit statuses.

Two kinds, told apart by what the user must fix:

- ``PipelineError``: the input (config, prompts, models, a run directory, a command
  line option) is wrong; exit status 2.
- ``EnvironmentProblem``: the input is fine but the machine is not (a full disk, a
  missing permission, a file system without locks); exit status 1. An ``OSError``
  that reaches the command line is reported the same way (``environment_problem``).

Anything else is a bug or an unforeseen situation: the command line prints its type
and message on one line, exits with status 1 and offers ``--debug`` for the traceback.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PipelineError(Exception):
    """A problem with the user's input, stated so they can fix it.

    The message names the setting or file, the value received, what is allowed and
    what to do; the CLI prints it without a traceback and exits with ``exit_status``.
    """

    exit_status = 2


class EnvironmentProblem(PipelineError):
    """A problem with the machine rather than the input (disk, permissions, locks)."""

    exit_status = 1


_ADVICE = {
    errno.ENOSPC: "free some space (or choose a folder on another disk) and run the "
    "command again; an interrupted run resumes where it stopped",
    errno.EDQUOT: "free some space within your quota (or choose another folder) and run "
    "the command again; an interrupted run resumes where it stopped",
    errno.EACCES: "check the permissions of that path, or choose another folder",
    errno.EPERM: "check the permissions of that path, or choose another folder",
    errno.EROFS: "the file system is read-only; choose another folder",
}


def environment_problem(err: OSError) -> EnvironmentProblem:
    """The one-line ``EnvironmentProblem`` for an ``OSError`` from reading or writing.

    Says what failed (the system's words and the errno name), on which path when the
    error names one, and what to do for the common cases (full disk, permissions).
    """
    code = err.errno
    if err.strerror:
        what = err.strerror
        if code in errno.errorcode:
            what += f" ({errno.errorcode[code]})"
        if err.filename is not None:
            what += f": {os.fsdecode(err.filename)}"
    else:  # e.g. pyarrow's errors carry only a message
        what = " ".join(str(err).split()) or type(err).__name__
    advice = _ADVICE.get(code, "check the path and the file system")
    return EnvironmentProblem(f"{what}. {advice[0].upper()}{advice[1:]}.")


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Put ``path`` into an ``OSError`` raised in the block that names no file.

    A write that fails on a full disk raises from ``write`` or ``close``, which know no
    path; the message should still say which file could not be written.
    """
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from err
