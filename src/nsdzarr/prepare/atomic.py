"""Write a file or folder under a temporary name beside its target, rename when complete."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nsdzarr.errors import output_error


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_sibling(target: str | os.PathLike[str]) -> Path:
    """A fresh, unused path in the target's folder whose name marks it as incomplete."""
    target = Path(target)
    return target.with_name(f".{target.name}.incomplete-{uuid.uuid4().hex[:8]}")


def settle_zarr_writes() -> None:
    """Wait until no zarr-python write is still running.

    When one write of ``arr[...] = x`` fails (e.g. disk full), zarr raises at once but its
    other writes go on in zarr's event-loop thread; removed before they end, a temporary
    store would be re-created by them.
    """
    sync = sys.modules.get("zarr.core.sync")
    loop = getattr(sync, "loop", [None])[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def drain() -> None:
        while others := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            await asyncio.gather(*others, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(drain(), loop).result()


@contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success replace ``target`` with it, on error delete it.

    A killed process leaves only a hidden ``.<name>.incomplete-*`` sibling, never a
    ``target`` that looks complete. A full disk, a quota, a read-only or forbidden folder
    raise :class:`~nsdzarr.errors.OutputError` naming ``target``.
    """
    target = Path(target)
    tmp = temp_sibling(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if target.exists() or target.is_symlink():
            _remove(target)
        os.replace(tmp, target)
    except BaseException as err:
        settle_zarr_writes()
        _remove(tmp)
        failed = output_error(target, err) if isinstance(err, OSError) else None
        if failed is None:
            raise
        raise failed from None


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Delete ``.incomplete-*`` siblings that a killed writer of ``target`` left behind."""
    target = Path(target)
    stale = sorted(target.parent.glob(f".{target.name}.incomplete-*"))
    for path in stale:
        _remove(path)
    return stale
