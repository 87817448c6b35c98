"""Owned folders: a command lists, refuses and removes only the names it writes; a link is removed itself, never
what it points at; the folder and its lock stay."""
from __future__ import annotations

import re

import pytest

from mft_cache.files import OwnedFolder, remove_member, write_json_atomic
from mft_cache.folder_lock import LOCK_FILE

OURS = re.compile(r"^(config\.json|best|\.x\.tmp-\d+)$")


def _folder(tmp_path) -> OwnedFolder:
    out = tmp_path / "out"
    (out / "best").mkdir(parents=True)
    (out / "best" / "w.bin").write_bytes(b"w")
    write_json_atomic(out / "config.json", {"a": 1})
    (out / LOCK_FILE).write_text("123\n")
    return OwnedFolder(out, lambda n: bool(OURS.match(n)))


def test_names_leave_the_lock_out_and_foreign_names_are_told(tmp_path):
    folder = _folder(tmp_path)
    (folder.path / "notes.txt").write_text("mine")
    assert folder.names() == ["best", "config.json", "notes.txt"]
    assert folder.foreign(folder.names()) == ["notes.txt"]
    assert OwnedFolder(tmp_path / "missing", OURS.match).names() == []


def test_remove_takes_only_its_own_and_keeps_the_folder_and_lock(tmp_path):
    folder = _folder(tmp_path)
    (folder.path / "notes.txt").write_text("mine")
    with pytest.raises(AssertionError, match="foreign"):
        folder.remove(folder.names())
    assert (folder.path / "notes.txt").exists() and (folder.path / "best" / "w.bin").exists()  # nothing removed
    folder.remove(["best", "config.json"])
    assert sorted(p.name for p in folder.path.iterdir()) == [LOCK_FILE, "notes.txt"]


def test_a_link_is_removed_never_its_target(tmp_path):
    target_dir, target_file = tmp_path / "elsewhere", tmp_path / "important.txt"
    target_dir.mkdir()
    (target_dir / "keep.txt").write_text("keep")
    target_file.write_text("keep")
    folder = _folder(tmp_path)
    remove_member(folder.path / "best")
    (folder.path / "best").symlink_to(target_dir, target_is_directory=True)
    (folder.path / "config.json").unlink()
    (folder.path / "config.json").symlink_to(target_file)
    folder.remove(["best", "config.json"])
    assert not (folder.path / "best").is_symlink() and not (folder.path / "config.json").is_symlink()
    assert (target_dir / "keep.txt").read_text() == "keep" and target_file.read_text() == "keep"


def test_write_json_atomic_leaves_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").read_text() == '{\n  "b": [\n    1,\n    2\n  ]\n}\n'
