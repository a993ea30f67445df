"""Writing result files so that an interrupted run never leaves a half-written one.

* :func:`atomic_write` / :func:`atomic_write_text`: one file, written under a temporary name in the
  same folder and renamed over the target (a rename within a folder is atomic).
* :func:`staged_folder`: a folder of files that belong together (a spectrum, its density, tables and
  figures), filled under ``<name>.partial`` and renamed to ``<name>`` only when every file is written.
  An interrupted run leaves the clearly marked ``<name>.partial`` folder, never a ``<name>`` folder with
  some of its files missing or from an earlier run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = ["PARTIAL_SUFFIX", "atomic_write", "atomic_write_text", "staged_folder"]

PARTIAL_SUFFIX = ".partial"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a binary file handle under a temporary name next to ``path``, then rename it
    to ``path``. The file gets the mode a plain ``open(path, "wb")`` gives (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Yield ``<folder>.partial`` (emptied first) to write into; when the body finishes, it replaces
    ``folder``. When the body raises (Ctrl-C included), ``<folder>.partial`` stays as it is and ``folder``
    keeps its earlier content, if any."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    yield partial
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.{secrets.token_hex(8)}.old")
        os.replace(folder, retired)
        os.replace(partial, folder)
        shutil.rmtree(retired)
    else:
        os.replace(partial, folder)
