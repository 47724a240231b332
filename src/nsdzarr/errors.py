"""Error types whose ``str()`` is one line naming the file and the problem."""

from __future__ import annotations

from os import PathLike


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
