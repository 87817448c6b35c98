"""What a run reads: the training rows (a cache, or raw documents for the online teacher), replay rows and the
evaluation sets, each opened and checked against the others."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mft_cache.models import check_seq_len, load_config
from mft_cache.rows import RowSpec, build_rows, resolve_spec, spec_for
from mft_cache.storage import Manifest, open_cache
from mft_cache.storage.hub import download_cache, is_hub_ref

from .checks import cache_row_spec, check_data, check_replay_cache
from .config import TrainConfig
from .data import Rows
from .targets import check_top_k

DEFAULT_SEQ_LEN = 256


@dataclass
class TrainingData:
    """What a run trains on: its rows (a cache's, or None until the online teacher's are packed), the cache's
    manifest, the student to load, the row length and how the rows were made."""

    rows: Rows | None  # None with the online teacher: packed once the student's tokenizer is loaded
    manifest: Manifest | None  # the cache's, or None with the online teacher
    model_id: str  # the student to load
    seq_len: int
    spec: RowSpec | None = None  # how the training rows were made (format, what is trained, packing)


def online_spec(cfg: TrainConfig, seq_len: int) -> RowSpec:
    """How the online teacher's --data becomes rows: its format (forced, or from its first row), --train-on, --packing,
    --long-rows."""
    return spec_for(cfg.data, seq_len, data_format=cfg.data_format, train_on=cfg.train_on, packing=cfg.packing,
                    text_field=cfg.text_field, what="--data", prompt_field=cfg.prompt_field,
                    completion_field=cfg.completion_field, long_rows=cfg.long_rows)


def open_training_rows(cfg: TrainConfig) -> TrainingData:
    if cfg.teacher == "online":
        seq_len = cfg.seq_len or DEFAULT_SEQ_LEN
        # the model's config alone (no weights): rows longer than it allows are refused as `mft cache` refuses them
        check_seq_len(load_config(cfg.model, cfg.trust_remote_code), seq_len,
                      "--seq-len" if cfg.seq_len else "--seq-len (default with --teacher online)")
        return TrainingData(None, None, cfg.model, seq_len, online_spec(cfg, seq_len))
    # validated; shards checksummed on first read (all of them at once after a download from the Hub)
    cache = open_cache(download_cache(cfg.cache) if is_hub_ref(cfg.cache) else cfg.cache)
    m = cache.manifest
    model_id = cfg.model or (m.model.path if m.model.path and Path(m.model.path).is_dir() else m.model.id)
    if cfg.seq_len and cfg.seq_len != cache.seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} differs from the cache's {cache.seq_len}; leave it unset with a cache")
    check_top_k(cfg.top_k, cache.top_k, f"--cache {cfg.cache}")
    spec = cache_row_spec(m, cfg)  # the cache's rows decide; a flag that says otherwise is refused
    if cfg.data:
        check_data(m, cfg.data, cfg.text_field, cfg.cache)
    return TrainingData(Rows(cache).first(cfg.train_rows, f"--cache {cfg.cache}"), m, model_id, cache.seq_len, spec)


def _rows(cfg: TrainConfig, source: str, tokenizer, seq_len: int, what: str, spec_of=None):
    """Rows of a raw source (mft_cache.rows.build_rows): plain text concatenated, chat and
    prompt-completion rows rendered and packed as `spec_of(format)` says."""
    return build_rows(source, tokenizer, seq_len, text_field=cfg.text_field, what=what,
                      data_format=cfg.data_format if what == "--data" else "auto", prompt_field=cfg.prompt_field,
                      completion_field=cfg.completion_field, train_on=cfg.train_on, packing=cfg.packing,
                      long_rows=cfg.long_rows, spec_of=spec_of)[0]


def online_rows(cfg: TrainConfig, tokenizer, seq_len: int) -> Rows:
    spec = online_spec(cfg, seq_len)
    return Rows(_rows(cfg, cfg.data, tokenizer, seq_len, "--data", lambda fmt: spec)).first(
        cfg.train_rows, f"--data {cfg.data} (packed into rows of {seq_len} tokens)")


def follow(run: RowSpec | None, cfg: TrainConfig, seq_len: int):
    """format -> RowSpec for another source of the run (evaluation sets, raw replay documents): chat and
    prompt-completion rows are trained (and evaluated) on what the run trains on (--train-on, else the run's rows'
    choice where they are not text), packed as the run's rows where the formats agree, else as resolve_spec says; a
    document longer than a row as --long-rows says."""
    def spec_of(fmt: str) -> RowSpec:
        train_on = cfg.train_on
        if train_on == "auto" and run is not None and run.format != "text":
            train_on = run.train_on
        packing = cfg.packing
        if packing == "auto" and run is not None and run.format == fmt:
            packing = run.packing
        return resolve_spec(fmt, train_on, packing, seq_len, cfg.long_rows)

    return spec_of


def open_replay(cfg: TrainConfig, manifest: dict | None, tokenizer, seq_len: int):
    """--replay: a cache of general-domain rows made by the same teacher (a folder, or hf://OWNER/NAME[@REVISION]
    on the Hub), or raw documents (ft, online)."""
    source = download_cache(cfg.replay, "--replay") if is_hub_ref(cfg.replay) else Path(cfg.replay)
    if (source / "manifest.json").exists():
        replay = open_cache(source)
        if manifest is not None:
            check_replay_cache(manifest, replay.manifest, cfg.replay, cfg.cache)
            check_top_k(cfg.top_k or manifest.top_k, replay.top_k, f"--replay {cfg.replay} (pass --top-k "
                        f"{replay.top_k} or rebuild it)")
        elif replay.seq_len != seq_len:
            raise ValueError(f"--replay {cfg.replay}: seq len {replay.seq_len}, not {seq_len}")
        return Rows(replay)
    if cfg.teacher == "cache" and cfg.objective != "ft":
        raise ValueError(f"--replay {cfg.replay}: with --objective {cfg.objective}, replay rows need the teacher's "
                         f"targets too; cache them first (`mft cache --data {cfg.replay} --out REPLAY_CACHE "
                         f"--seq-len {seq_len}` with the same teacher) and pass --replay REPLAY_CACHE")
    return Rows(_rows(cfg, cfg.replay, tokenizer, seq_len, "--replay", follow(None, cfg, seq_len)))


def open_eval_sets(cfg: TrainConfig, tokenizer, seq_len: int, spec: RowSpec | None = None) -> dict[str, Rows]:
    """The specialized and general evaluation sets that are given, packed like the training rows (`spec`: how
    those were made; chat and prompt-completion sets are evaluated on the positions such rows train)."""
    sets = {}
    for name, path in (("specialized", cfg.eval_specialized), ("general", cfg.eval_general)):
        if path:
            packed = _rows(cfg, path, tokenizer, seq_len, f"--eval-{name}", follow(spec, cfg, seq_len))
            packed.truncate(cfg.eval_max_sequences or packed.num_sequences)
            if packed.num_predictions == 0:  # its perplexity would be exp(0 / 0): no number, not 1
                raise ValueError(f"--eval-{name} {path}: its rows hold no position to evaluate (no trained next-token "
                                 "label), so it has no perplexity; give documents (or completions) of at least 2 "
                                 "tokens, or leave the flag out")
            sets[name] = Rows(packed)
    return sets
