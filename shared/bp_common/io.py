"""Files that are either complete or absent: atomic writes, atomic directories, locks, hashing."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .errors import BpError, from_os_error

PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
_CHUNK = 1 << 20


def partial_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def fsync_dir(path: Path | str) -> None:
    """fsync a directory so a rename inside it survives a power cut."""
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes | str | Callable[[object], None], mode: int = 0o644) -> Path:
    """Write `data` (bytes, str, or a callback given a binary file) to `path` atomically.

    The bytes go to `<path>.partial`, are fsynced, then renamed over `path`. A crash at any
    moment leaves either the old file or the new one, never a half-written final file.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise from_os_error(exc, f"writing {path}", output=True) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path | str, replace: bool = False) -> Iterator[Path]:
    """Build a directory at `<final>.partial` and rename it to `final` only on success.

    Yields the partial path to write into. On any exception the partial directory is removed
    and `final` is untouched. With replace=True an existing `final` is swapped out.
    """
    final = Path(final)
    tmp = partial_path(final)
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise from_os_error(exc, f"creating {tmp}", output=True) from exc
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
        if final.exists():
            if not replace:
                raise BpError("STATE_OUTPUT_EXISTS", f"{final} already exists")
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise from_os_error(exc, f"writing {final}", output=True) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError:
        pass


def sha256_file(path: Path | str) -> str:
    """Streaming sha256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def lock_path(output: Path | str) -> Path:
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


class OutputLock:
    """An exclusive, non-blocking lock on an output directory: `<output>.lock` beside it.

    The lock file exists before the directory does, so two cron runs aiming at the same
    output never both start. The loser raises STATE_LOCKED (exit 75, retryable).
    """

    def __init__(self, output: Path | str):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise from_os_error(exc, f"creating {self.path.parent}", output=True) from exc
        for _ in range(10):
            try:
                fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise from_os_error(exc, f"opening lock {self.path}", output=True) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f" (pid {holder})" if holder else ""
                    raise BpError("STATE_LOCKED", f"{self.output} is in use by another process{who}",
                                  details={"lock": str(self.path), "pid": holder}) from None
                raise from_os_error(exc, f"locking {self.path}") from exc
            # The previous holder may have unlinked the file between our open and flock:
            # then we hold a lock on a dead inode and must try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return self
            os.close(fd)
        raise BpError("STATE_LOCKED", f"could not take the lock {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode().strip()
        return int(raw) if raw else None
    except (OSError, ValueError):
        return None


def free_bytes(path: Path | str) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: Path | str, needed: int, what: str) -> None:
    """Raise RUNTIME_DISK_FULL before starting work that would need `needed` bytes."""
    free = free_bytes(path)
    if free < needed:
        raise BpError("RUNTIME_DISK_FULL",
                      f"{what} needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at {path}",
                      details={"needed_bytes": needed, "free_bytes": free})
