"""Before the first step: is this student, this data and this replay cache what the cache was made for?"""
from __future__ import annotations

import logging

import torch.nn as nn

from mft_cache.attention import check_packed_attention
from mft_cache.models import tokenizer_fingerprint, vocab_size_of, weights_fingerprint
from mft_cache.rows.chat import template_fingerprint
from mft_cache.rows.documents import data_fingerprint
from mft_cache.rows.packing import bos_rule
from mft_cache.rows.spec import RowSpec
from mft_cache.storage import Manifest

log = logging.getLogger(__name__)


def check_student(manifest: Manifest, tokenizer, model: nn.Module, model_id: str) -> None:
    """Refuse a student whose tokenizer or vocabulary differs from the cache's teacher; warn when a BOS-adding
    student trains from a cache whose rows were cut before rows started with BOS."""
    cached_vocab, vocab = manifest.vocab_size, vocab_size_of(model)
    if vocab != cached_vocab:
        raise ValueError(f"--model {model_id} predicts a vocabulary of {vocab} tokens but the cache was made with "
                         f"{cached_vocab} ({manifest.model.id}); use a student with the teacher's vocabulary")
    if tokenizer_fingerprint(tokenizer) != manifest.tokenizer.fingerprint:
        raise ValueError(f"--model {model_id}: its tokenizer differs from the one the cache was made with "
                         f"({manifest.model.id}); the cached targets would name the wrong tokens")
    data = manifest.data
    if data.format != "text" and template_fingerprint(tokenizer) != data.chat_template_fingerprint:
        raise ValueError(f"--model {model_id}: its tokenizer's chat template differs from the one that rendered the "
                         f"cache's {data.format} rows ({manifest.model.id}); the student would see other tokens "
                         "than the cached targets name. Use a student with the same chat template, or rebuild the cache")
    if manifest.rule == "document":
        check_packed_attention(model)  # its documents must not see each other, as the teacher's did not
    if manifest.packing is None and bos_rule(tokenizer) is not None:
        log.warning("the cache was made before rows started with BOS: the tokenizer of %s adds a BOS, but most of the "
                    "cache's rows start without one, so the teacher's targets and the training rows are degraded; "
                    "rebuild the cache (mft cache --overwrite) with this version", model_id)


def check_teacher_revision(manifest: Manifest, model_id: str, allow_different: bool) -> None:
    """The student is the cache's teacher unless --allow-different-student says otherwise (same tokenizer and
    vocabulary are checked once the student is loaded). The weight files are compared, so another revision of the
    same model, or a teacher folder changed since caching, is caught."""
    cached = manifest.model.weights_fingerprint
    current = weights_fingerprint(model_id)
    if cached is None or current is None:
        log.warning("cannot compare the weights of %s with the cache's teacher %s (no local weight files)",
                    model_id, manifest.model.id)
        return
    if current == cached:
        return
    if not allow_different:
        raise ValueError(f"--model {model_id}: its weights differ from those of the teacher the cache was made with "
                         f"({manifest.model.id}, weights sha256 {cached[:12]}); another revision or another model. "
                         "Rebuild the cache with this model, or pass --allow-different-student to train it against "
                         "the cached teacher's targets")
    log.warning("--allow-different-student: the student %s is not the cache's teacher %s; it is trained against the "
                "teacher's cached targets (same tokenizer and vocabulary)", model_id, manifest.model.id)


def check_cache_unchanged(manifest: Manifest, cache: str, recorded: str, allow_changed: bool) -> None:
    """Reproducing a run: the cache must be the one that run trained on (`recorded`, its config.json's
    cache_manifest_sha256), compared by content (the manifest's sha256, which covers every shard's sha256), unless
    --allow-changed-cache."""
    now = manifest.manifest_sha256
    if now == recorded:
        return
    if not allow_changed:
        raise ValueError(f"--cache {cache}: its manifest sha256 is {now}, but the run being reproduced (--config) "
                         f"trained on a cache with manifest sha256 {recorded}: the cache was rebuilt or replaced "
                         "since. Point --cache at the cache that run used, or pass --allow-changed-cache to train on "
                         "this one")
    log.warning("--allow-changed-cache: the cache %s (manifest sha256 %s) is not the one the run being reproduced "
                "trained on (%s); the results may differ from that run's", cache, now, recorded)


def cache_row_spec(manifest: Manifest, cfg) -> RowSpec:
    """How the cache's rows were made (its data format, what is trained, its packing); --data-format, --train-on and
    --packing, where given, must agree: a student run that would render or mask otherwise is refused."""
    spec = RowSpec(manifest.data.format, manifest.data.train_on,
                   "document" if manifest.rule == "document" else "concat", manifest.seq_len)
    for flag, given, cached in (("--data-format", cfg.data_format, spec.format), ("--train-on", cfg.train_on, spec.train_on),
                                ("--packing", cfg.packing, spec.packing)):
        if given != "auto" and given != cached:
            raise ValueError(f"{flag} {given}: the cache {cfg.cache} holds rows made with {flag} {cached}; leave it "
                             f"unset to follow the cache, or rebuild the cache with {flag} {given}")
    return spec


def check_data(manifest: Manifest, data: str, text_field: str, cache: str) -> None:
    """--data with a cache only names what the user believes the cache holds: it must be those documents."""
    d = manifest.data
    fp = data_fingerprint(data, text_field, d.split, data_format=d.format,  # streamed, not held
                          prompt_field=d.prompt_field, completion_field=d.completion_field)
    if fp != d.fingerprint:
        raise ValueError(f"--data {data} is not the data the cache {cache} was made from "
                         f"({d.source}); rebuild the cache with `mft cache --data {data}`")


def check_replay_cache(manifest: Manifest, replay: Manifest, where: str, cache: str) -> None:
    """A replay cache must come from the same teacher, tokenizer and seq len as the main cache."""
    for what, a, b in (("tokenizer", manifest.tokenizer.fingerprint, replay.tokenizer.fingerprint),
                       ("vocabulary", manifest.vocab_size, replay.vocab_size),
                       ("teacher weights", manifest.model.weights_fingerprint, replay.model.weights_fingerprint),
                       ("seq len", manifest.seq_len, replay.seq_len)):
        if a != b:
            raise ValueError(f"--replay {where}: made with another {what} than --cache {cache} "
                             f"({b} vs {a}); build the replay cache with the same teacher and --seq-len")
