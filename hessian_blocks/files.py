"""Writing result files so that an interrupted run never leaves a half-written one, and two runs never
write into the same output at once.

* :func:`atomic_write` / :func:`atomic_write_text`: one file, written under a temporary name in the
  same folder and renamed over the target (a rename within a folder is atomic).
* :func:`staged_folder`: a folder of files that belong together (a spectrum, its density, tables and
  figures), filled under ``<name>.<process id>.partial`` (a folder of this run's own) and renamed to
  ``<name>`` only when every file is written. An interrupted run leaves the clearly marked partial
  folder, never a ``<name>`` folder with some of its files missing or from an earlier run.
* :func:`hold_output`: an output folder or file held by one run at a time (an advisory lock the system
  releases when the process ends, however it ends); a second run is refused with :class:`OutputInUseError`
  naming the run that holds it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX (Windows): outputs are not locked
    fcntl = None

__all__ = ["LOCK_NAME", "PARTIAL_SUFFIX", "OutputInUseError", "atomic_write", "atomic_write_text", "hold_output",
           "staged_folder"]

PARTIAL_SUFFIX = ".partial"
LOCK_NAME = ".hessian-blocks.lock"  # the lock file inside an output folder


class OutputInUseError(OSError):
    """Another run holds the output folder or file (the command line: exit code 2)."""


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
    """Yield ``<folder>.<process id>.partial`` (emptied first) to write into; when the body finishes, it
    replaces ``folder``, and the partial folders that earlier runs left for the same ``folder`` are
    removed. When the body raises (Ctrl-C included), the partial folder stays as it is and ``folder``
    keeps its earlier content, if any."""
    folder = Path(folder)
    partial = _partial(folder, os.getpid())
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
    for left in folder.parent.glob(f"{glob.escape(folder.name)}.*{PARTIAL_SUFFIX}"):
        if left.name[len(folder.name) + 1:-len(PARTIAL_SUFFIX)].isdigit():  # an interrupted run's, superseded
            shutil.rmtree(left, ignore_errors=True)


def _partial(folder: Path, pid: int) -> Path:
    return folder.with_name(f"{folder.name}.{pid}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def hold_output(path: str | Path, flag: str = "--out", *, folder: bool = True) -> Iterator[Path]:
    """Hold the output ``path`` for the body: a folder (created if missing; its lock file is
    ``path/.hessian-blocks.lock``) or, with ``folder=False``, a file (its lock file ``.<name>.lock``
    beside it). While one process holds it, another raises :class:`OutputInUseError` naming ``flag``,
    the path and the holder (its process id and command line), and saying that another ``flag`` or
    waiting fixes it. The lock file is removed when the body ends, and so are the folders made for it that
    stayed empty; the lock itself is the system's (``flock``), released when the process ends in any way,
    so a killed run never blocks the next one."""
    path = Path(path)
    folder_path = path if folder else path.parent
    created = [p for p in (folder_path, *folder_path.parents) if not p.exists()]
    folder_path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME if folder else path.with_name(f".{path.name}.lock")
    try:
        if fcntl is None:
            yield path
            return
        fd = _lock(lock, flag, path)
        try:
            os.write(fd, f"{os.getpid()} {' '.join(['hessian-blocks', *sys.argv[1:]])}\n".encode())
            yield path
        finally:
            lock.unlink(missing_ok=True)  # still held: no other process can have taken this file meanwhile
            os.close(fd)
    finally:
        for made in created:  # a run that wrote nothing leaves no empty folders behind
            with contextlib.suppress(OSError):
                made.rmdir()


def _lock(lock: Path, flag: str, path: Path) -> int:
    """An open descriptor of ``lock`` holding its exclusive lock; OutputInUseError when another holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            pid, _, command = holder.partition(" ")
            by = f"process {pid}: {command}" if pid.isdigit() else "its lock file is held"
            raise OutputInUseError(
                f"{flag} {path} is in use by another run that has not finished ({by}); two runs writing into one "
                f"output would mix their files. Give this run another {flag}, or wait until that run ends"
            ) from None
        try:  # the holder before may have removed the file between our open and our lock: lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                os.ftruncate(fd, 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
