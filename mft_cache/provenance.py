"""Where a checkpoint came from: `mft_checkpoint.json`, written by `mft train` into best/ and final/, and read back
when that folder is used as a model again (the teacher of `mft cache`, the student of `mft train`).

This is how a reference checkpoint travels: a model lightly finetuned on general text (`mft train --best-by
general`), then used as the teacher and the student's start of a specialization run. The cache's manifest records
the record under `model.trained_from` and the run's model card states it, so every number measured from that cache
says which model it started from and how that model was made.

The file is untrusted when read (anyone can edit a model folder): only the keys below are kept, each of its type
and bounded; anything else in the file is ignored, and a file that is not a small JSON object is ignored with a
warning (it describes the model; it decides nothing).
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from .files import read_json_object

log = logging.getLogger(__name__)

FILE = "mft_checkpoint.json"
FORMAT = 1
MAX_BYTES = 64 * 1024
MAX_TEXT = 200  # characters of any string kept
TEXT = ("objective", "checkpoint", "best_by", "base_model", "data_source", "data_fingerprint", "eval_specialized",
         "eval_general", "mft_cache_version")
NUMBERS = ("tau", "lr", "ppl_specialized", "ppl_general", "base_ppl_specialized", "base_ppl_general")
COUNTS = ("step", "steps", "tokens")
CHECKPOINTS = ("best", "final")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clean(record) -> dict | None:
    """The kept part of a provenance record: its known keys of the right types (strings cut to MAX_TEXT, finite
    numbers, non-negative integers); None if it is not an object of this format."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None
    out: dict = {"format": FORMAT}
    for k in TEXT:
        v = record.get(k)
        if isinstance(v, str):
            out[k] = v[:MAX_TEXT]
    for k in NUMBERS:
        v = record.get(k)
        if type(v) in (int, float) and math.isfinite(v):
            out[k] = float(v)
    for k in COUNTS:
        v = record.get(k)
        if type(v) is int and 0 <= v < 2**53:
            out[k] = v
    return out


def read_provenance(model_id: str | None) -> dict | None:
    """The cleaned record of a local model folder written by `mft train`, or None (a Hub id, a folder without the
    file, or a file that is not a small JSON object of this format, which is logged)."""
    if not model_id:
        return None
    path = Path(model_id).expanduser() / FILE
    if not path.parent.is_dir() or not (path.exists() or path.is_symlink()):
        return None
    record = clean(read_json_object(path, MAX_BYTES))
    if record is None:
        log.warning("%s: not a provenance record of this mft-cache (a JSON object of format %d, at most %d bytes); "
                    "ignored", path, FORMAT, MAX_BYTES)
    return record


def describe(record: dict | None) -> str | None:
    """One line for a log or a model card: what the starting model was trained on and which checkpoint it is."""
    if not record:
        return None
    what = record.get("objective", "?")
    parts = [f"a {record.get('checkpoint', 'saved')}/ checkpoint of {record.get('base_model', '?')} trained by "
             f"mft-cache ({what}"]
    if record.get("steps") is not None:
        parts.append(f", {record['steps']} steps")
    if record.get("lr") is not None:
        parts.append(f" at lr {record['lr']:g}")
    if record.get("data_source"):
        parts.append(f" on {record['data_source']}")
    parts.append(")")
    if record.get("step") is not None:
        parts.append(f", taken at step {record['step']}")
        if record.get("checkpoint") == "best" and record.get("best_by"):
            parts.append(f" (least {record['best_by']} validation perplexity")
            key = f"ppl_{record['best_by']}"
            if record.get(key) is not None and record.get(f"base_{key}") is not None:
                parts.append(f": {record[f'base_{key}']:.3f} -> {record[key]:.3f}")
            parts.append(")")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], "".join(parts))  # one line, whatever the file held
