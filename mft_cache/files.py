"""Files in folders the project owns (cache folders, run folders): whole files written atomically, and an
`OwnedFolder` that lists a folder, tells the names its command writes from foreign ones, and removes only its own."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from .folder_lock import LOCK_FILE, FolderLock


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file under a temporary name (`.NAME.tmp-PID`), fsync, then rename: readers never see half of it,
    and a link at `path` is replaced, never written through."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON (sorted keys, indented) as write_text_atomic does."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


_TEMPORARY = re.compile(r"^\.[^/]+\.tmp-\d+$")


def is_temporary(name: str) -> bool:
    """Whether `name` is the temporary name write_text_atomic (or a writer like it) gives a file: `.NAME.tmp-PID`."""
    return bool(_TEMPORARY.match(name))


def read_json_object(path: Path, max_bytes: int) -> dict | None:
    """The JSON object in `path` if it is a regular file (not a link) of at most `max_bytes`; else None."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > max_bytes:
        return None
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
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
    version of it wrote; and holding nothing but names `ours` allows. The marker is written once the folder is
    shown to be ours. Refused otherwise, naming what was found, with nothing written or removed."""
    lock = FolderLock.acquire(path, flag)
    try:
        folder = OwnedFolder(path, lambda n: n == marker_name(kind) or ours(n))
        names = folder.names()
        foreign = folder.foreign(names)
        if foreign:
            raise ValueError(f"{flag} {path} holds files mft {kind} does not write (e.g. {foreign[:3]}); nothing was "
                             "written or removed; choose an empty or new folder")
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
