"""Error types whose ``str()`` is one line naming the file and the problem."""

from __future__ import annotations

import errno
import os
from os import PathLike

# errno of a failed write -> the problem, as the one-line errors say it
_WRITE_PROBLEMS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class NsdzarrError(Exception):
    """Base: a failure tied to one file; ``str()`` is ``<path>: <problem>`` on one line."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


class InputError(NsdzarrError, ValueError):
    """Bad input file or setting."""


class VerificationError(NsdzarrError):
    """A written store does not match its source."""


class OutputError(NsdzarrError):
    """An output cannot be written: disk full, quota, read-only or permission denied."""


def write_problem(err: OSError) -> str | None:
    """The problem of a failed write such as ``no space left on device``, or None if unknown."""
    return _WRITE_PROBLEMS.get(err.errno or -1)


def output_error(target: str | PathLike[str], err: OSError) -> OutputError | None:
    """``err`` as an :class:`OutputError` naming ``target``, or None if not a known write failure.

    ``target`` is what the job makes (a store), not the temporary file it was writing; that
    file, when the error knows it, follows in brackets.
    """
    problem = write_problem(err)
    if problem is None:
        return None
    detail = errno.errorcode.get(err.errno or -1, str(err.errno))
    if err.filename:
        detail += f" on {os.fspath(err.filename)}"
    return OutputError(target, f"{problem} ({detail})")


def unreadable(path: str | PathLike[str]) -> str | None:
    """``permission denied ...`` if an existing ``path`` cannot be read by this process."""
    if os.path.exists(path) and not os.access(path, os.R_OK):
        return "permission denied: the file is not readable by this user"
    return None
