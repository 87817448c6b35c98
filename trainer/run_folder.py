"""The run folder `--out`: deciding whether to start, resume or refuse, and the files a run writes into it
(config.json, metrics.jsonl, summary.json, best/, final/, checkpoints/)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from mft_cache.storage.manifest import write_json_atomic

from .checkpoint import latest_checkpoint
from .config import TrainConfig

log = logging.getLogger(__name__)

FINISHED = "finished"
_IGNORED_ON_RESUME = ("resume", "overwrite", "log_every")


def prepare_run_folder(out: Path, resolved: dict, cfg: TrainConfig) -> Path | str | None:
    """Check --out; return the checkpoint to resume from, None (a fresh start), or FINISHED."""
    config_path = out / "config.json"
    if not (out.exists() and any(out.iterdir())):
        return None
    if not config_path.exists():
        raise ValueError(f"--out {out} holds files that are not an mft run; choose an empty or new folder")
    if cfg.overwrite:
        shutil.rmtree(out)
        return None
    if not cfg.resume:
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    old = json.loads(config_path.read_text())
    keys = [k for k in set(old) | set(resolved) if k not in _IGNORED_ON_RESUME and old.get(k) != resolved.get(k)]
    if keys:
        raise ValueError(f"--resume: the run in {out} was started with another configuration (differs in {sorted(keys)})")
    if (out / "summary.json").exists():
        return FINISHED
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        log.info("--resume: no complete checkpoint in %s; starting from step 0", out)
    return ckpt


def start_run_files(out: Path, resolved: dict, fresh: bool) -> None:
    """config.json; on a fresh start, forget what an interrupted run wrote (metrics, best/, final/, summary)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", resolved)
    (out / "metrics.jsonl").touch()
    if fresh:
        (out / "metrics.jsonl").write_text("")
        for stale in ("best", "final", "summary.json"):
            path = out / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class Metrics:
    """metrics.jsonl, appended a line per record and flushed; only the first process writes."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a") if enabled else None

    def emit(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def tell(self) -> int:
        return self.file.tell() if self.file else 0

    def close(self) -> None:
        if self.file:
            self.file.close()
