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

import dataclasses
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
    from mft_cache.models import DTYPES, backbone_and_head, hidden_states, load_model, load_tokenizer, resolve_device
    from mft_cache.models import resolve_dtype
    from mft_cache.pipeline.teacher import auto_chunk_tokens, topk_logprobs
    from mft_cache.rows import build_sequences
    from mft_cache.storage import CacheWriter, cache_schema
    from mft_cache.storage.schema import encode_logprobs

    work = Path(spec["work"])
    device = resolve_device(spec.get("device", "auto"))
    dtypes = spec.get("dtypes") or [str(resolve_dtype("auto", device)).removeprefix("torch.")]
    mem = Memory(device)
    base = stage.CacheConfig(model=spec["model"], data=spec["data"], out=str(work / "cache"), seq_len=spec["seq_len"],
                             top_k=spec["top_k"], batch_size=spec["batch"], max_sequences=spec["sequences"],
                             format=spec.get("format", "zarr"), logprob_dtype=spec.get("logprob_dtype", "float16"),
                             device=str(device), overwrite=True)
    tokenizer = load_tokenizer(base.model)
    packed, _ = build_sequences(base.data, tokenizer, base.seq_len, base.text_field, base.split)
    packed.truncate(base.max_sequences)
    ids_all, lengths_all, trained_all = packed.input_ids, packed.lengths, packed.label_mask
    tokens = int(trained_all.sum())
    run_positions = int(ids_all.size)  # what the backbone runs over: every position of every row
    batches = [(torch.as_tensor(ids_all[b:b + base.batch_size], device=device),
                torch.as_tensor(lengths_all[b:b + base.batch_size], device=device, dtype=torch.long),
                torch.as_tensor(trained_all[b:b + base.batch_size], device=device))
               for b in range(0, len(ids_all), base.batch_size)]

    def teacher(dtype: str):
        """The three ways for a teacher in `dtype` (`mft cache --dtype DTYPE`), and its FLOPs per way."""
        cfg = dataclasses.replace(base, dtype=dtype, out=str(work / f"cache-{dtype}"))
        model = load_model(cfg.model, DTYPES[dtype], device).eval()
        backbone, head = backbone_and_head(model)
        shape = benchlib.model_shape(model)
        chunk = cfg.chunk_tokens or auto_chunk_tokens(shape["vocab"])
        schema = cache_schema(vocab_size=shape["vocab"], top_k=cfg.top_k, seq_len=cfg.seq_len,
                              logprob_dtype=cfg.logprob_dtype)
        id_np = np.dtype(schema[0].dtype)

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
            folder = work / f"split-{dtype}"
            shutil.rmtree(folder, ignore_errors=True)
            writer = CacheWriter(folder, fmt=cfg.format, schema=schema, identity={"bench": "split"})
            lap(None)
            writer.write_shard(0, out)
            lap("write")
            return {"s": now() - t0, **{f"{k}_s": v for k, v in times.items()}}

        # the output layer runs at the trained positions in build_cache and split, at every position in model(...)
        flops = {w: benchlib.forward_flops(shape, run_positions, run_positions if w == "bare" else tokens, cfg.seq_len)
                 for w in WAYS}
        return {"build_cache": way_build_cache, "bare": way_bare, "split": way_split}, flops, shape

    ways, flops, shapes = {}, {}, {}
    mem.mark()
    for d in dtypes:
        ways[d], flops[d], shapes[d] = teacher(d)
        ways[d]["bare"]()  # warm-up: first-call allocations and kernel selection, not measured
    results = {d: {w: [] for w in WAYS} for d in dtypes}
    pairs = [(d, w) for w in WAYS for d in dtypes]  # a way's dtypes side by side, so their ratio sees the same load
    for rep in range(spec["repeats"]):
        for d, w in pairs[rep % len(pairs):] + pairs[:rep % len(pairs)]:
            results[d][w].append(ways[d][w]())

    def record(d: str) -> dict:
        runs = results[d]
        ratio = [b["s"] / c["s"] for b, c in zip(runs["bare"], runs["build_cache"])]  # per repeat: drift cancels
        tps = {w: median(tokens / r["s"] for r in runs[w]) for w in WAYS}
        return {
            "dtype": d,
            "runs": runs,
            "tokens_per_s": tps,
            "ratio_build_cache_to_bare": median(ratio),
            "ratio_per_repeat": ratio,
            "split_s": {p: median(r[f"{p}_s"] for r in runs["split"]) for p in SPLIT},
            "bytes_per_token": runs["build_cache"][0]["bytes_per_token"],
            "flops": flops[d],
            "gflops": {w: flops[d][w] * tps[w] / tokens / 1e9 for w in WAYS},
        }

    out = {"tokens": tokens, "positions": run_positions, "sequences": len(ids_all), "batches": len(batches),
           "shape": shapes[dtypes[0]], **record(dtypes[0]), "memory": mem.report()}
    for d in dtypes[1:]:
        r = record(d)
        # this dtype's build_cache throughput over the first dtype's, within each repeat
        per = [a["s"] / b["s"] for a, b in zip(results[dtypes[0]]["build_cache"], results[d]["build_cache"])]
        out[d] = r | {"speedup_per_repeat": per, "speedup": median(per)}
    return out


# -- the cache section of bench/run.py --------------------------------------------------------------
def section_cache(args, inputs: benchlib.Inputs) -> dict:
    peaks = benchlib.matmul_peaks(args.dtypes, inputs.device, args.quick)
    spec = {"work": str(inputs.work / "cache-stage"), "model": inputs.model, "data": inputs.data,
            "seq_len": args.seq_len, "top_k": args.top_k, "batch": args.batch, "sequences": args.sequences,
            "repeats": args.repeats or 3, "device": inputs.device, "dtypes": args.dtypes}
    r = benchlib.run_child("cache_stage.py", spec, inputs.work / "logs" / "cache-stage.log")
    peaks = benchlib.best_peaks(peaks, benchlib.matmul_peaks(args.dtypes, inputs.device, args.quick))
    for d in args.dtypes:
        x = r if d == r["dtype"] else r[d]
        x["peak_share"] = {w: g / peaks[d]["gflops"] for w, g in x["gflops"].items()}
        say(f"  cache stage, {d} teacher: build_cache {x['tokens_per_s']['build_cache']:,.0f} tok/s "
            f"({x['gflops']['build_cache']:,.1f} GFLOP/s, {100 * x['peak_share']['build_cache']:.0f}% of peak), bare "
            f"forward {x['tokens_per_s']['bare']:,.0f} tok/s, ratio {x['ratio_build_cache_to_bare']:.3f}")
    return r | {"seq_len": args.seq_len, "top_k": args.top_k, "batch": args.batch, "repeats": spec["repeats"],
                "peaks": peaks}


def teachers(c: dict) -> list[dict]:
    """The section's teachers: the first dtype's record is the section's own, the others under their dtype."""
    return [c] + [c[d] for d in benchlib.DTYPES if d != c["dtype"] and d in c]


def table(c: dict, results: dict) -> list[str]:
    ts = teachers(c)
    flops = "peaks" in c  # a run that measured the matmul peak: GFLOP/s and its share beside every row
    out = [f"### Cache stage ({c['sequences']} sequences x {c['seq_len']}, {c['tokens']:,} tokens, k {c['top_k']}, "
           f"batch {c['batch']}, teacher {' and '.join(t['dtype'] for t in ts)}, {c['repeats']} repeats)\n",
           "| teacher | path | tokens/s | x bare forward | GFLOP/s | % of the dtype's matmul peak |" if flops else
           "| path | tokens/s | x bare forward |",
           "|---|---|---|---|---|---|" if flops else "|---|---|---|"]
    for t in ts:
        bare = t["tokens_per_s"]["bare"]
        for w, name in (("bare", "bare teacher forward (model(...).logits)"), ("build_cache", "`build_cache` (real)"),
                        ("split", "inner loop re-run phase by phase")):
            cells = [name, fmt(t["tokens_per_s"][w], 0), fmt(t["tokens_per_s"][w] / bare)]
            if flops:
                cells = [t["dtype"], *cells, fmt(t["gflops"][w], 1), f"{fmt(100 * t['peak_share'][w], 1)}%"]
            out.append("| " + " | ".join(cells) + " |")
    for t in ts:
        of = f", {t['dtype']}" if len(ts) > 1 else ""
        out.append(f"\nRatio of the medians within each repeat, build_cache / bare{of}: "
                   f"**{fmt(t['ratio_build_cache_to_bare'])}** (per repeat: {', '.join(fmt(x) for x in t['ratio_per_repeat'])}).")
    for t in ts[1:]:
        out.append(f"\n`build_cache` tokens/s, {t['dtype']} teacher / {c['dtype']} teacher, within each repeat: "
                   f"**{fmt(t['speedup'])} x** (per repeat: {', '.join(fmt(x) for x in t['speedup_per_repeat'])}).")
    if flops:
        out.append(benchlib.peaks_note(c["peaks"], "the teacher's pass is one forward, the output layer at the trained "
                                       "positions (at every position in model(...).logits)."))
    out.append("")
    out += ["| phase | " + " | ".join(f"{t['dtype']} s | share" for t in ts) + " |" if len(ts) > 1 else
            "| phase | s | share |", "|---|" + "---|---|" * len(ts)]
    totals = [sum(t["split_s"].values()) for t in ts]
    for p in c["split_s"]:
        out.append(f"| {p} | " + " | ".join(f"{fmt(t['split_s'][p])} | {fmt(100 * t['split_s'][p] / total, 1)}%"
                                            for t, total in zip(ts, totals)) + " |")
    return out + [""]


def verdicts(c: dict) -> list[dict]:
    ts = teachers(c)
    out = []
    for t in ts:
        r = t["ratio_build_cache_to_bare"]
        of = f" ({t['dtype']} teacher)" if len(ts) > 1 else ""
        out.append(verdict(f"cache stage >= 0.9 x bare teacher forward{of}", r, r >= 0.9, f"{r:.3f} x"))
    bf16 = c.get("bfloat16")
    if bf16 is not None and c["dtype"] == "float32":
        x = bf16["speedup"]
        out.append(verdict("bf16 teacher >= 2.5 x the float32 teacher's throughput (`build_cache` tokens/s)", x, x >= 2.5,
                           f"{x:.2f} x ({bf16['tokens_per_s']['build_cache']:,.0f} vs "
                           f"{c['tokens_per_s']['build_cache']:,.0f} tokens/s)"))
        share, peak = bf16["peak_share"]["build_cache"], c["peaks"]["bfloat16"]["gflops"]
        out.append(verdict("bf16 teacher's pass (`build_cache`) >= 50% of the bf16 matmul peak", share, share >= 0.5,
                           f"{100 * share:.1f}% ({bf16['gflops']['build_cache']:,.1f} of {peak:,.1f} GFLOP/s)"))
    return out


SECTION = benchlib.Section("cache", section_cache, table, verdicts)


if __name__ == "__main__":
    benchlib.child_main(run)
