"""The typed manifest: what `load_manifest` / `Cache.manifest` give is a frozen Manifest built from the validated
JSON, its attributes are the file's keys, and it keeps the file's JSON; derived values (rule, bos_id)
follow the keys."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mft_cache.storage import (CacheMetadata, CacheWriter, Manifest, ManifestError, cache_schema, load_manifest,
                               open_cache, store_rows)
from mft_cache.storage.manifest import REQUIRED_KEYS, FileRecord, Packing, Shard

VOCAB, K, T = 50, 3, 6


def _rows(n: int, seed: int) -> dict[str, np.ndarray]:
    """n rows, every position trained, whose values any reader accepts: sorted log-probs, the label among the top-k;
    in the fields a shard stores."""
    g = np.random.default_rng(seed)
    input_ids = g.integers(0, VOCAB, size=(n, T)).astype(np.uint8)
    topk_ids = np.stack([np.stack([g.permutation(VOCAB)[:K] for _ in range(T - 1)]) for _ in range(n)]).astype(np.uint8)
    topk_ids[..., 0] = input_ids[:, 1:]  # the label is the teacher's top-1
    lp = np.sort(np.log(g.dirichlet(np.ones(K + 2), size=(n, T - 1))[..., :K]), axis=-1)[..., ::-1]
    rows = {"input_ids": input_ids, "length": np.full(n, T, np.int32), "topk_ids": topk_ids,
            "topk_logprobs": lp.astype(np.float16), "label_logprob": lp[..., 0].astype(np.float16).astype(np.float32),
            "label_mask": np.ones((n, T - 1), bool)}
    return store_rows(rows, cache_schema(vocab_size=VOCAB, top_k=K, seq_len=T))


def _build(folder, packing: dict, data: dict | None = None) -> Manifest:
    schema = cache_schema(vocab_size=VOCAB, top_k=K, seq_len=T)
    writer = CacheWriter(folder, fmt="zarr", schema=schema, identity={"what": "manifest test"})
    writer.write_shard(0, _rows(4, 0))
    writer.write_shard(1, _rows(2, 1))
    meta = CacheMetadata(model={"id": "toy", "weights_fingerprint": "w" * 64}, tokenizer={"fingerprint": "t", "class": "Tok",
                         "bos_token_id": 1, "eos_token_id": 2}, vocab_size=VOCAB, top_k=K, seq_len=T,
                         logprob_dtype="float16", data=data or {"source": "docs.jsonl", "split": "train", "fingerprint": "f"},
                         packing=packing, num_sequences=6, num_tokens=30, num_input_tokens=36, rows_per_shard=4,
                         num_processes=1, created_by={"mft_cache": "test"})
    return writer.finish(meta, 2, np.array([0, 36]))


def test_the_manifest_is_typed_and_keeps_its_json(tmp_path):
    written = _build(tmp_path / "c", {"rule": "bos-per-row", "bos_token_id": 1, "description": "rows start with BOS"})
    m = load_manifest(tmp_path / "c")
    assert isinstance(m, Manifest) and m == written
    assert (m.format, m.vocab_size, m.top_k, m.seq_len, m.num_sequences, m.num_tokens) == ("zarr", VOCAB, K, T, 6, 30)
    assert m.model.id == "toy" and m.model.weights_fingerprint == "w" * 64 and m.model.path is None
    assert m.tokenizer.class_name == "Tok" and m.tokenizer.bos_token_id == 1
    assert m.data.source == "docs.jsonl" and m.data.format == "text" and m.data.train_on == "all"
    assert m.data.prompt_field == "prompt" and m.data.completion_field == "completion"
    assert isinstance(m.data.documents_file, FileRecord) and m.data.documents_file.name == "documents.npy"
    assert [s.name for s in m.shards] == ["shard-00000.zarr", "shard-00001.zarr"]
    assert all(isinstance(s, Shard) for s in m.shards) and [s.first_row for s in m.shards] == [0, 4]
    assert m.schema == cache_schema(vocab_size=VOCAB, top_k=K, seq_len=T)
    assert (m.schema_version, m.rule, m.bos_id) == (3, "bos-per-row", 1)
    assert m.to_json() == json.loads((tmp_path / "c" / "manifest.json").read_text())
    m.to_json()["top_k"] = 99  # a copy: the manifest does not change
    assert m.to_json()["top_k"] == K and open_cache(tmp_path / "c").manifest == m
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.top_k = 5


def test_derived_values_follow_the_packing(tmp_path):
    concat = _build(tmp_path / "a", {"rule": "concat", "bos_token_id": None})
    assert (concat.rule, concat.bos_id) == ("concat", None) and concat.packing == Packing("concat", None, None)
    on_disk = concat.to_json()
    del on_disk["packing"]  # a cache made before rows started with BOS has no "packing"
    old = Manifest.from_json(on_disk, tmp_path / "a" / "manifest.json")
    assert (old.packing, old.rule, old.bos_id) == (None, "concat", None)


def test_required_keys_are_the_typed_manifests_fields(tmp_path):
    required = {f.name for f in dataclasses.fields(Manifest)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert set(REQUIRED_KEYS) == {"format_name"} | required - {"manifest_sha256"}
    _build(tmp_path / "c", {"rule": "concat", "bos_token_id": None})
    on_disk = json.loads((tmp_path / "c" / "manifest.json").read_text())
    for key in sorted(required):
        with pytest.raises(ManifestError, match=repr(key)):
            Manifest.from_json({k: v for k, v in on_disk.items() if k != key}, tmp_path / "c" / "manifest.json")


@pytest.mark.parametrize("key, value, named", [
    ("top_k", "3", "'top_k'"), ("shards", {}, "'shards'"), ("model", {"id": 5}, "'model.id'"),
    ("data", {"format": "html"}, "'data.format'"), ("packing", {"rule": "zigzag"}, "'packing.rule'"),
])
def test_from_json_is_the_validator(tmp_path, key, value, named):
    _build(tmp_path / "c", {"rule": "concat", "bos_token_id": None})
    on_disk = json.loads((tmp_path / "c" / "manifest.json").read_text())
    with pytest.raises(ManifestError, match=named):
        Manifest.from_json({**on_disk, key: value}, tmp_path / "c" / "manifest.json")
