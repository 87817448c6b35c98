"""Owned folders: a command lists, refuses and removes only the names it writes; a link is removed itself, never
what it points at; the folder and its lock stay. The library writes files only through mft_cache.files (a scan of
its source)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

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


# -- every write of the library goes through mft_cache.files ----------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("mft_cache", "trainer", "pipeline", "storage", "rows")  # bench/ and demo/ are not the library
# files that write other than through mft_cache.files, and the calls each may make
WRITES_ALLOWED = {
    # these write only names the writer itself has just created (a temporary name, renamed into place) in a folder
    # it holds the lock of
    "storage/writer.py": {"os.replace"},  # a shard's temporary name renamed into place
    "storage/backends.py": {"open_group", "write_table"},  # zarr and arrow shards, at the writer's temporary path
    "trainer/checkpoint.py": {"os.replace"},  # step-N/ and best/, final/ renamed from their .tmp names
    "mft_cache/testing.py": {"write_text", "shutil.rmtree", "os.replace"},  # tests' models and data, where they say
}
_WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"}
_WRITERS = {"tofile", "write_text", "write_bytes", "touch", "savefig", "symlink_to", "hardlink_to", "write_table",
            "to_parquet", "ParquetWriter"}
_MODULE_WRITERS = {("os", "replace"), ("os", "rename"), ("os", "link"), ("os", "symlink"), ("os", "truncate"),
                   ("np", "save"), ("np", "savez"), ("np", "savetxt"), ("numpy", "save"), ("torch", "save")}


def _text(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _writes(mode: str | None) -> bool:
    return mode is None or bool(set(mode) & set("wax+"))  # a mode that is not a literal may write


def _name(node) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def writes_in(source: str):
    """(line, call) of each call in `source` that writes a file: open() and its kin with a mode that writes (or one
    that is not a literal), os.open with a flag that writes, shutil.*, os.replace/rename, Path.write_text and the
    like, savefig/np.save/torch.save (but into an io.BytesIO or StringIO)."""
    tree = ast.parse(source)
    memory = set()  # names bound to an in-memory file
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                _name(node.value.func) in ("BytesIO", "StringIO"):
            memory |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        if isinstance(node, ast.withitem) and isinstance(node.context_expr, ast.Call) and \
                _name(node.context_expr.func) in ("BytesIO", "StringIO") and isinstance(node.optional_vars, ast.Name):
            memory.add(node.optional_vars.id)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f, kw = node.func, {k.arg: k.value for k in node.keywords}
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        in_memory = bool(node.args) and isinstance(node.args[0], ast.Name) and node.args[0].id in memory
        call = _name(f) or ""
        if isinstance(f, ast.Name) and call == "open":
            if _writes(_text(kw.get("mode", node.args[1] if len(node.args) > 1 else ast.Constant("r")))):
                yield node.lineno, "open"
        elif owner == "os" and call == "open":
            flags = node.args[1] if len(node.args) > 1 else kw.get("flags")
            if flags is None or any(_name(n) in _WRITE_FLAGS for n in ast.walk(flags)):
                yield node.lineno, "os.open"
        elif isinstance(f, ast.Attribute) and (call.startswith("open") or call == "fdopen"):
            modes = node.args[1:2] if call == "fdopen" else \
                [a for a in node.args if re.fullmatch(r"[rwxabt+]+", _text(a) or "")][:1]
            if _writes(_text(kw.get("mode", modes[0] if modes else ast.Constant("r")))):
                yield node.lineno, call
        elif owner == "shutil":
            yield node.lineno, f"shutil.{call}"
        elif (owner, call) in _MODULE_WRITERS:
            if not in_memory:
                yield node.lineno, f"{owner}.{call}"
        elif call in _WRITERS and not in_memory:
            yield node.lineno, call


def test_the_scan_finds_every_kind_of_write():
    source = """
import io, os, shutil
open(p, "w"); open(p, mode="ab"); open(p, m); open(p); open(p, "rb")
p.open("a"); p.open(); os.fdopen(fd, "wb"); os.fdopen(fd, "rb"); zarr.open_group(store=s, mode="w")
os.open(p, os.O_RDONLY | os.O_NONBLOCK); os.open(p, os.O_WRONLY | os.O_CREAT)
shutil.rmtree(p); shutil.copy(a, b); os.replace(a, b); p.write_text("x"); p.write_bytes(b""); a.tofile(p)
p.touch(); fig.savefig(p); np.save(p, a); torch.save(m, p)
buf = io.BytesIO()
fig.savefig(buf); np.save(buf, a)
"""
    found = [call for _, call in writes_in(source)]
    assert found == ["open", "open", "open", "open", "fdopen", "open_group", "os.open", "shutil.rmtree",
                     "shutil.copy", "os.replace", "write_text", "write_bytes", "tofile", "touch", "savefig", "np.save",
                     "torch.save"], found


def test_the_library_writes_files_only_through_mft_cache_files():
    """A file of the library that opens a file to write, or copies, moves or removes one, other than through
    mft_cache/files.py (which opens without following links, regular files only) is listed, with its line."""
    found = []
    for folder in LIBRARY:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "mft_cache/files.py":
                continue
            allowed = WRITES_ALLOWED.get(rel, set())
            found += [f"{rel}:{line}: {call}" for line, call in writes_in(path.read_text()) if call not in allowed]
    assert not found, ("write these through mft_cache.files (open_owned, write_bytes_atomic, write_text_atomic, "
                       f"write_json_atomic, remove_member): {found}")
