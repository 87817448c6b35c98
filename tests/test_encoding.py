"""The q8 encoding of the top-k log-probs: the pure functions against a plain reference, then q8 caches
(`mft cache --logprob-dtype q8`) against float32 caches of the same model, on both backends."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import cache_args, rewrite_field, snapshot
from mft_cache.cli import main
from mft_cache.pipeline.inspect import cache_stats
from mft_cache.storage import CorruptShardError, ManifestError, open_cache
from mft_cache.storage.encoding import Q8_GAP_MAX, Q8_LEVELS, decode_q8, encode_q8, q8_error_bound
from mft_cache.storage.manifest import manifest_digest
from mft_cache.trainer.data import Rows

F32_EPS = 2.0**-23  # float32 rounding of `top1 - gap`: relative to the larger magnitude


def sorted_logprobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random top-k rows (..., K) sorted descending: log_softmax of peaky logits, with -inf, zero
    padding rows, ties and gaps beyond gap_max mixed in."""
    logits = rng.normal(0, rng.uniform(0.5, 6.0), size=(*shape[:-1], 200))
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    lp = -np.sort(-lp, axis=-1)[..., : shape[-1]].astype(np.float32)
    flat = lp.reshape(-1, shape[-1])
    n = len(flat)
    flat[rng.random(n) < 0.1] = 0.0  # padding positions
    far = rng.random(n) < 0.1
    far[0] = True
    flat[far, 1:] -= 30.0  # gaps beyond gap_max
    if shape[-1] > 2:
        flat[rng.random(n) < 0.05, -1] = -np.inf  # probability 0
        ties = rng.random(n) < 0.05
        flat[ties, 1] = flat[ties, 0]
    return flat.reshape(shape)


def reference_decode(top1: np.ndarray, increments: np.ndarray) -> np.ndarray:
    """Plain loops: code_j = increments_0 + ... + increments_j, gap = (code / scale)^2."""
    scale = Q8_LEVELS / np.sqrt(Q8_GAP_MAX)
    out = np.empty(increments.shape, dtype=np.float32)
    for idx in np.ndindex(increments.shape[:-1]):
        code = 0
        for j in range(increments.shape[-1]):
            code += int(increments[idx + (j,)])
            out[idx + (j,)] = np.float32(top1[idx]) - np.float32((code / scale) ** 2)
    return out


@pytest.mark.parametrize("shape", [(1,), (3, 1), (5, 7), (2, 9, 32), (4, 3, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q8_round_trip_against_float32_within_the_stated_bound(shape, seed):
    rng = np.random.default_rng(seed)
    lp = sorted_logprobs(rng, shape)  # (..., K) float32, the exact values
    top1, inc = encode_q8(lp)
    assert top1.dtype == np.float32 and inc.dtype == np.uint8 and inc.shape == lp.shape
    np.testing.assert_array_equal(top1, lp[..., 0])  # top-1 exact
    assert (inc[..., 0] == 0).all()
    dec = decode_q8(top1, inc)  # (..., K) float32
    assert dec.dtype == np.float32
    np.testing.assert_array_equal(dec, reference_decode(top1, inc))
    np.testing.assert_array_equal(dec[..., 0], lp[..., 0])  # column 0 is top1 exactly
    gap = lp[..., :1].astype(np.float64) - lp  # (..., K)
    got = lp[..., :1].astype(np.float64) - dec
    rounding = F32_EPS * np.maximum(np.abs(lp[..., :1]), np.abs(dec)) + 1e-12
    inside = gap < Q8_GAP_MAX
    err = np.abs(got - gap)[inside]
    assert (err <= q8_error_bound(gap[inside]) + rounding[inside]).all(), err.max()
    # beyond gap_max (and -inf): stored as gap_max
    np.testing.assert_allclose(got[~inside], Q8_GAP_MAX, rtol=0, atol=1e-5 * (1 + np.abs(lp[..., :1])).max())
    assert inside.sum() > 0 and (shape[-1] == 1 or (~inside).sum() > 0)
    # what the trainer feels: probability error at most ~0.0068 * p_max wherever the gap is covered
    dp = np.abs(np.exp(dec.astype(np.float64)) - np.exp(lp.astype(np.float64)))
    assert (dp[inside] <= 0.0069 * np.exp(np.broadcast_to(lp[..., :1], lp.shape)[inside])).all()


def test_q8_encoding_refuses_what_it_cannot_represent():
    lp = np.array([[-0.5, -1.0, -3.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        encode_q8(np.array([[-0.5, np.nan, -3.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="not sorted"):
        encode_q8(lp[:, ::-1])
    with pytest.raises(ValueError, match="not finite"):
        encode_q8(np.full((1, 3), -np.inf, dtype=np.float32))
    top1, inc = encode_q8(lp)
    bad = inc.copy()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match="codes outside"):
        decode_q8(top1, bad)
    bad = inc.copy()
    bad[0, 1:] = 200  # codes sum past the levels
    with pytest.raises(ValueError, match="codes outside"):
        decode_q8(top1, bad)


# -- caches ------------------------------------------------------------------------------------------

def cli_cache(model: Path, data: Path, out: Path, *extra: str) -> dict:
    argv = cache_args(model, data, out, *extra, seq_len=48, top_k=8, batch_size=3, shard_mb=0.02)
    assert main(argv) in (0, None)
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def f32_cache(llama, docs_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("f32") / "c"
    cli_cache(llama, docs_jsonl, out, "--logprob-dtype", "float32", "--format", "arrow")
    return out


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_q8_cache_reads_back_within_the_bound_of_a_float32_cache(fmt, f32_cache, llama, docs_jsonl, tmp_path):
    m = cli_cache(llama, docs_jsonl, tmp_path / "q", "--logprob-dtype", "q8", "--format", fmt)
    schema = {f["name"]: f for f in m["schema"]}
    assert m["schema_version"] == 3 and m["config"]["logprob_dtype"] == "q8"
    assert schema["topk_logprobs"]["dtype"] == "uint8" and schema["top1_logprob"]["dtype"] == "float32"
    enc = schema["topk_logprobs"]["encoding"]
    assert enc["name"] == "q8" and enc["gap_max"] == Q8_GAP_MAX and enc["levels"] == Q8_LEVELS
    assert enc["top1_field"] == "top1_logprob" and "topk_logprobs_encoding" in m["values"]

    q, ref = open_cache(tmp_path / "q", verify="full"), open_cache(f32_cache, verify="full")
    assert len(q) == len(ref) > 3 and len(q.shards) > 1
    a, b = q.read_rows(0, len(q)), ref.read_rows(0, len(ref))
    assert set(a) == set(b) == {"input_ids", "length", "label_mask", "topk_ids", "topk_logprobs", "label_logprob"}
    for name in ("input_ids", "length", "topk_ids", "label_logprob"):  # label exact
        np.testing.assert_array_equal(a[name], b[name])
    lp, exact = a["topk_logprobs"], b["topk_logprobs"]  # (R, T-1, K)
    assert lp.dtype == np.float32
    np.testing.assert_array_equal(lp[..., 0], exact[..., 0])  # top-1 (p_max) exact
    gap = exact[..., :1].astype(np.float64) - exact
    inside = gap < Q8_GAP_MAX
    err = np.abs((exact[..., :1].astype(np.float64) - lp) - gap)
    assert (err[inside] <= q8_error_bound(gap[inside]) + 1e-5).all()
    valid = np.arange(lp.shape[1])[None] < (a["length"][:, None] - 1)
    assert (lp[~valid] == 0).all()  # padding stays 0
    raw = q.read_rows(0, 2, raw=True)  # the stored fields
    trained = raw["label_mask"].astype(bool)  # (2, T-1): the stored positions
    assert raw["topk_logprobs"].dtype == np.uint8 and (raw["top1_logprob"] == exact[:2, :, 0][trained]).all()
    # what the trainer reads: float32 log-probs whose column 0 is p_max exactly, no trainer change
    batch = Rows(q).batch([1, 0])
    assert str(batch["topk_logprobs"].dtype) == "torch.float32"
    np.testing.assert_array_equal(batch["topk_logprobs"][..., 0].numpy(), exact[[1, 0], :, 0])
    # mft inspect: the same statistics, the tail mass within the encoding's error
    sq, sr = cache_stats(tmp_path / "q", verify=True), cache_stats(f32_cache)
    assert sq["logprob_storage"] == "q8" and sr["logprob_storage"] == "float32"
    assert sq["top1_accuracy"] == sr["top1_accuracy"] and sq["mean_label_logprob"] == sr["mean_label_logprob"]
    assert abs(sq["mean_tail_mass"] - sr["mean_tail_mass"]) < 7e-3
    assert m["bytes_per_token"] < json.loads((f32_cache / "manifest.json").read_text())["bytes_per_token"]


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_q8_cache_is_byte_identical_and_a_flipped_bit_is_detected(fmt, llama, docs_jsonl, tmp_path):
    cli_cache(llama, docs_jsonl, tmp_path / "a", "--logprob-dtype", "q8", "--format", fmt)
    cli_cache(llama, docs_jsonl, tmp_path / "b", "--logprob-dtype", "q8", "--format", fmt)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    cache = open_cache(tmp_path / "a")
    shard = tmp_path / "a" / cache.shards[1].name
    victim = shard if shard.is_file() else max((p for p in shard.rglob("*") if p.is_file() and "topk_logprobs" in str(p)),
                                                key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=cache.shards[1].name):
        open_cache(tmp_path / "a", verify="full")


@pytest.mark.parametrize("field, edit, message", [
    ("topk_logprobs", lambda a: a.__setitem__((1, 3, 0), 1), "q8 codes outside their range"),
    ("topk_logprobs", lambda a: a.__setitem__((0, 2, slice(1, None)), 100), "q8 codes outside their range"),
    ("top1_logprob", lambda a: a.__setitem__((1, 3), np.nan), "NaN"),
    ("top1_logprob", lambda a: a.__setitem__((0, 0), -np.inf), "infinite"),
    ("top1_logprob", lambda a: a.__setitem__((0, 0), 2.5), "positive"),
    ("label_logprob", lambda a: a.__setitem__((0, 5), np.nan), "NaN"),
])
def test_q8_values_out_of_range_are_refused(field, edit, message, llama, docs_jsonl, tmp_path):
    folder = tmp_path / "c"
    cli_cache(llama, docs_jsonl, folder, "--logprob-dtype", "q8", "--format", "arrow", "--top-k", "4")
    name = rewrite_field(folder, field, edit)  # its stored (encoded) values, re-signed
    with pytest.raises(CorruptShardError, match=re.escape(name) + ".*" + re.escape(field) + ".*" + re.escape(message)):
        open_cache(folder)[0]


def test_plain_caches_hold_no_encoding_and_encoded_manifests_are_checked(llama, docs_jsonl, tmp_path):
    m16 = cli_cache(llama, docs_jsonl, tmp_path / "f16", "--format", "arrow")
    assert m16["schema_version"] == 3 and not any("encoding" in f for f in m16["schema"])
    assert "topk_logprobs_encoding" not in m16["values"]
    cli_cache(llama, docs_jsonl, tmp_path / "q", "--logprob-dtype", "q8", "--format", "arrow")
    path = tmp_path / "q" / "manifest.json"
    original = json.loads(path.read_text())

    def write(manifest: dict) -> None:
        manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        manifest["manifest_sha256"] = manifest_digest(manifest)  # consistent, so only the content is judged
        path.write_text(json.dumps(manifest))

    write({**original, "schema_version": 1})  # what a version-1 reader would need to misread the codes
    with pytest.raises(ManifestError, match="does not match its fields"):
        open_cache(tmp_path / "q")
    schema = [dict(f, encoding={**f["encoding"], "name": "q4"}) if "encoding" in f else f for f in original["schema"]]
    write({**original, "schema": schema})
    with pytest.raises(ManifestError, match="unknown encoding 'q4'"):
        open_cache(tmp_path / "q")
