"""Inputs of stage one: every data format, the shared packing, and what `mft inspect` reports. (Bad input and the
errors it gets: test_attack_flags.py, test_attack_documents.py, test_attack_out_folders.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_texts, unpack_stream, write_jsonl
from mft_cache.cli import main
from mft_cache.models import load_tokenizer
from mft_cache.rows import build_sequences, pack, read_documents
from mft_cache.storage import open_cache

TEXTS = make_texts(6, seed=7)


def test_every_format_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    write_jsonl(tmp_path / "d.jsonl", TEXTS)
    (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    pq.write_table(pa.table({"text": TEXTS, "other": list(range(6))}), tmp_path / "d.parquet")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(enumerate(TEXTS))
    txt = tmp_path / "txt"
    for i, t in enumerate(TEXTS):  # a folder of .txt files, one document each, in sorted order (nested too)
        (txt / ("b" if i >= 3 else "a")).mkdir(parents=True, exist_ok=True)
        (txt / ("b" if i >= 3 else "a") / f"{i:02d}.txt").write_text(t)
    Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    for source in ("d.jsonl", "d.json", "d.parquet", "d.csv", "txt", "saved"):
        docs = read_documents(tmp_path / source)
        assert docs.texts == TEXTS, source
        assert docs.fingerprint == read_documents(tmp_path / "d.jsonl").fingerprint


def test_text_field_and_empty_documents(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["", "  ", *TEXTS], field="body")
    docs = read_documents(tmp_path / "d.jsonl", text_field="body")
    assert docs.texts == TEXTS and docs.num_empty == 2


def test_packing_records_boundaries_and_uses_bos_eos(llama, gpt2, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", TEXTS)
    for model in (llama, gpt2):
        tok = load_tokenizer(str(model))
        packed, docs = build_sequences(tmp_path / "d.jsonl", tok, seq_len=32)
        assert packed.bos_id == (tok.bos_token_id if model == llama else None)  # read from what the tokenizer does
        stream = unpack_stream(packed)
        assert len(stream) == packed.doc_offsets[-1]
        for d in range(len(TEXTS)):
            doc = stream[packed.doc_offsets[d]: packed.doc_offsets[d + 1]]
            assert doc[-1] == tok.eos_token_id
            assert (doc[0] == tok.bos_token_id) == (model == llama)  # the Llama-style tokenizer wants BOS
            assert tok.decode(doc, skip_special_tokens=True).strip() == TEXTS[d]
        again, _ = build_sequences(tmp_path / "d.jsonl", tok, seq_len=32)
        np.testing.assert_array_equal(packed.input_ids, again.input_ids)
        assert packed.lengths[:-1].min() == 32 and 0 < packed.lengths[-1] <= 32
        if model == llama:
            assert (packed.input_ids[:, 0] == tok.bos_token_id).all()
        else:  # no BOS: plain slices of the stream, as before the rule
            np.testing.assert_array_equal(packed.input_ids.reshape(-1)[: len(stream)], stream)


def test_bos_rows_lose_and_duplicate_no_token_and_never_predict_bos():
    docs = [[9, 1, 2, 3, 4, 5, 8], [9, 6, 7, 8], [9, 1, 8]]  # BOS 9, EOS 8
    for seq_len in (2, 3, 4, 5, 7, 16):
        p = pack(docs, seq_len, pad_id=0, bos_id=9)
        assert (p.input_ids[:, 0] == 9).all(), seq_len
        np.testing.assert_array_equal(unpack_stream(p), np.concatenate(docs))
        mask = p.label_mask
        labels = p.input_ids[:, 1:]
        assert not (mask & (labels == 9)).any()  # no position is trained to predict BOS
        real = np.arange(seq_len - 1)[None, :] < (p.lengths[:, None] - 1)
        assert (mask == (real & (labels != 9))).all()
    p = pack(docs, 4, pad_id=0, bos_id=9)
    assert p.input_ids.tolist() == [[9, 1, 2, 3], [9, 4, 5, 8], [9, 6, 7, 8], [9, 1, 8, 0]]
    assert p.lengths.tolist() == [4, 4, 4, 3] and p.num_predictions == 3 + 3 + 3 + 2


def test_pack_small_cases():
    p = pack([[1, 2, 3], [4, 5]], seq_len=2, pad_id=0)
    assert p.input_ids.tolist() == [[1, 2], [3, 4], [5, 0]]
    assert p.lengths.tolist() == [2, 2, 1] and p.doc_offsets.tolist() == [0, 3, 5] and p.num_predictions == 2
    with pytest.raises(ValueError, match="--seq-len"):
        pack([[1, 2]], seq_len=1)


def test_stage_two_rebuilds_the_cache_sequences_from_raw_data(llama, docs_jsonl, tmp_path):
    assert main(["cache", "--model", str(llama), "--data", str(docs_jsonl), "--out", str(tmp_path / "c"),
                 "--seq-len", "40", "--top-k", "4"]) == 0
    cache = open_cache(tmp_path / "c")
    packed, _ = build_sequences(docs_jsonl, load_tokenizer(str(llama)), seq_len=40)
    np.testing.assert_array_equal(cache.read_rows(0, len(cache))["input_ids"], packed.input_ids)


def test_inspect_reports_the_required_keys(llama, docs_jsonl, tmp_path, capsys):
    assert main(["cache", "--model", str(llama), "--data", str(docs_jsonl), "--out", str(tmp_path / "c"),
                 "--seq-len", "40", "--top-k", "300", "--logprob-dtype", "float32"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c"), "--json", "--verify"]) == 0
    stats = json.loads(capsys.readouterr().out)
    for key in ("num_sequences", "num_tokens", "bytes_per_token", "top_k", "vocab_size", "top1_accuracy",
                "mean_label_logprob", "mean_tail_mass"):
        assert key in stats
    assert stats["top_k"] == stats["vocab_size"] == 300
    assert stats["mean_tail_mass"] < 1e-4  # k = vocabulary: nothing outside top-k
    assert 0 <= stats["top1_accuracy"] <= 1 and stats["mean_label_logprob"] < 0
    # the text form names the same things
    assert main(["inspect", str(tmp_path / "c")]) == 0
    assert "teacher top-1 accuracy" in capsys.readouterr().out
