"""One writer per folder: an advisory lock (`fcntl.flock`) on `.mft-lock` inside the cache or run folder,
held for the whole of `mft cache` / `mft train` by the first process of a launch.

Shared by both stages (like faults.py), so storage, pipeline and trainer can all import it. flock is released
by the kernel when its holder dies, so a lock file left by a killed run is simply taken over. The holder writes
its pid into the file, so a refused second process can say who holds the folder. The file is removed on release
(a folder ends as it would without the lock); a waiter that opened the removed file notices (its inode is not
the path's any more) and tries again, so two processes never both believe they hold it. The lock file is opened
through files.open_owned_fd: a link, a FIFO or a device planted at `.mft-lock` is removed (the name itself, never
what a link points at) and a regular file made in its place; nothing is ever written through it.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from .files import LOCK_FILE, NotARegularFile, open_owned_fd

log = logging.getLogger(__name__)

# file systems without flock (some FUSE and old NFS mounts): the run goes ahead unlocked, with a warning
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_TRIES = 100  # a lock file replaced between our open and flock, again and again: given up on


class FolderBusy(ValueError):
    """Another live process holds the folder (a user error: exit 2)."""


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file ("unknown" while it has not written it yet)."""
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class FolderLock:
    """The lock on one folder. `FolderLock.acquire(folder)` creates the folder if needed and raises FolderBusy
    naming the holder's pid if another process has it; `release()` (idempotent) lets it go, and removes the
    folder again if this lock created it and nothing else was written there (a run refused at its start)."""

    def __init__(self, folder: Path, fd: int | None, created: bool):
        self.folder, self.fd, self.created = folder, fd, created

    @classmethod
    def acquire(cls, folder: Path, flag: str = "--out") -> "FolderLock":
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{flag} {folder} is a file, not a folder")
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        for _ in range(_TRIES):
            try:
                fd = open_owned_fd(folder, LOCK_FILE, os.O_RDWR | os.O_CREAT)
            except NotARegularFile as e:
                if e.kind == "a folder":
                    raise ValueError(f"{flag} {folder}: {LOCK_FILE} is a folder, where mft keeps its lock file; "
                                     "remove it, or choose another folder") from None
                log.warning("%s %s: %s was %s; removed (never followed), a lock file made in its place", flag,
                            folder, LOCK_FILE, e.kind)
                path.unlink(missing_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                raise FolderBusy(f"{flag} {folder} is in use by another mft process (pid {pid}); wait for it to "
                                 "finish or stop it, or choose another folder") from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_LOCKS:
                    raise
                log.warning("%s %s: this file system cannot lock files (%s); make sure no other process writes "
                            "this folder", flag, folder, e.strerror)
                return cls(folder, None, created)
            if _same_file(fd, path):  # else its previous holder removed it between our open and flock: again
                break
            os.close(fd)
        else:
            raise ValueError(f"{flag} {folder}: {LOCK_FILE} changed under every one of {_TRIES} tries to lock it; "
                             "another program keeps replacing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(folder, fd, created)

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # removed while still held: see the module docstring
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created:
            try:
                self.folder.rmdir()  # only if empty
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
