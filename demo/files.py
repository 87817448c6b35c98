"""Hashing and crash-safe writes: every output is written under a ``.partial-*`` name and renamed
into place, so a crash never leaves something that looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable


def log(msg: str) -> None:
    print(f"[assets] {msg}", flush=True)


def sha256_file(path: Path, _cache: dict | None = None) -> str:
    """sha256 of a file; ``_cache`` (keyed on path, size and mtime) avoids hashing twice."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _cache is not None and key in _cache:
        return _cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if _cache is not None:
        _cache[key] = digest
    return digest


def stable_int(*parts: object) -> int:
    """A 64-bit integer from sha256 of the parts: stable across processes and machines."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big")


def files_match(root: Path, files: dict[str, str], cache: dict | None = None) -> bool:
    """Every file (path relative to ``root`` -> sha256) is present with its recorded sha256."""
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file() or sha256_file(p, cache) != digest:
            return False
    return True


def tree_files(folder: Path, root: Path, cache: dict) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden names skipped), keyed relative to ``root``."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p, cache)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def partial_name(path: Path) -> Path:
    return path.with_name(f".partial-{os.getpid()}-{path.name}")


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    write_text_atomic(
        path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished directory into place (replacing an old one)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".partial-{os.getpid()}-old-{dest.name}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_partials(*dirs: Path) -> None:
    """Remove leftovers of a crashed run (our ``.partial-*`` names only)."""
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.glob(".partial-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(out: Path):
    """An exclusive lock on ``out/.lock`` so two builds never interleave in one folder."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
