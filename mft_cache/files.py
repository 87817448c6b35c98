"""Files in folders the project owns (cache folders, run folders): every file there is opened through `open_owned`
(a name of the project's, never a path a user typed; never through a link; regular files only, so a FIFO or a
device planted at a name is refused, not opened), whole files are written atomically, and an `OwnedFolder` lists
a folder, tells the names its command writes from foreign ones, and removes only its own."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .folder_lock import FolderLock

LOCK_FILE = ".mft-lock"  # a folder's lock (folder_lock.py): in every owned folder, never listed as one of its names


class NotARegularFile(ValueError):
    """A name in an owned folder holds a link, a FIFO, a socket or a device (or a folder where a file belongs):
    a user error (exit 2). `.kind` says which."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        what = ("a folder, where mft keeps a file" if kind == "a folder" else
                f"{kind}, not a file or folder mft wrote: mft never reads or writes through one")
        super().__init__(f"{path} is {what}; nothing was written to it. Remove it, or choose another folder")


def check_name(name: str) -> str:
    """`name` if it is one file name (no "/", not "", "." or ".."); else ValueError. A name the project opens in a
    folder it owns is never a path: it cannot reach outside the folder."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a file name (one path component, not '.' or '..')")
    return name


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return kind
    return "not a regular file"


def owned_stat(folder: Path, name: str) -> os.stat_result | None:
    """The stat of `folder/name` (never of what a link there points at); None where nothing has that name.
    Raises NotARegularFile where it is anything but a regular file."""
    path = Path(folder) / check_name(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(path, _kind(st.st_mode))
    return st


# the modes open_owned takes: os.open flags, and the mode of the file object. "w" truncates only once the name is
# known to hold a regular file; "x" creates a new file (O_EXCL: nothing there, not even a link)
_MODES = {"r": (os.O_RDONLY, "r"), "rb": (os.O_RDONLY, "rb"), "r+b": (os.O_RDWR, "r+b"),
          "a": (os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a"), "ab": (os.O_WRONLY | os.O_APPEND | os.O_CREAT, "ab"),
          "w": (os.O_WRONLY | os.O_CREAT, "w"), "wb": (os.O_WRONLY | os.O_CREAT, "wb"),
          "x": (os.O_WRONLY | os.O_CREAT | os.O_EXCL, "w"), "xb": (os.O_WRONLY | os.O_CREAT | os.O_EXCL, "wb")}


def open_owned_fd(folder: Path, name: str, flags: int, mode: int = 0o644) -> int:
    """A file descriptor of the regular file `name` in `folder`, opened with os.open `flags` (O_NOFOLLOW added:
    a link there is refused, never followed). Whatever is there is looked at before it is opened, and the file
    opened is checked again, so a FIFO or a device is never waited on or written to. Raises NotARegularFile
    (a ValueError naming the file), FileNotFoundError, or FileExistsError (with O_EXCL)."""
    path = Path(folder) / check_name(name)
    if not flags & os.O_EXCL:
        owned_stat(folder, name)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a link
            raise NotARegularFile(path, "a symbolic link") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO without a reader, a folder: put there since the look
            st = os.lstat(path)
            raise NotARegularFile(path, _kind(st.st_mode)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(path, _kind(st.st_mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_owned(folder: Path, name: str, mode: str = "r") -> IO:
    """The regular file `name` in `folder` as a file object (see open_owned_fd): `mode` is "r", "rb", "r+b",
    "a"/"ab" (created if missing), "w"/"wb" (created, or emptied once known to be a regular file) or "x"/"xb" (a
    new file: refused with FileExistsError where anything, a link included, has the name)."""
    if mode not in _MODES:
        raise ValueError(f"open_owned: mode {mode!r} is not one of {list(_MODES)}")
    flags, file_mode = _MODES[mode]
    fd = open_owned_fd(folder, name, flags)
    try:
        if mode in ("w", "wb"):
            os.ftruncate(fd, 0)
        return os.fdopen(fd, file_mode)
    except BaseException:
        os.close(fd)
        raise


def read_owned(folder: Path, name: str, max_bytes: int) -> bytes:
    """The bytes of the regular file `name` in `folder` (open_owned); ValueError naming it where it holds more than
    `max_bytes`."""
    with open_owned(folder, name, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{Path(folder) / name} holds more than {max_bytes:,} bytes, more than mft writes there")
    return data


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file whole under a temporary name (`.NAME.tmp-PID`, created new: O_EXCL, no link followed), fsync,
    then rename over `path`: readers never see half of it, and whatever had the name (a link, a FIFO) is replaced,
    never written through. A temporary name left by a killed process of the same pid is removed first."""
    path = Path(path)
    tmp = f".{check_name(path.name)}.tmp-{os.getpid()}"
    try:
        f = open_owned(path.parent, tmp, "xb")
    except FileExistsError:
        os.unlink(path.parent / tmp)  # the name itself, never what a link there points at
        f = open_owned(path.parent, tmp, "xb")
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path.parent / tmp, path)
    except BaseException:
        (path.parent / tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a UTF-8 text file as write_bytes_atomic does."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON (sorted keys, indented) as write_bytes_atomic does."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


_TEMPORARY = re.compile(r"^\.[^/]+\.tmp-\d+$")


def is_temporary(name: str) -> bool:
    """Whether `name` is the temporary name write_bytes_atomic (or a writer like it) gives a file: `.NAME.tmp-PID`."""
    return bool(_TEMPORARY.match(name))


def read_json_object(path: Path, max_bytes: int) -> dict | None:
    """The JSON object in `path` if it is a regular file (not a link, a FIFO, ...) of at most `max_bytes`;
    else None."""
    path = Path(path)
    try:
        obj = json.loads(read_owned(path.parent, path.name, max_bytes))
    except (OSError, ValueError, RecursionError):  # ValueError: NotARegularFile, too big, not UTF-8 or not JSON
        return None
    return obj if isinstance(obj, dict) else None


def remove_member(path: Path) -> None:
    """Remove one file or folder of an owned folder. A symlink is removed itself, never what it points at."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


class OwnedFolder:
    """A folder one command owns. `ours(name)` says whether a name is one that command writes; the folder's lock
    file is never listed, and the folder itself is never removed (`--out .` must not cost anyone their files)."""

    def __init__(self, path: Path, ours: Callable[[str], bool]):
        self.path, self.ours = Path(path), ours

    def names(self) -> list[str]:
        """The folder's names, sorted, the lock left out; [] where the folder does not exist."""
        if not self.path.is_dir():
            return []
        return sorted(n for n in os.listdir(self.path) if n != LOCK_FILE)

    def check_kinds(self, names: list[str]) -> None:
        """Raise NotARegularFile for the first of `names` that is neither a regular file nor a folder (a link, even
        to one of those, a FIFO, a socket, a device): the command never writes through what is planted there."""
        for n in names:
            mode = os.lstat(self.path / check_name(n)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise NotARegularFile(self.path / n, _kind(mode))

    def foreign(self, names: list[str]) -> list[str]:
        """The names among `names` that the command does not write."""
        return [n for n in names if not self.ours(n)]

    def remove(self, names: list[str]) -> None:
        """Remove `names`, every one of which must be ours (refuse first: see `foreign`)."""
        assert not self.foreign(names), f"remove() of foreign names {self.foreign(names)[:3]} in {self.path}"
        for n in names:
            remove_member(self.path / n)


def claim_folder(path: Path, kind: str, ours: Callable[[str], bool], proof: Callable[[Path], bool],
                 flag: str = "--out") -> FolderLock:
    """Lock `path` (created if missing) for one command of `kind` ("sweep", ...) and check that the folder is that
    command's to write: empty, or marked by it (`.mft-<kind>.json`), or holding what `proof(path)` shows an older
    version of it wrote; and holding nothing but names `ours` allows, each a regular file or a folder (never a link,
    a FIFO or a device). The marker is written once the folder is shown to be ours. Refused otherwise, naming what
    was found, with nothing written or removed."""
    from .folder_lock import FolderLock  # folder_lock opens its lock file through this module

    lock = FolderLock.acquire(path, flag)
    try:
        folder = OwnedFolder(path, lambda n: n == marker_name(kind) or ours(n))
        names = folder.names()
        foreign = folder.foreign(names)
        if foreign:
            raise ValueError(f"{flag} {path} holds files mft {kind} does not write (e.g. {foreign[:3]}); nothing was "
                             "written or removed; choose an empty or new folder")
        folder.check_kinds(names)
        if names and marker_name(kind) not in names and not proof(path):
            raise ValueError(f"{flag} {path} holds files named like an mft {kind}'s ({names[:3]}) but no "
                             f"{marker_name(kind)} and nothing that shows it wrote them, so nothing was written; "
                             "remove them by hand or choose another folder")
        marker = path / marker_name(kind)
        if not names or marker_name(kind) not in names:
            write_json_atomic(marker, {"tool": "mft-cache", "kind": kind})
        elif not _is_marker(marker, kind):
            raise ValueError(f"{flag} {path}: {marker.name} is not the marker mft {kind} writes; nothing was written")
    except BaseException:
        lock.release()
        raise
    return lock


def marker_name(kind: str) -> str:
    return f".mft-{kind}.json"


def _is_marker(path: Path, kind: str) -> bool:
    marker = read_json_object(path, 4096)
    return marker is not None and marker.get("tool") == "mft-cache" and marker.get("kind") == kind
