"""Child process: bytes/token and write/read throughput of each backend and each --logprob-dtype at several k.

The teacher runs once (top-k at the largest k over real sequences); smaller k are the leading columns
of the same outputs (top-k is sorted, so they are exactly what a smaller --top-k stores). Only storage
is timed, through the library: write = CacheWriter.write_shard (backend write with compression, fsync,
sha256, rename) + finish (manifest); read = open_cache + read_rows of every row, as the trainer's
Rows reads them (one row at a time, in a shuffled order), first with verify="lazy" (the default:
the shard's sha256 and values are checked on first read) and then, on a second open, verify="none".
Configurations are interleaved and repeated; MB/s are of the uncompressed row bytes.

Below the child, the `storage` section of bench/run.py (SECTION): this child once, its table and verdicts.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import fmt, median, now, say, verdict  # noqa: E402

KS = [8, 16, 32, 64, 128]  # the --top-k values the storage section writes and reads


def teacher_outputs(spec: dict) -> dict:
    import numpy as np
    import torch

    from mft_cache.models import backbone_and_head, load_model, load_tokenizer, resolve_device, resolve_dtype
    from mft_cache.pipeline.teacher import auto_chunk_tokens, teach_batch
    from mft_cache.rows import build_sequences
    from mft_cache.rows.packing import packing_description

    device = resolve_device(spec.get("device", "auto"))
    tokenizer = load_tokenizer(spec["model"])
    packed, _ = build_sequences(spec["data"], tokenizer, spec["seq_len"])
    packed.truncate(spec["sequences"])
    ids, lengths, trained = packed.input_ids, packed.lengths, packed.label_mask
    model = load_model(spec["model"], resolve_dtype("float32" if device.type == "cpu" else "auto", device),
                       device).eval()  # values comparable across machines: storage alone is timed
    backbone, head = backbone_and_head(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    k = max(spec["ks"])
    parts = {"topk_ids": [], "topk_logprobs": [], "label_logprob": []}
    for b in range(0, len(ids), spec["batch"]):
        e = b + spec["batch"]
        lp, top, label_lp = teach_batch(backbone, head, torch.as_tensor(ids[b:e], device=device),
                                        torch.as_tensor(lengths[b:e], device=device, dtype=torch.long),
                                        k, auto_chunk_tokens(vocab), torch.as_tensor(trained[b:e], device=device))
        parts["topk_ids"].append(top.cpu().numpy())
        parts["topk_logprobs"].append(lp.cpu().numpy())
        parts["label_logprob"].append(label_lp.cpu().numpy())
    out = {k: np.concatenate(v) for k, v in parts.items()}
    return {"input_ids": ids, "length": lengths.astype(np.int32), "label_mask": trained.astype(np.uint8), **out,
            "vocab_size": vocab,
            "tokens": int(trained.sum()), "packing": packing_description(packed.bos_id),
            "doc_offsets": packed.doc_offsets}


def run(spec: dict) -> dict:
    import numpy as np

    from mft_cache.storage import CacheMetadata, CacheWriter, cache_schema, open_cache
    from mft_cache.storage.backends import FORMATS
    from mft_cache.storage.schema import LOGPROB_DTYPES, encode_logprobs, row_bytes

    work = Path(spec["work"])
    t = teacher_outputs(spec)
    vocab, tokens, packing, doc_offsets = (t.pop(k) for k in ("vocab_size", "tokens", "packing", "doc_offsets"))
    seq_len = spec["seq_len"]
    rows = len(t["length"])
    configs = [(fmt, dt, k) for fmt in FORMATS for dt in LOGPROB_DTYPES for k in spec["ks"]]
    order = np.random.default_rng(0).permutation(rows).tolist()

    def one(fmt: str, dt: str, k: int, rep: int) -> dict:
        schema = cache_schema(vocab_size=vocab, top_k=k, seq_len=seq_len, logprob_dtype=dt)
        dtypes = {f.name: f.dtype for f in schema}
        arrays = {"input_ids": t["input_ids"].astype(dtypes["input_ids"]), "length": t["length"],
                  "label_mask": t["label_mask"],
                  "topk_ids": np.ascontiguousarray(t["topk_ids"][..., :k]).astype(dtypes["topk_ids"]),
                  **encode_logprobs(np.ascontiguousarray(t["topk_logprobs"][..., :k]), dt),
                  "label_logprob": t["label_logprob"]}
        folder = work / f"{fmt}-{dt}-k{k}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = now()
        writer = CacheWriter(folder, fmt=fmt, schema=schema, identity={"bench": f"{fmt}-{dt}-{k}-{rep}"})
        writer.write_shard(0, arrays)
        meta = CacheMetadata(model={"id": "bench"}, tokenizer={}, vocab_size=vocab, top_k=k, seq_len=seq_len,
                             logprob_dtype=dt, data={}, packing=packing, num_sequences=rows, num_tokens=tokens,
                             num_input_tokens=int(t["length"].sum()), rows_per_shard=rows, num_processes=1,
                             created_by={"bench": "storage_io"})
        manifest = writer.finish(meta, 1, doc_offsets)
        write_s = now() - t0
        reads = {}
        for verify in ("lazy", "none"):
            t0 = now()
            cache = open_cache(folder, verify=verify)
            for r in order:
                cache.read_rows(r, r + 1)
            reads[verify] = now() - t0
        return {"write_s": write_s, "read_lazy_s": reads["lazy"], "read_s": reads["none"],
                "bytes": manifest.shard_bytes, "bytes_per_token": manifest.shard_bytes / tokens,
                "raw_bytes": row_bytes(schema) * rows}

    runs: dict = {c: [] for c in configs}
    for rep in range(spec["repeats"]):
        for c in (configs if rep % 2 == 0 else configs[::-1]):
            runs[c].append(one(*c, rep))
    table = []
    for (backend, dt, k), rs in runs.items():
        raw = rs[0]["raw_bytes"]
        table.append({
            "format": backend, "logprob_dtype": dt, "k": k,
            "bytes_per_token": rs[0]["bytes_per_token"],
            "raw_bytes_per_token": raw / tokens,
            "write_s": median(r["write_s"] for r in rs),
            "write_MB_s": median(raw / r["write_s"] / 1e6 for r in rs),
            "write_tokens_s": median(tokens / r["write_s"] for r in rs),
            "read_MB_s": median(raw / r["read_s"] / 1e6 for r in rs),
            "read_tokens_s": median(tokens / r["read_s"] for r in rs),
            "read_verified_MB_s": median(raw / r["read_lazy_s"] / 1e6 for r in rs),
            "read_verified_tokens_s": median(tokens / r["read_lazy_s"] for r in rs),
        })
    return {"tokens": tokens, "sequences": rows, "vocab_size": vocab, "seq_len": seq_len,
            "logprob_dtypes": list(LOGPROB_DTYPES), "formats": list(FORMATS), "rows": table}


# -- the storage section of bench/run.py ------------------------------------------------------------
def section_storage(args, inputs: benchlib.Inputs) -> dict:
    spec = {"work": str(inputs.work / "storage"), "model": inputs.model, "data": inputs.data, "seq_len": args.seq_len,
            "batch": args.batch, "sequences": args.sequences, "ks": KS, "repeats": args.repeats or 3,
            "device": inputs.device}
    r = benchlib.run_child("storage_io.py", spec, inputs.work / "logs" / "storage.log")
    say(f"  storage: {len(r['rows'])} configurations over {r['tokens']:,} tokens")
    return r | {"ks": KS, "repeats": spec["repeats"]}


def table(st: dict, results: dict) -> list[str]:
    out = [f"### Storage ({st['sequences']} sequences x {st['seq_len']}, {st['tokens']:,} tokens, "
           f"vocab {st['vocab_size']:,}; MB/s of uncompressed row bytes; reads row by row in shuffled order "
           f"as the trainer reads them)\n",
           "| format | log-probs | k | bytes/token | uncompressed | write MB/s | write tok/s | read MB/s | "
           "read tok/s | first read (verify lazy) tok/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in st["rows"]:
        out.append(f"| {r['format']} | {r['logprob_dtype']} | {r['k']} | {fmt(r['bytes_per_token'], 1)} | "
                   f"{fmt(r['raw_bytes_per_token'], 1)} | {fmt(r['write_MB_s'], 1)} | {fmt(r['write_tokens_s'], 0)} | "
                   f"{fmt(r['read_MB_s'], 1)} | {fmt(r['read_tokens_s'], 0)} | {fmt(r['read_verified_tokens_s'], 0)} |")
    return out + [""]


def verdicts(st: dict) -> list[dict]:
    """The bytes/token target at k=32, for zarr with float16 log-probs; the other formats and dtypes beside it."""
    return [verdict(f"<= 100 bytes/token at k=32 ({r['format']}, {r['logprob_dtype']})", r["bytes_per_token"],
                    r["bytes_per_token"] <= 100, f"{r['bytes_per_token']:.1f} bytes/token",
                    info=(r["format"], r["logprob_dtype"]) != ("zarr", "float16"))
            for r in st["rows"] if r["k"] == 32]


SECTION = benchlib.Section("storage", section_storage, table, verdicts)


if __name__ == "__main__":
    benchlib.child_main(run)
