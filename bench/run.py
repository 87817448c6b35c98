"""mft-cache benchmarks: `python bench/run.py` (or `make bench`) prints markdown tables and writes
bench/results.json (every number, the machine, the command) and BENCHMARKS.md, generated from it.

BENCHMARKS.md records the git commit it measured. A full run refuses to start on a tree with uncommitted
changes (--allow-dirty measures anyway and marks every page it writes as such); --quick writes under --work
only. Run it with nothing else on the machine: the load average is recorded, and a busy start is flagged
on the page. `--render results.json` rewrites the page from a results file without measuring.

Sections (--sections, comma-separated; default train, cache, storage and scaling):
  train    step time and peak memory of plain FT with transformers' loss, FT through our chunked loss,
           cached MFT and online MFT (each mode a fresh process), and the step's phases; with bfloat16 in --dtypes,
           --bf16-modes again under bf16 autocast over float32 weights (`mft train --mixed-precision bf16`)
  cache    stage one's throughput (the real build_cache) against a bare teacher forward, phase by phase, for a
           teacher loaded in each of --dtypes (`mft cache --dtype`)
  storage  bytes/token and write/read throughput per backend, --logprob-dtype and k
  scaling  step time and peak memory against sequence length and vocabulary size (tiny Llamas from config)
  memory   (only when named: it is long) peak memory and step time of each memory option of `mft train` (LoRA,
           --gradient-checkpointing, a bf16 base) for FT with transformers' loss, our FT, cached and online MFT,
           on the demo's SmolLM2-135M and Gemma-3-270M at 256 and 2,048 tokens, batch 1, each in a fresh process,
           beside `mft train --plan`'s estimate of the same run (--memory-models, --memory-seq-lens, ...); on CPU
           every row with --cpu-allocator lean unless --memory-allocator default
  ingest   (only when named: it is long) `mft cache` on a tiny model over a synthetic corpus of about 1M tokens and
           10x and 100x of it: peak RSS and tokens/s, each build a fresh process; with --ingest-baseline REV the
           same builds by that commit's code beside them (bench/ingest.py)

A run of some sections keeps the other sections of the existing results file (each section records the commit
and the command that measured it), so that BENCHMARKS.md stays one page.

Each section runs its variants interleaved (the order rotates every repeat) and reports medians and
ratios to the baseline taken within a repeat: absolute times drift on shared machines, ratios much less.
Memory: peak RSS (resource.getrusage) on CPU, torch.cuda.max_memory_allocated on CUDA.
Arithmetic (train and cache): every row's GFLOP/s (FLOPs counted as in benchlib.FLOP_FORMULA) and its share of the
machine's matmul peak in that dtype, which the section measures before its runs (benchlib.matmul_peak).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import cache_stage  # noqa: E402
import ingest  # noqa: E402
import memory_step  # noqa: E402
import scaling  # noqa: E402
import storage_io  # noqa: E402
import train_step  # noqa: E402
from benchlib import ROOT, say  # noqa: E402

# The sections, in the order they run and their tables appear. Each is a benchlib.Section defined beside the child
# script it runs (scaling.py runs train_step.py's), with its flags, run, table and verdicts.
SECTIONS = {s.name: s for s in (train_step.SECTION, cache_stage.SECTION, storage_io.SECTION, scaling.SECTION,
                                memory_step.SECTION, ingest.SECTION)}
DEFAULT_SECTIONS = tuple(name for name, s in SECTIONS.items() if s.default)
# The page's verdicts: the training targets first, then memory and ingestion, then the cache stage and storage.
VERDICT_ORDER = ("train", "memory", "ingest", "cache", "storage", "scaling")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test in about a minute")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)}; the others "
                   "run only when named)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--model", default="", help="model for train/cache/storage (default: assets/model, else a tiny Llama)")
    p.add_argument("--data", default="", help="documents (default: assets/data/licenses_train.jsonl, else synthetic)")
    p.add_argument("--batch", type=int, default=0, help="sequences per step / teacher batch (default 4; quick 2)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default 256; quick 64)")
    p.add_argument("--top-k", type=int, default=32, help="k of the caches of train and cache sections")
    p.add_argument("--dtypes", default="", help="train and cache: comma-separated dtypes of the rows, float32 first "
                   f"and bfloat16 beside it (default: {','.join(benchlib.DTYPES)} where the device computes bf16 natively, a "
                   "CUDA GPU or a CPU with AMX-BF16 or AVX512-BF16 unless MFT_CPU_BF16=0; float32 elsewhere)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default: 2 train and scaling, 3 cache and storage; quick 1)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per training process (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--sequences", type=int, default=0, help="sequences the cache/storage sections read (default 16)")
    p.add_argument("--work", default=str(ROOT / "bench" / "out"), help="scratch folder (caches, logs, profiles)")
    p.add_argument("--results", default="", help="results JSON to write (default bench/results.json; with --quick "
                   "WORK/results.json)")
    p.add_argument("--markdown", default="", help="page to write (default: BENCHMARKS.md at the repository root; "
                   "<work>/BENCHMARKS.md with --quick)")
    p.add_argument("--allow-dirty", action="store_true", help="measure a tree with uncommitted changes (the page says so)")
    p.add_argument("--render", default="", help="measure nothing: print the tables and write --markdown from this results.json")
    for section in SECTIONS.values():
        if section.flags:
            section.flags(p.add_argument_group(f"{section.name} section"))
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.dtypes and (args.dtypes[0] != "float32" or not set(args.dtypes) <= set(benchlib.DTYPES)
                        or len(set(args.dtypes)) != len(args.dtypes)):
        p.error(f"--dtypes: float32 (the baseline of every ratio) first, then bfloat16 or nothing; got {args.dtypes}")
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    q = args.quick
    args.batch = args.batch or (2 if q else 4)
    args.seq_len = args.seq_len or (64 if q else 256)
    args.repeats = args.repeats or (1 if q else 0)
    args.steps = args.steps or 2
    args.sequences = args.sequences or (8 if q else 16)
    args.results = args.results or str(Path(args.work) / "results.json" if q else ROOT / "bench" / "results.json")
    for section in SECTIONS.values():
        if section.resolve:
            section.resolve(args, p.error)
    return args


def resolve_inputs(args, work: Path) -> tuple[str, str, str]:
    """(model, data, what they are)."""
    assets_model, assets_data = ROOT / "assets" / "model", ROOT / "assets" / "data" / "licenses_train.jsonl"
    if args.model:
        return args.model, args.data or str(assets_data), args.model
    if not args.quick and (assets_model / "config.json").exists() and assets_data.exists():
        return str(assets_model), args.data or str(assets_data), "assets/model (the demo's SmolLM2-135M, fp32)"
    if args.quick:
        model = benchlib.make_tiny_model(work / "models" / "tiny-quick", vocab_size=512, hidden=64, layers=2)
        what = "a tiny Llama from config (vocab 512, hidden 64, 2 layers)"
    else:
        model = benchlib.make_tiny_model(work / "models" / "tiny-fallback", vocab_size=4096, hidden=256, layers=4)
        what = "a tiny Llama from config (vocab 4096, hidden 256, 4 layers): assets/ is absent"
    data = args.data or str(benchlib.write_texts(work / "data" / "synthetic.jsonl", 200, seed=1))
    return str(model), data, what


def measured(results: dict, args) -> dict:
    """What a section records of the run that measured it (a later run of other sections keeps it)."""
    mi = results["machine"]
    return {"command": results["command"], "commit": mi["git_commit"], "dirty": mi["git_dirty"],
            "load_average_at_start": mi.get("load_average_at_start"), "date": time.strftime("%Y-%m-%d")}


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name



def tables(results: dict) -> str:
    s = results["sections"]
    return "\n".join(line for name, section in SECTIONS.items() if name in s for line in section.table(s[name], results))


def verdicts(results: dict) -> list[dict]:
    """Each target of the issue against what was measured; "info" rows are comparisons, not targets."""
    s = results["sections"]
    return [v for name in VERDICT_ORDER if name in s for v in SECTIONS[name].verdicts(s[name])]


def warnings_of(results: dict) -> list[str]:
    """What makes a page unfit to quote: uncommitted changes, other work on the machine, a quick run."""
    mi, out = results["machine"], []
    if mi.get("git_dirty"):
        out.append("measured on a tree with uncommitted changes: not a measurement of any commit")
    load = (mi.get("load_average_at_start") or [0])[0]
    if load > 0.5 * max(mi.get("cores_usable") or 1, 1):
        out.append(f"the machine was busy when the run started (load average {load:.1f} on "
                   f"{mi.get('cores_usable')} cores): other jobs may have shared the cores")
    if results.get("quick"):
        out.append("--quick: tiny models and few steps, a smoke test; its numbers mean nothing")
    return out


def sections_from_other_runs(results: dict) -> list[str]:
    """Lines naming the sections that an earlier run measured (kept by a run of other sections)."""
    mi, out = results["machine"], []
    for name, section in results["sections"].items():
        m = section.get("measured") or {}
        if m and (m.get("commit") != mi["git_commit"] or m.get("command") != results["command"]):
            out.append(f"- `{name}`: measured at git {str(m.get('commit'))[:10]}"
                       f"{' (with uncommitted changes)' if m.get('dirty') else ''} by `{m.get('command')}`"
                       + (f" on {m['date']}" if m.get("date") else ""))
    return ["", "Sections kept from earlier runs of other sections:", "", *out] if out else []


def markdown(results: dict) -> str:
    mi = results["machine"]
    warn = warnings_of(results)
    lines = ["# Benchmarks", "", "Generated by `bench/run.py` from `bench/results.json`; do not edit by hand.", ""]
    lines += ["\n>\n".join(f"> **Not for quoting: {w}.**" for w in warn), ""] if warn else []
    lines += [f"Command: `{results['command']}` ({results['wall_s'] / 60:.1f} min).", "",
             f"Machine: {mi['cpu']}, {mi['cores_usable']} usable cores ({mi['torch_threads']} torch threads), "
             f"{mi['memory_gb']} GB RAM, GPU: {mi['gpu'] or 'none'}; device `{results['device']}`. "
             f"Python {mi['python']}, torch {mi['torch']}, transformers {mi['transformers']}, accelerate "
             f"{mi['accelerate']}, zarr {mi['zarr']}, pyarrow {mi['pyarrow']}; git {str(mi['git_commit'])[:10]}"
             f"{' (with uncommitted changes)' if mi['git_dirty'] else ''}."
             + (f" Load average (1 min) {mi['load_average_at_start'][0]:.1f} at the start, "
                f"{mi['load_average_at_end'][0]:.1f} at the end." if mi.get("load_average_at_end") else ""),
             *sections_from_other_runs(results),
             "", "## Verdicts", "",
             "| target | measured | met |", "|---|---|---|"]
    for v in results["verdicts"]:
        met = "(comparison)" if v["met"] is None else "yes" if v["met"] else "**no**"
        lines.append(f"| {v['target']} | {v['detail']} | {met} |")
    lines += ["", "## Tables", "", tables(results)]
    return "\n".join(lines) + "\n"



def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        results["verdicts"] = verdicts(results)
        md = Path(args.markdown) if args.markdown else ROOT / "BENCHMARKS.md"
        md.write_text(markdown(results))
        say(tables(results))
        return results
    if not args.quick and not args.allow_dirty and benchlib.machine_info()["git_dirty"]:
        sys.exit("bench/run.py: the tree has uncommitted changes; commit them first (BENCHMARKS.md records the "
                 "commit it measured), or pass --allow-dirty to measure anyway with the page marked as such")
    t0 = time.perf_counter()
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = resolve_device(args.device)
    args.dtypes = args.dtypes or benchlib.default_dtypes(device)
    model, data, what = resolve_inputs(args, work)
    inputs = benchlib.Inputs(work, model, data, device)
    say(f"mft-cache benchmarks: sections {','.join(args.sections)} on {device}; model {what}")
    results = {"command": " ".join(["python", "bench/run.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
               "quick": args.quick, "device": device, "machine": benchlib.machine_info(),
               "inputs": {"model": model, "model_what": what, "data": data}, "sections": {}}
    for name, section in SECTIONS.items():
        if name not in args.sections:
            continue
        say(f"[{name}]")
        ts = time.perf_counter()
        r = section.run(args, inputs)
        results["sections"][name] = r | {"wall_s": time.perf_counter() - ts, "measured": measured(results, args)}
        if section.finish:
            section.finish(results["sections"][name], args, measured(results, args))
    results["wall_s"] = time.perf_counter() - t0
    if not args.quick and Path(args.results).exists():  # keep the sections this run did not measure
        old = json.loads(Path(args.results).read_text())
        for name, kept in old.get("sections", {}).items():
            if name not in results["sections"]:
                kept.setdefault("measured", {"command": old.get("command"), "commit": old["machine"]["git_commit"],
                                             "dirty": old["machine"]["git_dirty"]})
                results["sections"][name] = kept
        results["sections"] = {k: results["sections"][k] for k in SECTIONS if k in results["sections"]}
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["verdicts"] = verdicts(results)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    md = Path(args.markdown) if args.markdown else work / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md"
    md.write_text(markdown(results))
    say("\n" + tables(results))
    for w in warnings_of(results):
        say(f"WARNING: {w}")
    for v in results["verdicts"]:
        say(f"{'INFO' if v['met'] is None else 'MET ' if v['met'] else 'MISS'}  {v['target']}: {v['detail']}")
    say(f"\nresults: {path}; markdown: {md}; {results['wall_s'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
