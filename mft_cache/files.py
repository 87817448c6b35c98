"""Files in folders the project owns (cache folders, run folders): whole files written atomically, and an
`OwnedFolder` that lists a folder, tells the names its command writes from foreign ones, and removes only its own."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .folder_lock import LOCK_FILE


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON under a temporary name, fsync, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
