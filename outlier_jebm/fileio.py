"""One atomic write for every file the package produces (model files, caches, bench results).

A reader never sees half a file: the content goes to a unique temporary file beside the
target (same folder, so the same file system), which is renamed onto the target only once it
is complete. On any error the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary path to write; renamed onto ``target`` when the block ends without error.

    Parameters
    ----------
    target : str or Path
        The file to create or replace; its folder is created if missing.
    mode : int, optional
        Permission bits for the finished file (``mkstemp`` creates it 0600).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | Path, text: str) -> None:
    """``Path.write_text``, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)
