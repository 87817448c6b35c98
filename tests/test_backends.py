"""Storage backends behind one interface: a third backend, registered here, writes, resumes and reads through the
unchanged writer and reader."""
from __future__ import annotations

import numpy as np
import pytest

from mft_cache.storage import CacheWriter, open_cache
from mft_cache.storage.backends import BACKENDS, CorruptShardError, formats, register_backend
from mft_cache.storage.manifest import CacheMetadata
from mft_cache.storage.schema import cache_schema, store_rows


class NpzBackend:
    """A toy backend: one uncompressed .npz file per shard."""

    name = "npz"
    suffix = ".npz"

    @staticmethod
    def write(path, schema, arrays):
        with open(path, "wb") as f:
            np.savez(f, **{field.name: arrays[field.name] for field in schema})

    def __init__(self, path, schema):
        try:
            with np.load(path, allow_pickle=False) as data:
                self.arrays = {field.name: data[field.name] for field in schema}
        except (OSError, ValueError, KeyError) as e:
            raise CorruptShardError(path, f"not an npz shard ({e})") from e

    def read(self, name, start, stop):
        return self.arrays[name][start:stop]


@pytest.fixture
def npz():
    register_backend(NpzBackend)
    yield "npz"
    del BACKENDS["npz"]


def shard_arrays(rows: int, first: int, seq_len=6, k=3, vocab=50):
    """Random rows that describe distributions, as the reader checks: sorted log-probs of unique ids, and the
    label's log-prob its top-k column where it is among them, else at most the k-th."""
    rng = np.random.default_rng(first)
    lp = np.sort(np.log(rng.dirichlet(np.ones(k + 2), size=(rows, seq_len - 1)))[..., :k], -1)[..., ::-1]
    lp = lp.astype(np.float16)
    input_ids = rng.integers(0, vocab, (rows, seq_len)).astype(np.uint8)
    topk_ids = np.stack([rng.permutation(vocab)[:k] for _ in range(rows * (seq_len - 1))]).reshape(
        rows, seq_len - 1, k).astype(np.uint8)
    hit = topk_ids == input_ids[:, 1:, None]  # (R, T-1, K)
    column = np.take_along_axis(lp, hit.argmax(-1)[..., None], -1)[..., 0].astype(np.float32)
    tail = np.log(np.clip(1 - np.exp(lp.astype(np.float64)).sum(-1), 1e-30, None))  # the mass left for the label
    outside = np.minimum(lp[..., -1], tail).astype(np.float32)
    return {"input_ids": input_ids, "length": np.full(rows, seq_len, np.int32), "topk_ids": topk_ids,
            "topk_logprobs": lp, "label_logprob": np.where(hit.any(-1), column, outside),
            "label_mask": np.ones((rows, seq_len - 1), bool)}


def test_a_registered_backend_writes_resumes_and_reads(npz, tmp_path):
    assert "npz" in formats()
    schema = cache_schema(vocab_size=50, top_k=3, seq_len=6)
    identity = {"what": "toy"}
    shards = [shard_arrays(4, 0), shard_arrays(4, 1), shard_arrays(2, 2)]
    first = CacheWriter(tmp_path / "c", fmt=npz, schema=schema, identity=identity)
    assert first.state == "new"
    first.write_shard(0, store_rows(shards[0], schema))
    first.write_shard(1, store_rows(shards[1], schema))  # ...then the build stops
    again = CacheWriter(tmp_path / "c", fmt=npz, schema=schema, identity=identity)  # its own files are not foreign
    assert again.state == "resume" and sorted(again.done_shards()) == [0, 1]
    again.write_shard(2, store_rows(shards[2], schema))
    meta = CacheMetadata(model={"id": "toy"}, tokenizer={"fingerprint": "t", "bos_token_id": None}, vocab_size=50,
                         top_k=3, seq_len=6, logprob_dtype="float16", data={"source": "toy", "split": "train"},
                         packing={"rule": "concat", "bos_token_id": None}, num_sequences=10, num_tokens=50,
                         num_input_tokens=60, rows_per_shard=4, num_processes=1, created_by={})
    manifest = again.finish(meta, 3, np.array([0, 60]))
    assert manifest.format == "npz" and [s.name for s in manifest.shards] == [
        "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    cache = open_cache(tmp_path / "c", verify="full")
    rows = cache.read_rows(0, len(cache))
    for name in ("input_ids", "topk_ids", "topk_logprobs", "label_logprob"):
        np.testing.assert_array_equal(rows[name], np.concatenate([s[name] for s in shards]))
    (tmp_path / "c" / "shard-00001.npz").write_bytes(b"not a shard")
    with pytest.raises(CorruptShardError, match="shard-00001.npz"):
        open_cache(tmp_path / "c", verify="full")


def test_a_backend_needs_a_new_name_and_suffix(npz):
    class Twin(NpzBackend):
        name = "npz2"

    with pytest.raises(ValueError, match="registered already"):
        register_backend(Twin)
