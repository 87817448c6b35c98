"""`mft inspect CACHE`: what a cache holds and how good its teacher is on the labels (CACHE a folder, or
hf://OWNER/NAME[@REVISION], downloaded and verified as `mft train --cache` downloads it)."""
from __future__ import annotations

import json
import math

import numpy as np

from mft_cache.provenance import clean, describe
from mft_cache.storage import open_cache
from mft_cache.storage.hub import download_cache, is_hub_ref


def cache_stats(folder, verify: bool = False) -> dict:
    """Summary of a cache, reading it one shard at a time. A Hub reference is downloaded first, and its every shard
    checked against the manifest (download_cache): it counts as verified."""
    hub = str(folder) if is_hub_ref(str(folder)) else None
    if hub:
        folder = download_cache(hub, "CACHE")
    cache = open_cache(folder, verify="full" if verify and not hub else "none")
    m = cache.manifest
    lp_field = next(f for f in cache.schema if f.name == "topk_logprobs")
    bos = m.tokenizer.bos_token_id
    n = correct = bos_rows = 0
    label_lp_sum = tail_sum = 0.0
    for arrays in cache.iter_shards():  # encoded log-probs come decoded: the values the trainer sees
        valid = arrays["label_mask"]  # (R, T-1) trained positions
        labels = arrays["input_ids"][:, 1:].astype(np.int64)
        top_ids = arrays["topk_ids"].astype(np.int64)
        top_p = np.exp(arrays["topk_logprobs"].astype(np.float64))
        label_lp = arrays["label_logprob"].astype(np.float64)
        in_topk = (top_ids == labels[..., None]).any(-1)
        mass = top_p.sum(-1) + np.where(in_topk, 0.0, np.exp(label_lp))
        n += int(valid.sum())
        bos_rows += 0 if bos is None else int((arrays["input_ids"][:, 0] == bos).sum())
        correct += int((valid & (top_ids[..., 0] == labels)).sum())
        label_lp_sum += float(label_lp[valid].sum())
        tail_sum += float(np.clip(1.0 - mass, 0.0, None)[valid].sum())
    return json_safe({
        "path": str(cache.folder),
        "hub": hub,  # the hf:// reference it was downloaded from, or None
        "format": m.format,
        "schema_version": m.schema_version,
        "model": m.model.id,
        "teacher_dtype": m.model.dtype,  # the dtype of the teacher's pass (None: not recorded)
        "teacher_trained_from": clean(m.model.trained_from),  # the teacher folder's mft_checkpoint.json, if any
        "vocab_size": m.vocab_size,
        "top_k": m.top_k,
        "seq_len": m.seq_len,
        "num_sequences": m.num_sequences,
        "num_tokens": m.num_tokens,
        "num_input_tokens": m.num_input_tokens,
        "data_format": m.data.format,
        "train_on": m.data.train_on,
        "long_rows": m.data.long_rows,  # documents packed whole: policy, dropped and cut counts (None: not recorded)
        "num_shards": len(m.shards),
        "bytes_per_token": m.bytes_per_token,
        "logprob_storage": lp_field.encoding["name"] if lp_field.encoding else lp_field.dtype,
        "top1_accuracy": correct / max(n, 1),
        "mean_label_logprob": label_lp_sum / max(n, 1),
        "mean_tail_mass": tail_sum / max(n, 1),
        "packing": m.rule,
        "bos_row_share": None if bos is None else bos_rows / max(m.num_sequences, 1),
        "num_processes": m.num_processes,
        "verified": bool(verify or hub),
    })


def json_safe(value):
    """`value` with every NaN or infinite float (a mean over a label log-prob of -inf, say) replaced by None, so
    `mft inspect --json` prints valid JSON (null) rather than Python's NaN/Infinity, which JSON parsers refuse."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def stats_json(stats: dict) -> str:
    """The stats as one JSON object, strictly (allow_nan=False: a non-finite number is a bug, never output)."""
    return json.dumps(json_safe(stats), indent=2, allow_nan=False)


def _num(value, spec: str) -> str:
    """A number of the stats for people: None (no tokens, or not finite: see json_safe) reads n/a."""
    return "n/a" if value is None else format(value, spec)


def _long_rows(record: dict) -> str:
    """data.long_rows for people: the policy, and how many documents it dropped and cut (the first few, 0-based)."""
    parts = [f"--long-rows {record['policy']}"]
    for what in ("dropped", "truncated"):
        if record.get(what):
            first = ", ".join(map(str, record.get(f"first_{what}", [])))
            parts.append(f"{record[what]:,} {what} (first: {first})")
    return "; ".join(parts) if len(parts) > 1 else parts[0] + ": none"


def format_stats(s: dict) -> str:
    rows = [
        ("cache", f"{s['hub']} ({s['path']})" if s.get("hub") else s["path"]), ("format", s["format"]), ("model", s["model"]),
        ("teacher dtype", s.get("teacher_dtype") or "not recorded"),
        *([("teacher trained from", describe(s["teacher_trained_from"]))] if s.get("teacher_trained_from")
          else []),
        ("vocabulary", f"{s['vocab_size']:,}"),
        ("top-k", s["top_k"]), ("sequences", f"{s['num_sequences']:,} x {s['seq_len']} tokens"),
        ("tokens (positions)", f"{s['num_tokens']:,}" + ("" if s["train_on"] == "all" else
                                                          f" trained of {s['num_input_tokens']:,} ({s['data_format']}, "
                                                          f"train on {s['train_on']})")),
        *([("documents longer than a row", _long_rows(s["long_rows"]))] if s.get("long_rows") else []),
        ("shards", s["num_shards"]),
        ("bytes per token", _num(s["bytes_per_token"], ".1f")), ("top-k log-probs stored as", s["logprob_storage"]),
        ("rows starting with BOS", "n/a (no BOS token)" if s["bos_row_share"] is None
         else f"{s['bos_row_share']:.4f} (packing: {s['packing']})"),
        ("teacher top-1 accuracy", _num(s["top1_accuracy"], ".4f")),
        ("mean label log-prob", _num(s["mean_label_logprob"], ".4f")),
        ("mean tail mass (outside top-k and label)", _num(s["mean_tail_mass"], ".4f")),
        ("checksums", "verified" if s["verified"] else "not checked (--verify)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
