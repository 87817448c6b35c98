"""What a run reads: the training rows (a cache, or raw documents for the online teacher), replay rows and the
evaluation sets, each opened and checked against the others."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mft_cache.storage import build_sequences, open_cache
from mft_cache.storage.hub import download_cache, is_hub_ref

from .checks import check_data, check_replay_cache
from .config import TrainConfig
from .data import CacheRows, PackedRows
from .targets import check_top_k

DEFAULT_SEQ_LEN = 256


@dataclass
class TrainingRows:
    rows: CacheRows | None  # None with the online teacher: packed once the student's tokenizer is loaded
    manifest: dict | None  # the cache's, or None with the online teacher
    model_id: str  # the student to load
    seq_len: int


def open_training_rows(cfg: TrainConfig) -> TrainingRows:
    if cfg.teacher == "online":
        return TrainingRows(None, None, cfg.model, cfg.seq_len or DEFAULT_SEQ_LEN)
    # validated; shards checksummed on first read (all of them at once after a download from the Hub)
    cache = open_cache(download_cache(cfg.cache) if is_hub_ref(cfg.cache) else cfg.cache)
    m = cache.manifest
    model_id = cfg.model or (m["model"]["path"] if m["model"].get("path") and Path(m["model"]["path"]).is_dir()
                             else m["model"]["id"])
    if cfg.seq_len and cfg.seq_len != cache.seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} differs from the cache's {cache.seq_len}; leave it unset with a cache")
    check_top_k(cfg.top_k, cache.top_k, f"--cache {cfg.cache}")
    if cfg.data:
        check_data(m, cfg.data, cfg.text_field, cfg.cache)
    return TrainingRows(CacheRows(cache), m, model_id, cache.seq_len)


def online_rows(cfg: TrainConfig, tokenizer, seq_len: int) -> PackedRows:
    return PackedRows(build_sequences(cfg.data, tokenizer, seq_len, cfg.text_field, what="--data")[0])


def open_replay(cfg: TrainConfig, manifest: dict | None, tokenizer, seq_len: int):
    """--replay: a cache of general-domain rows made by the same teacher, or raw documents (ft, online)."""
    source = Path(cfg.replay)
    if (source / "manifest.json").exists():
        replay = open_cache(source)
        if manifest is not None:
            check_replay_cache(manifest, replay.manifest, cfg.replay, cfg.cache)
            check_top_k(cfg.top_k or manifest["top_k"], replay.top_k, f"--replay {cfg.replay} (pass --top-k "
                        f"{replay.top_k} or rebuild it)")
        elif replay.seq_len != seq_len:
            raise ValueError(f"--replay {cfg.replay}: seq len {replay.seq_len}, not {seq_len}")
        return CacheRows(replay)
    if cfg.teacher == "cache" and cfg.objective != "ft":
        raise ValueError(f"--replay {cfg.replay}: with --objective {cfg.objective}, replay rows need the teacher's "
                         f"targets too; cache them first (`mft cache --data {cfg.replay} --out REPLAY_CACHE "
                         f"--seq-len {seq_len}` with the same teacher) and pass --replay REPLAY_CACHE")
    return PackedRows(build_sequences(cfg.replay, tokenizer, seq_len, cfg.text_field, what="--replay")[0])


def open_eval_sets(cfg: TrainConfig, tokenizer, seq_len: int) -> dict[str, PackedRows]:
    """The specialized and general evaluation sets that are given, packed like the training rows."""
    sets = {}
    for name, path in (("specialized", cfg.eval_specialized), ("general", cfg.eval_general)):
        if path:
            packed = build_sequences(path, tokenizer, seq_len, cfg.text_field, what=f"--eval-{name}")[0]
            packed.truncate(cfg.eval_max_sequences or packed.num_sequences)
            sets[name] = PackedRows(packed)
    return sets
