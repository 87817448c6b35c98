"""Stage one: the cache equals a brute-force full log_softmax; backends agree; bytes are deterministic;
corruption and unknown versions are caught."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mft_cache.pipeline.cache import CacheConfig, build_cache
from conftest import unpack_stream
from helpers import snapshot
from mft_cache.models import load_tokenizer
from mft_cache.rows import build_sequences
from mft_cache.storage import CorruptShardError, ManifestError, open_cache
from mft_cache.storage.manifest import manifest_digest

# fp16 storage: round-to-nearest keeps the relative error of a stored log-prob within 2**-11 (4.9e-4),
# so a stored value lp16 satisfies |lp16 - lp| <= 4.9e-4 * |lp| (+ 1e-6 for values near 0).
FP16_RTOL, FP16_ATOL = 2.0**-11, 1e-6


def build(model: Path, data: Path, out: Path, **kw) -> dict:
    cfg = dict(model=str(model), data=str(data), out=str(out), seq_len=48, top_k=8, batch_size=3, shard_mb=0.02)
    cfg.update(kw)
    return build_cache(CacheConfig(**cfg)).to_json()  # the manifest as written


def brute_force(model_dir: Path, input_ids: np.ndarray, length: int) -> torch.Tensor:
    """Full-vocabulary log_softmax of the model's own logits for the real tokens of one row: (length-1, V)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(input_ids[None, :length], dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.float(), -1)[:-1]  # position t predicts t+1


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma_big"])
@pytest.mark.parametrize("logprob_dtype", ["float32", "float16"])
def test_cache_equals_brute_force_log_softmax(kind, logprob_dtype, request, docs_jsonl, tmp_path):
    model_dir = request.getfixturevalue(kind)
    manifest = build(model_dir, docs_jsonl, tmp_path / "c", logprob_dtype=logprob_dtype, top_k=5)
    cache = open_cache(tmp_path / "c", verify="full")
    assert manifest["vocab_size"] == (70_000 if kind == "gemma_big" else 300)
    expected_id_dtype = "uint32" if kind == "gemma_big" else "uint16"
    assert {f["name"]: f["dtype"] for f in manifest["schema"]}["topk_ids"] == expected_id_dtype
    rtol, atol = (1e-5, 1e-5) if logprob_dtype == "float32" else (FP16_RTOL, FP16_ATOL + 1e-5)
    checked = 0
    for row in (0, len(cache) // 2, len(cache) - 1):  # the last row is padded
        r = cache[row]
        n = int(r["length"])
        full = brute_force(model_dir, r["input_ids"].numpy(), n)  # (n-1, V)
        labels = r["input_ids"][1:n]
        ref_vals, _ = full.topk(5, dim=-1)
        # stored values are the top-k of the full distribution, and each stored id has the stored log-prob
        torch.testing.assert_close(r["topk_logprobs"][: n - 1].float(), ref_vals, rtol=rtol, atol=atol)
        torch.testing.assert_close(full.gather(1, r["topk_ids"][: n - 1]), ref_vals, rtol=rtol, atol=atol)
        torch.testing.assert_close(r["label_logprob"][: n - 1], full.gather(1, labels[:, None])[:, 0], rtol=1e-5, atol=1e-5)
        # padding positions hold zeros
        assert (r["topk_logprobs"][n - 1:] == 0).all() and (r["label_logprob"][n - 1:] == 0).all()
        checked += n - 1
    assert checked > 50
    assert int(cache[len(cache) - 1]["length"]) < cache.seq_len or manifest["num_input_tokens"] % cache.seq_len == 0


def test_same_input_gives_byte_identical_cache_and_backends_agree(llama, docs_jsonl, tmp_path):
    build(llama, docs_jsonl, tmp_path / "z1", format="zarr")
    build(llama, docs_jsonl, tmp_path / "z2", format="zarr")
    build(llama, docs_jsonl, tmp_path / "a1", format="arrow")
    build(llama, docs_jsonl, tmp_path / "a2", format="arrow")
    z1, z2, a1, a2 = (snapshot(tmp_path / n) for n in ("z1", "z2", "a1", "a2"))
    assert len(z1) > 5 and z1 == z2  # every shard file and the manifest, byte for byte
    assert a1 == a2
    cz, ca = open_cache(tmp_path / "z1"), open_cache(tmp_path / "a1")
    assert len(cz) == len(ca) > 3 and len(cz.shards) > 1
    for name in ("input_ids", "length", "topk_ids", "topk_logprobs", "label_logprob"):
        np.testing.assert_array_equal(cz.read_rows(0, len(cz))[name], ca.read_rows(0, len(ca))[name])


def test_arrow_shards_are_readable_by_datasets(llama, docs_jsonl, tmp_path):
    from datasets import Dataset

    build(llama, docs_jsonl, tmp_path / "a", format="arrow")
    cache = open_cache(tmp_path / "a")
    ds = Dataset.from_file(str(tmp_path / "a" / cache.shards[0].name))
    assert ds.num_rows == cache.shards[0].rows
    np.testing.assert_array_equal(np.array(ds[1]["topk_ids"]), cache[1]["topk_ids"].numpy())


def test_manifest_records_what_the_values_mean(llama, docs_jsonl, tmp_path):
    m = build(llama, docs_jsonl, tmp_path / "c")
    for key in ("schema_version", "format", "values", "model", "tokenizer", "vocab_size", "top_k", "seq_len", "data",
                "config", "shards", "num_sequences", "num_tokens", "bytes_per_token"):
        assert key in m, key
    assert "FULL vocabulary" in m["values"]["logprobs"] and "temperature 1" in m["values"]["logprobs"]
    assert "next-token" in m["values"]["alignment"]
    assert len(m["model"]["weights_fingerprint"]) == 64 and len(m["tokenizer"]["fingerprint"]) == 64
    assert len(m["data"]["fingerprint"]) == 64
    assert sum(s["rows"] for s in m["shards"]) == m["num_sequences"]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert m["bytes_per_token"] == pytest.approx(sum(s["bytes"] for s in m["shards"]) / m["num_tokens"], rel=1e-3)
    # documents.npy records where each document starts in the packed stream
    offsets = np.load(tmp_path / "c" / "documents.npy")
    assert m["packing"]["rule"] == "bos-per-row" and m["packing"]["bos_token_id"] == 1  # the tiny Llama adds BOS
    packed, _ = build_sequences(docs_jsonl, load_tokenizer(str(llama)), seq_len=m["seq_len"])
    np.testing.assert_array_equal(offsets, packed.doc_offsets)
    assert offsets[0] == 0 and offsets[-1] == len(unpack_stream(packed)) and len(offsets) == m["data"]["num_documents"] + 1
    # no temporary files or shard records left once finished
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]


def test_reader_gives_tensors_by_index_without_loading_everything(llama, docs_jsonl, tmp_path):
    build(llama, docs_jsonl, tmp_path / "c", top_k=4)
    cache = open_cache(tmp_path / "c")
    r = cache[len(cache) - 2]
    assert r["input_ids"].shape == (48,) and r["input_ids"].dtype == torch.int64
    assert r["topk_ids"].shape == (47, 4) and r["topk_logprobs"].shape == (47, 4) and r["label_logprob"].shape == (47,)
    assert len(cache._open) == 1  # only the shard holding that row was opened
    with pytest.raises(IndexError):
        cache[len(cache)]


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_truncated_or_edited_shard_is_detected(fmt, llama, docs_jsonl, tmp_path):
    build(llama, docs_jsonl, tmp_path / "c", format=fmt)
    cache = open_cache(tmp_path / "c")
    shard = tmp_path / "c" / cache.shards[1].name
    victim = shard if shard.is_file() else max((p for p in shard.rglob("*") if p.is_file() and "topk_logprobs" in str(p)),
                                                key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    victim.write_bytes(bytes(data))
    open_cache(tmp_path / "c", verify="none")  # size unchanged: only the checksum can tell
    with pytest.raises(CorruptShardError, match=cache.shards[1].name):
        open_cache(tmp_path / "c", verify="full")
    lazy = open_cache(tmp_path / "c")  # default: checked on first read of that shard
    lazy[0]
    with pytest.raises(CorruptShardError, match=cache.shards[1].name):
        lazy[cache.shards[1].first_row]
    victim.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(CorruptShardError, match="truncated"):
        open_cache(tmp_path / "c", verify="none")


def test_unknown_schema_version_and_edited_manifest_are_refused(llama, docs_jsonl, tmp_path):
    build(llama, docs_jsonl, tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    original = json.loads(path.read_text())
    edited = {**original, "top_k": 99}  # a hand edit
    path.write_text(json.dumps(edited))
    with pytest.raises(ManifestError, match="modified"):
        open_cache(tmp_path / "c")
    future = {**original, "schema_version": 99}
    future["manifest_sha256"] = manifest_digest(future)  # consistent, but from the future
    path.write_text(json.dumps(future))
    with pytest.raises(ManifestError, match="unknown schema_version 99"):
        open_cache(tmp_path / "c")
    os.remove(path)
    with pytest.raises(ManifestError, match="not a finished mft-cache"):
        open_cache(tmp_path / "c")


def test_missing_shard_is_detected(llama, docs_jsonl, tmp_path):
    import shutil

    build(llama, docs_jsonl, tmp_path / "c")
    name = open_cache(tmp_path / "c").shards[-1].name
    shutil.rmtree(tmp_path / "c" / name)
    with pytest.raises(CorruptShardError, match=f"{name}: missing"):
        open_cache(tmp_path / "c")


def test_finished_cache_is_not_recomputed_and_other_config_is_refused(llama, docs_jsonl, tmp_path, monkeypatch):
    import mft_cache.pipeline.cache as stage

    first = build(llama, docs_jsonl, tmp_path / "c")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")}

    def no_weights(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded for a finished cache")

    with monkeypatch.context() as m:  # same command: nothing to do, answered from the config without the weights
        m.setattr(stage, "load_model", no_weights)
        assert build(llama, docs_jsonl, tmp_path / "c") == first
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")}
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['top_k'\]\).*--overwrite"):
        build(llama, docs_jsonl, tmp_path / "c", top_k=3)
    m = build(llama, docs_jsonl, tmp_path / "c", top_k=3, overwrite=True)
    assert m["top_k"] == 3 and open_cache(tmp_path / "c", verify="full").top_k == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_topk_one_chunk_at_a_time(dtype):
    """The teacher's chunked top-k equals a whole-vocabulary log_softmax, and holds one chunk's logits and
    log-probs at a time (8 bytes an entry), never the previous chunk's beside the next one's."""
    from buffers import ChunkBuffers
    from mft_cache.pipeline.teacher import topk_logprobs

    g = torch.Generator().manual_seed(0)
    n, hdim, v, k, chunk = 50, 4, 1000, 5, 16  # c·V = 16,000 elements: more than the head's V·H = 4,000
    weight = torch.randn(v, hdim, generator=g).to(dtype)
    hidden, labels = torch.randn(n, hdim, generator=g).to(dtype), torch.randint(0, v, (n,), generator=g)
    with ChunkBuffers(chunk * v) as seen:
        lp, ids, label_lp = topk_logprobs(hidden, labels, lambda h: h @ weight.T, k, chunk)
    full = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # (N, V) all positions at once
    want_lp, want_ids = full.topk(k, dim=-1)
    torch.testing.assert_close(lp, want_lp, rtol=1e-6, atol=1e-6)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(label_lp, full.gather(1, labels[:, None]).squeeze(1), rtol=1e-6, atol=1e-6)
    assert seen.peak == 8 * chunk * v
