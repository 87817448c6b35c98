"""Rows of BOS-sensitive models (tokenizers that add a BOS, as Llama's and Gemma's do) start with BOS everywhere:
in the cache, in the online teacher's batches and in the evaluation sets; no position is trained to predict it."""
from __future__ import annotations

import json
import logging

import numpy as np

from conftest import make_texts, unpack_stream, write_jsonl
from helpers import cache_args
from mft_cache.cli import main
from mft_cache.models import load_tokenizer
from mft_cache.pipeline.inspect import cache_stats
from mft_cache.rows import build_sequences
from mft_cache.storage import open_cache
from mft_cache.storage.manifest import MANIFEST, manifest_digest


def _cache(model, data, out, *extra):
    assert main(cache_args(model, data, out, *extra, seq_len=24, top_k=4)) == 0
    return open_cache(out)


def test_every_cache_row_starts_with_bos_and_bos_labels_are_not_cached(llama, docs_jsonl, tmp_path):
    tok = load_tokenizer(str(llama))
    cache = _cache(llama, docs_jsonl, tmp_path / "c")
    rows = cache.read_rows(0, len(cache))
    assert (rows["input_ids"][:, 0] == tok.bos_token_id).all()
    packed, _ = build_sequences(docs_jsonl, tok, seq_len=24)
    np.testing.assert_array_equal(rows["input_ids"], packed.input_ids)
    stream = np.concatenate([np.array(d) for d in
                             [tok(t)["input_ids"] + [tok.eos_token_id] for t in make_texts(24, seed=1)]])
    np.testing.assert_array_equal(unpack_stream(packed), stream)  # the rows minus the inserted BOS: the stream
    labels = rows["input_ids"][:, 1:]
    bos_label = labels == tok.bos_token_id  # positions after an EOS, where the next document begins
    assert bos_label.any()
    assert (rows["label_logprob"][bos_label] == 0).all() and (rows["topk_ids"][bos_label] == 0).all()
    real = np.arange(23)[None, :] < (rows["length"][:, None] - 1)
    assert cache.manifest.num_tokens == int((real & ~bos_label).sum())
    assert cache.manifest.packing.rule == "bos-per-row"
    stats = cache_stats(tmp_path / "c")
    assert stats["bos_row_share"] == 1.0 and stats["packing"] == "bos-per-row"


def test_a_tokenizer_without_bos_packs_plain_slices(gpt2, docs_jsonl, tmp_path):
    cache = _cache(gpt2, docs_jsonl, tmp_path / "c")
    packing = cache.manifest.to_json()["packing"]
    assert packing == {**packing, "rule": "concat", "bos_token_id": None}
    packed, _ = build_sequences(docs_jsonl, load_tokenizer(str(gpt2)), seq_len=24)
    stream = unpack_stream(packed)
    np.testing.assert_array_equal(cache.read_rows(0, len(cache))["input_ids"].reshape(-1)[: len(stream)], stream)
    assert cache_stats(tmp_path / "c")["bos_row_share"] == 0.0  # it has a BOS token but does not add it


def test_online_batches_and_evaluation_rows_start_with_bos(llama, docs_jsonl, tmp_path, monkeypatch):
    from mft_cache.trainer import loss_module as student

    seen = []
    forward = student.StudentLoss.forward

    def spy(self, input_ids, length, label_mask, **kw):
        seen.append((input_ids.clone(), length.clone(), label_mask.clone()))
        return forward(self, input_ids, length, label_mask, **kw)

    monkeypatch.setattr(student.StudentLoss, "forward", spy)
    bos = load_tokenizer(str(llama)).bos_token_id
    evals = write_jsonl(tmp_path / "val.jsonl", make_texts(6, seed=5))
    assert main(["train", "--teacher", "online", "--model", str(llama), "--data", str(docs_jsonl), "--seq-len", "24",
                 "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--eval-every", "1",
                 "--eval-specialized", str(evals), "--eval-general", str(evals)]) == 0
    assert len(seen) >= 2 + 3 * 2
    for ids, length, mask in seen:
        live = length > 1
        assert (ids[live, 0] == bos).all()
        assert not (mask & (ids[:, 1:] == bos)).any()  # never trained or scored on predicting the BOS


def test_training_a_bos_model_from_an_old_style_cache_warns(llama, tmp_path, caplog):
    # one long document: no label is a BOS, so dropping `packing` (rule concat: every position trained) leaves a
    # cache whose values are consistent, as a cache made before the rule was (the reader checks them)
    one = write_jsonl(tmp_path / "one.jsonl", [" ".join(make_texts(24, seed=1))])
    _cache(llama, one, tmp_path / "c")
    path = tmp_path / "c" / MANIFEST
    m = json.loads(path.read_text())
    del m["packing"]  # what a cache made before the rule holds
    m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))
    caplog.set_level(logging.WARNING)
    assert main(["train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--batch-size", "2"]) == 0
    assert "made before rows started with BOS" in caplog.text
