"""The run folder `--out`: deciding whether to start, resume or refuse, and the files a run writes into it
(.mft-run.json, config.json, metrics.jsonl, summary.json, s_dg.png, samples.md, best/, final/, checkpoints/).

A run marks its folder as one when it starts (`.mft-run.json`), and locks it while it runs (`.mft-lock`, see
mft_cache/folder_lock.py). `--overwrite` removes only the files a run writes, and only from a folder the marker
proves is a run: anything else in it, or a folder without the marker, is refused with nothing removed. The folder
itself is never removed: `--out .` or `--out ~` must not cost anyone their files. Every file of the folder is opened
through mft_cache.files (never through a link; regular files only), and a run refuses to start on a folder where a
name it writes holds a link, a FIFO or a device."""
from __future__ import annotations

import json
import logging
import os
import re
import typing
from dataclasses import fields
from pathlib import Path

from mft_cache import __version__
from mft_cache.folder_lock import FolderLock
from mft_cache.files import OwnedFolder, open_owned, owned_stat, read_owned, write_json_atomic

from .checkpoint import STATE_FILE, read_state, usable_checkpoint
from .config import RESOLVED_KEYS, TrainConfig

log = logging.getLogger(__name__)

FINISHED = "finished"
MARKER = ".mft-run.json"
_MARKER_ID = {"tool": "mft-cache", "kind": "train-run"}
# what `mft train` writes into --out (tensorboard: --report-to's event files; best.tmp / final.tmp: save_pretrained; .NAME.tmp-PID: write_json_atomic)
_OURS = re.compile(r"^(config\.json|metrics\.jsonl|summary\.json|s_dg\.png|samples\.md|best|final|checkpoints|best\.tmp"
                   r"|final\.tmp|tensorboard|\.mft-run\.json|\.mft-lock"
                   r"|\.(config\.json|summary\.json|samples\.md|\.mft-run\.json)\.tmp-\d+)$")
_IGNORED_ON_RESUME = ("out", "resume", "overwrite", "log_every", "report_to", "run_name",
                      "push_to_hub", "cpu_allocator", "allow_changed_cache", "samples",
                      "sample_tokens")  # out: `./x` and `x`, or a moved folder, resume
# config.json keys besides TrainConfig's own, and their JSON types
_RESOLVED_TYPES = {"resolved_model": (str,), "num_processes": (int,), "global_batch": (int,),
                   "cache_manifest_sha256": (str, type(None)), "cache_top_k": (int, type(None))}
assert set(_RESOLVED_TYPES) == set(RESOLVED_KEYS)
_JSON_BYTES = 1 << 20  # the most a run's config.json or marker holds to be read (a run writes a few KiB)


def resolve_out(out: str) -> Path:
    """--out as a real path: every comparison and check sees one name for one folder (`.`, `./x`, symlinks)."""
    return Path(os.path.realpath(os.path.expanduser(out)))


def lock_run_folder(out: Path) -> FolderLock:
    """Lock --out for this run (created if missing); a second `mft train` on it is refused naming our pid."""
    return FolderLock.acquire(out, "--out")


def prepare_run_folder(out: Path, resolved: dict, cfg: TrainConfig) -> Path | str | None:
    """Check --out (locked by this process); return the checkpoint to resume from, None (a fresh start), or FINISHED."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    folder = _owned(out)
    names = folder.names()
    if not names:
        return None
    folder.check_kinds([n for n in names if folder.ours(n)])  # a link or a FIFO at a name a run writes: refused
    marker = marker_state(out)
    has_config = "config.json" in names
    if marker == "missing" and not (has_config and _is_run_config(out / "config.json")):
        raise ValueError(f"--out {out} holds files that are not an mft run (e.g. {names[:3]}); nothing was removed; "
                         "choose an empty or new folder")
    if cfg.overwrite:
        clear_run_folder(out, names, marker)
        return None
    if not has_config:  # the marker but no config.json: a run stopped as it started, nothing to keep
        clear_run_folder(out, names, marker)
        return None
    if not cfg.resume:
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    # an option that did not exist when the run started (absent from its config.json) ran with its default
    old = {**{f.name: f.default for f in fields(TrainConfig)}, **read_run_config(out / "config.json")}
    keys = [k for k in set(old) | set(resolved) if k not in _IGNORED_ON_RESUME and old.get(k) != resolved.get(k)]
    if keys:
        raise ValueError(f"--resume: the run in {out} was started with another configuration (differs in {sorted(keys)})")
    if marker == "missing":
        mark_run_folder(out)  # a run folder without a marker (written by an older version) is marked as it resumes
    if (out / "summary.json").exists():
        return FINISHED
    ckpt = usable_checkpoint(out)
    if ckpt is None:
        log.info("--resume: no complete checkpoint in %s; starting from step 0", out)
    else:
        check_metrics_length(out, ckpt)
    return ckpt


def marker_state(out: Path) -> str:
    """"valid" (this tool's marker), "missing", or "invalid" (a file of that name this tool did not write)."""
    try:
        marker = json.loads(read_owned(out, MARKER, _JSON_BYTES))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, RecursionError):  # not a regular file, too big, not UTF-8 or not JSON
        return "invalid"
    ok = isinstance(marker, dict) and all(marker.get(k) == v for k, v in _MARKER_ID.items())
    return "valid" if ok else "invalid"


def mark_run_folder(out: Path) -> None:
    """Write the marker that lets a later --overwrite tell this folder is a run, and only then empty it."""
    write_json_atomic(out / MARKER, {**_MARKER_ID, "version": __version__})


def _is_run_config(path: Path) -> bool:
    try:
        read_run_config(path)
    except ValueError:
        return False
    return True


def clear_run_folder(out: Path, names: list[str], marker: str) -> None:
    """Remove what a run wrote, keeping the folder (and the marker and lock): only from a folder the marker proves
    is a run, and only if nothing else is in it. Otherwise refuse, having removed nothing."""
    folder = _owned(out)
    foreign = folder.foreign(names)
    if foreign:
        raise ValueError(f"--overwrite: --out {out} holds files mft train did not write ({foreign[:5]}"
                         f"{' and more' if len(foreign) > 5 else ''}); nothing was removed. Move them elsewhere, "
                         "or choose another folder")
    if marker == "missing":
        raise ValueError(f"--overwrite: --out {out} holds a run made before run folders were marked ({MARKER} is "
                         "missing), so it cannot be shown to be only a run; nothing was removed. Remove the folder by "
                         "hand if you mean to replace it, or pass --resume to continue it")
    if marker == "invalid":
        raise ValueError(f"--overwrite: {out / MARKER} is not the marker mft train writes; nothing was removed. "
                         "Remove the folder by hand if you mean to replace it, or choose another folder")
    log.info("--overwrite: removing the run in %s", out)
    folder.remove(sorted((n for n in names if n != MARKER), key=lambda n: n == "config.json"))  # config.json last


def _owned(out: Path) -> OwnedFolder:
    return OwnedFolder(out, lambda name: bool(_OURS.match(name)))


def _json_type_ok(value, types: tuple) -> bool:
    """JSON types, strictly: a bool is not an int, an int is a float."""
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def read_run_config(path: Path) -> dict:
    """The run's config.json, refused clearly unless it is an object of known keys with values of their types."""
    try:
        old = json.loads(read_owned(path.parent, path.name, _JSON_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"--resume: {path} is not valid JSON ({e}); restore it, or pass --overwrite to start "
                         "the run again") from None
    if not isinstance(old, dict):
        raise ValueError(f"--resume: {path} does not hold a JSON object; restore it, or pass --overwrite")
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name: (hints[f.name],) for f in fields(TrainConfig)}
    known.update(_RESOLVED_TYPES)
    unknown = sorted(k for k in old if k not in known)
    if unknown:
        raise ValueError(f"--resume: {path} has keys mft train does not write ({unknown[:5]}); restore it, or pass "
                         "--overwrite")
    wrong = sorted(k for k, v in old.items() if not _json_type_ok(v, known[k]))
    if wrong:
        raise ValueError(f"--resume: {path} holds values of the wrong type for {wrong[:5]}; restore it, or pass "
                         "--overwrite")
    return old


def check_metrics_length(out: Path, ckpt: Path) -> None:
    """metrics.jsonl must still hold everything written up to the checkpoint: the run cuts it back to that length,
    and a shorter file (truncated, or removed) would be padded with NUL bytes or silently lose records."""
    state, _ = read_state(ckpt / STATE_FILE)
    path = out / "metrics.jsonl"
    st = owned_stat(out, path.name)  # a link or a FIFO there is refused: the run would truncate what it points at
    size = None if st is None else st.st_size
    if size is None or size < state.metrics_bytes:
        what = "is missing" if size is None else f"holds {size} bytes"
        raise ValueError(f"--resume: {path} {what}, but the checkpoint {ckpt.name} was saved when it held "
                         f"{state.metrics_bytes}: it was truncated or removed since. Restore it, or pass --overwrite "
                         "to start the run again")


def start_run_files(out: Path, resolved: dict, fresh: bool) -> None:
    """The marker, config.json; on a fresh start, forget what an interrupted run wrote (metrics, best/, final/,
    summary, event files)."""
    out.mkdir(parents=True, exist_ok=True)
    mark_run_folder(out)  # first: the folder is a run from here on
    write_json_atomic(out / "config.json", resolved)
    with open_owned(out, "metrics.jsonl", "w" if fresh else "a"):  # created, and emptied on a fresh start
        pass
    if fresh:
        _owned(out).remove(["best", "final", "summary.json", "samples.md", "tensorboard"])


class Metrics:
    """metrics.jsonl, appended a line per record and flushed; only the first process writes."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open_owned(path.parent, path.name, "a") if enabled else None

    def emit(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def tell(self) -> int:
        return self.file.tell() if self.file else 0

    def close(self) -> None:
        if self.file:
            self.file.close()
