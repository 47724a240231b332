"""Write a file or folder under a temporary name beside its target, rename when complete."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_sibling(target: str | os.PathLike[str]) -> Path:
    """A fresh, unused path in the target's folder whose name marks it as incomplete."""
    target = Path(target)
    return target.with_name(f".{target.name}.incomplete-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success replace ``target`` with it, on error delete it.

    A killed process leaves only a hidden ``.<name>.incomplete-*`` sibling, never a
    ``target`` that looks complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            _remove(target)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Delete ``.incomplete-*`` siblings that a killed writer of ``target`` left behind."""
    target = Path(target)
    stale = sorted(target.parent.glob(f".{target.name}.incomplete-*"))
    for path in stale:
        _remove(path)
    return stale
