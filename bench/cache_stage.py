"""Child process: throughput of stage one (`mft cache`) against a bare teacher forward pass.

Three ways over the same packed sequences, interleaved (their order rotates every repeat):
  build_cache  the real pipeline: open_job (model loading, tokenization, the folder: set-up, outside
               the window), then teach_shards + finish_cache timed (the head check, the teacher's pass,
               the shard writes with fsync and checksum, documents.npy and the manifest are inside)
  bare         model(input_ids, attention_mask).logits under no_grad: the teacher's own forward pass
  split        build_cache's inner loop re-run by hand from the library's functions, timed phase by phase:
               forward (backbone), head (output layer + log_softmax + top-k + label, teach_batch's
               masking), d2h (.cpu()), encode (dtype casts or q8), write (CacheWriter.write_shard:
               backend write with compression, fsync, sha256, rename)

Below the child, the `cache` section of bench/run.py (SECTION): this child once, its table and verdict.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import Memory, fmt, median, now, say, verdict  # noqa: E402

WAYS = ("build_cache", "bare", "split")
SPLIT = ("forward", "head", "d2h", "encode", "write")


def run(spec: dict) -> dict:
    import numpy as np
    import torch

    import mft_cache.pipeline.cache as stage
    from mft_cache.models import backbone_and_head, hidden_states, load_model, load_tokenizer, resolve_device, resolve_dtype
    from mft_cache.pipeline.teacher import auto_chunk_tokens, topk_logprobs
    from mft_cache.rows import build_sequences
    from mft_cache.storage import CacheWriter, cache_schema
    from mft_cache.storage.schema import encode_logprobs

    work = Path(spec["work"])
    device = resolve_device(spec.get("device", "auto"))
    dtype = resolve_dtype("auto", device)
    mem = Memory(device)
    cfg = stage.CacheConfig(model=spec["model"], data=spec["data"], out=str(work / "cache"), seq_len=spec["seq_len"],
                            top_k=spec["top_k"], batch_size=spec["batch"], max_sequences=spec["sequences"],
                            format=spec.get("format", "zarr"), logprob_dtype=spec.get("logprob_dtype", "float16"),
                            device=str(device), overwrite=True)
    tokenizer = load_tokenizer(cfg.model)
    packed, _ = build_sequences(cfg.data, tokenizer, cfg.seq_len, cfg.text_field, cfg.split)
    packed.truncate(cfg.max_sequences)
    ids_all, lengths_all, trained_all = packed.input_ids, packed.lengths, packed.label_mask
    tokens = int(trained_all.sum())
    model = load_model(cfg.model, dtype, device).eval()
    backbone, head = backbone_and_head(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = cfg.chunk_tokens or auto_chunk_tokens(vocab)
    schema = cache_schema(vocab_size=vocab, top_k=cfg.top_k, seq_len=cfg.seq_len, logprob_dtype=cfg.logprob_dtype)
    id_np = np.dtype(schema[0].dtype)
    batches = [(torch.as_tensor(ids_all[b:b + cfg.batch_size], device=device),
                torch.as_tensor(lengths_all[b:b + cfg.batch_size], device=device, dtype=torch.long),
                torch.as_tensor(trained_all[b:b + cfg.batch_size], device=device))
               for b in range(0, len(ids_all), cfg.batch_size)]

    def way_build_cache() -> dict:
        job = stage.open_job(cfg)  # set-up: --overwrite empties the folder, the teacher is loaded
        t0 = now()
        stage.teach_shards(job)
        manifest = stage.finish_cache(job)
        dt = now() - t0
        assert manifest.num_tokens == tokens, (manifest.num_tokens, tokens)
        return {"s": dt, "bytes_per_token": manifest.bytes_per_token}

    @torch.no_grad()
    def way_bare() -> dict:
        t0 = now()
        for ids, lengths, _ in batches:
            attention = (torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]).long()
            model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        mem.sync()
        return {"s": now() - t0}

    @torch.no_grad()
    def way_split() -> dict:
        times = dict.fromkeys(SPLIT, 0.0)
        t = now()

        def lap(name):
            nonlocal t
            mem.sync()
            t2 = now()
            if name:
                times[name] += t2 - t
            t = t2

        parts = {f.name: [] for f in schema if f.per_position}
        t0 = now()
        for ids, lengths, trained in batches:
            lap(None)  # restarts the clock
            positions = torch.arange(ids.shape[1], device=device)
            attention = (positions[None, :] < lengths[:, None]).long()
            h = hidden_states(backbone, ids, attention)[:, :-1]
            lap("forward")
            lp, top, label_lp = topk_logprobs(h[trained], ids[:, 1:][trained], head, cfg.top_k, chunk)  # (N, ...)
            lap("head")
            lp, top, label_lp = lp.cpu(), top.cpu(), label_lp.cpu()
            lap("d2h")
            parts["topk_ids"].append(top.numpy().astype(id_np))
            for name, a in encode_logprobs(lp.numpy(), cfg.logprob_dtype).items():
                parts[name].append(a)
            parts["label_logprob"].append(label_lp.numpy())
            lap("encode")
        out = {"input_ids": ids_all.astype(id_np), "length": lengths_all.astype(np.int32),
               "label_mask": trained_all.astype(np.uint8)}
        out.update({k: np.concatenate(v) for k, v in parts.items()})
        folder = work / "split"
        shutil.rmtree(folder, ignore_errors=True)
        writer = CacheWriter(folder, fmt=cfg.format, schema=schema, identity={"bench": "split"})
        lap(None)
        writer.write_shard(0, out)
        lap("write")
        return {"s": now() - t0, **{f"{k}_s": v for k, v in times.items()}}

    ways = {"build_cache": way_build_cache, "bare": way_bare, "split": way_split}
    mem.mark()
    way_bare()  # warm-up: first-call allocations and kernel selection, not measured
    results = {w: [] for w in WAYS}
    for rep in range(spec["repeats"]):
        order = WAYS[rep % 3:] + WAYS[:rep % 3]
        for w in order:
            results[w].append(ways[w]())

    def tps(w):
        return [tokens / r["s"] for r in results[w]]

    ratio = [b["s"] / c["s"] for b, c in zip(results["bare"], results["build_cache"])]  # per repeat: drift cancels
    return {
        "tokens": tokens,
        "sequences": len(ids_all),
        "batches": len(batches),
        "runs": results,
        "tokens_per_s": {w: median(tps(w)) for w in WAYS},
        "ratio_build_cache_to_bare": median(ratio),
        "ratio_per_repeat": ratio,
        "split_s": {p: median(r[f"{p}_s"] for r in results["split"]) for p in SPLIT},
        "bytes_per_token": results["build_cache"][0]["bytes_per_token"],
        "memory": mem.report(),
        "dtype": str(dtype).removeprefix("torch."),
    }


# -- the cache section of bench/run.py --------------------------------------------------------------
def section_cache(args, inputs: benchlib.Inputs) -> dict:
    spec = {"work": str(inputs.work / "cache-stage"), "model": inputs.model, "data": inputs.data,
            "seq_len": args.seq_len, "top_k": args.top_k, "batch": args.batch, "sequences": args.sequences,
            "repeats": args.repeats or 3, "device": inputs.device}
    r = benchlib.run_child("cache_stage.py", spec, inputs.work / "logs" / "cache-stage.log")
    say(f"  cache stage: build_cache {r['tokens_per_s']['build_cache']:,.0f} tok/s, bare forward "
        f"{r['tokens_per_s']['bare']:,.0f} tok/s, ratio {r['ratio_build_cache_to_bare']:.3f}")
    return r | {"seq_len": args.seq_len, "top_k": args.top_k, "batch": args.batch, "repeats": spec["repeats"]}


def table(c: dict, results: dict) -> list[str]:
    out = [f"### Cache stage ({c['sequences']} sequences x {c['seq_len']}, {c['tokens']:,} tokens, k {c['top_k']}, "
           f"batch {c['batch']}, teacher {c['dtype']}, {c['repeats']} repeats)\n",
           "| path | tokens/s | x bare forward |",
           "|---|---|---|"]
    bare = c["tokens_per_s"]["bare"]
    for w, name in (("bare", "bare teacher forward (model(...).logits)"), ("build_cache", "`build_cache` (real)"),
                    ("split", "inner loop re-run phase by phase")):
        out.append(f"| {name} | {fmt(c['tokens_per_s'][w], 0)} | {fmt(c['tokens_per_s'][w] / bare)} |")
    out.append(f"\nRatio of the medians within each repeat, build_cache / bare: **{fmt(c['ratio_build_cache_to_bare'])}**"
               f" (per repeat: {', '.join(fmt(x) for x in c['ratio_per_repeat'])}).\n")
    total = sum(c["split_s"].values())
    out += ["| phase | s | share |", "|---|---|---|"]
    out += [f"| {p} | {fmt(v)} | {fmt(100 * v / total, 1)}% |" for p, v in c["split_s"].items()]
    return out + [""]


def verdicts(c: dict) -> list[dict]:
    r = c["ratio_build_cache_to_bare"]
    return [verdict("cache stage >= 0.9 x bare teacher forward", r, r >= 0.9, f"{r:.3f} x")]


SECTION = benchlib.Section("cache", section_cache, table, verdicts)


if __name__ == "__main__":
    benchlib.child_main(run)
