"""One memory option compared side by side: the same runs with each value of one setting, alternating, in one run.

The memory section (bench/run.py --sections memory) measures every configuration once under one allocator and one
--chunk-size. This varies one setting of a few of its rows instead, each value in its own process
(bench/memory_step.py), the values alternating within each repeat so that a busy moment hits them alike, and prints
peak memory, `mft train --plan`'s estimate and step time, each value's as a ratio to the first value's in the same
repeat. For example:

    python bench/memory_ab.py --model assets/model --seq-len 2048 --vary cpu_allocator=default,lean \\
        --rows ft-hf:full,mft-cache:full,ft-hf:lora+ckpt,mft-cache:lora+ckpt,mft-cache:lora+bf16+ckpt,mft-online:lora+bf16+ckpt
    python bench/memory_ab.py --model assets/gemma/model --seq-len 2048 --vary chunk_size=1024,256 \\
        --rows mft-cache:lora+bf16+ckpt --repeats 2

Rows are MODE:VARIANT with the memory section's modes (ft-hf, ft, mft-cache, mft-online) and variants (full,
full+ckpt, lora, lora+ckpt, lora+bf16, lora+bf16+ckpt). Settings that can vary: cpu_allocator (default, lean),
chunk_size (positions per chunk of the fused loss). Writes --out (JSON) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ROOT  # noqa: E402
from memory_step import MODES, VARIANTS, memory_spec, plan_estimate  # noqa: E402
from train_step import MODE_NAMES, build_train_cache  # noqa: E402

VARIES = {"cpu_allocator": str, "chunk_size": int}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "assets" / "model"), help="the model folder (default: the demo's)")
    p.add_argument("--data", default=str(ROOT / "assets" / "data" / "licenses_train.jsonl"),
                   help="text the cache is built from (default: the demo's finetuning set)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rows", required=True, help="comma-separated MODE:VARIANT, e.g. mft-cache:lora+ckpt")
    p.add_argument("--vary", required=True, help="SETTING=V1,V2,...: cpu_allocator=default,lean or chunk_size=1024,256")
    p.add_argument("--allocator", default="lean", choices=("default", "lean"), help="when cpu_allocator is not varied")
    p.add_argument("--chunk-size", type=int, default=1024, help="when chunk_size is not varied")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1: AdamW's state comes after one)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--work", default="/tmp/bench-memory-ab", help="caches and logs")
    p.add_argument("--out", default=str(ROOT / "bench" / "memory_ab.json"))
    args = p.parse_args(argv)
    setting, _, values = args.vary.partition("=")
    if setting not in VARIES or not values:
        p.error(f"--vary: SETTING=V1,V2 with SETTING one of {', '.join(VARIES)}; got {args.vary!r}")
    args.setting, args.values = setting, [VARIES[setting](v) for v in values.split(",")]
    args.row_list = []
    for row in args.rows.split(","):
        mode, _, variant = row.partition(":")
        if mode not in MODES or variant not in VARIANTS:
            p.error(f"--rows: {row!r} is not MODE:VARIANT (modes {', '.join(MODES)}; "
                    f"variants {', '.join(VARIANTS)})")
        args.row_list.append((mode, variant))
    args.warmup = max(args.warmup, 1)
    return args


def spec_of(args, cache: Path, mode: str, variant: str, value) -> dict:
    spec = memory_spec(mode, variant, model=args.model, cache=cache, warmup=args.warmup, steps=args.steps,
                       device="cpu", top_k=args.top_k, allocator=args.allocator, chunk_size=args.chunk_size)
    return {**spec, args.setting: value}


def measure(args) -> list[dict]:
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    cache_args = SimpleNamespace(top_k=args.top_k, batch=1)  # what build_train_cache reads when given a length and a count
    cache = build_train_cache(cache_args, work, args.model, args.data, "cpu", out=work / f"cache-{args.seq_len}",
                              seq_len=args.seq_len, sequences=args.warmup + args.steps + 2)
    results, profiles = [], {}
    for rep in range(args.repeats):
        for mode, variant in args.row_list:
            for value in args.values:  # alternating: each value of a row right after the other
                spec = spec_of(args, cache, mode, variant, value)
                log = work / "logs" / f"{mode}-{variant}-{args.setting}-{value}-{rep}.log"
                r = benchlib.run_child("memory_step.py", spec, log)
                est = plan_estimate(spec, args.seq_len, "cpu", profiles)
                results.append({"repeat": rep, "mode": mode, "variant": variant, "value": value,
                                "peak_mb": r["memory"]["delta_mb"], "estimate_mb": est["total"] / 2**20,
                                "step_s": median(r["step_s"])})
                print(f"  {mode:10} {variant:15} {args.setting}={value}: peak {results[-1]['peak_mb']:7.0f} MB, "
                      f"estimate {results[-1]['estimate_mb']:7.0f} MB, step {results[-1]['step_s']:.2f} s", flush=True)
    return results


def table(args, results: list[dict]) -> str:
    """Per row and value: the median peak, estimate and step over repeats, and the ratios to the first value's."""
    first = args.values[0]
    out = [f"| mode | variant | {args.setting} | peak MB | x {first} | --plan MB | estimate / peak | step s | x {first} |",
           "|---|---|---|---|---|---|---|---|---|"]
    for mode, variant in args.row_list:
        def of(value, key):
            return [r[key] for r in results if (r["mode"], r["variant"], r["value"]) == (mode, variant, value)]
        for value in args.values:
            peak, est, step = median(of(value, "peak_mb")), median(of(value, "estimate_mb")), median(of(value, "step_s"))
            # ratios within each repeat, then their median: a busy moment shared by both values cancels
            peak_x = median(a / b for a, b in zip(of(value, "peak_mb"), of(first, "peak_mb")))
            step_x = median(a / b for a, b in zip(of(value, "step_s"), of(first, "step_s")))
            out.append(f"| {MODE_NAMES[mode]} | {variant} | {value} | {peak:,.0f} | {peak_x:.2f} | {est:,.0f} | "
                       f"{est / peak:.3f} | {step:.2f} | {step_x:.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    machine = benchlib.machine_info()  # before measuring: the tree and the load the run started with
    print(f"memory A/B: {args.model} at {args.seq_len} tokens, batch 1, {args.setting} in {args.values}, "
          f"{args.repeats} repeat(s); on 2 cores run nothing else meanwhile")
    results = measure(args)
    md = table(args, results)
    print("\n" + md)
    Path(args.out).write_text(json.dumps({"command": "python bench/memory_ab.py " + " ".join(sys.argv[1:]),
                                          "machine": machine,
                                          "setting": args.setting, "values": args.values, "results": results,
                                          "table": md}, indent=1) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
