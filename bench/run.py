"""mft-cache benchmarks: `python bench/run.py` (or `make bench`) prints markdown tables and writes
bench/results.json (every number, the machine, the command) and BENCHMARKS.md, generated from it.

BENCHMARKS.md records the git commit it measured. A full run refuses to start on a tree with uncommitted
changes (--allow-dirty measures anyway and marks every page it writes as such); --quick writes under --work
only. Run it with nothing else on the machine: the load average is recorded, and a busy start is flagged
on the page. `--render results.json` rewrites the page from a results file without measuring.

Sections (--sections, comma-separated; default all):
  train    step time and peak memory of plain FT with transformers' loss, FT through our chunked loss,
           cached MFT and online MFT (each mode a fresh process), and the step's phases
  cache    stage one's throughput (the real build_cache) against a bare teacher forward, phase by phase
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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ROOT, median  # noqa: E402

SECTIONS = ("train", "cache", "storage", "scaling", "memory", "ingest")
DEFAULT_SECTIONS = ("train", "cache", "storage", "scaling")  # memory, ingest: only when named (long)
MEMORY_MODES = ("ft-hf", "ft", "mft-cache", "mft-online")
# variant: (peft, gradient checkpointing, base dtype)
MEMORY_VARIANTS = {"full": ("none", False, "float32"), "full+ckpt": ("none", True, "float32"),
                   "lora": ("lora", False, "float32"), "lora+ckpt": ("lora", True, "float32"),
                   "lora+bf16": ("lora", False, "bfloat16"), "lora+bf16+ckpt": ("lora", True, "bfloat16")}
TRAIN_MODES = ("ft-hf", "ft", "mft-cache", "mft-online")
MODE_NAMES = {"ft-hf": "FT, transformers loss (a)", "ft": "FT, our loss (b)",
              "mft-cache": "MFT from the cache (c)", "mft-online": "MFT, online teacher (d)",
              "ft+ckpt": "FT, our loss, checkpointed chunks (b')", "mft-cache+ckpt": "MFT from the cache, checkpointed chunks (c')"}
SCALING_MODES = ("ft-hf", "mft-cache", "mft-online")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test in about a minute")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but memory)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--model", default="", help="model for train/cache/storage (default: assets/model, else a tiny Llama)")
    p.add_argument("--data", default="", help="documents (default: assets/data/licenses_train.jsonl, else synthetic)")
    p.add_argument("--batch", type=int, default=0, help="sequences per step / teacher batch (default 4; quick 2)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default 256; quick 64)")
    p.add_argument("--top-k", type=int, default=32, help="k of the caches of train and cache sections")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default: 2 train and scaling, 3 cache and storage; quick 1)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per training process (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--sequences", type=int, default=0, help="sequences the cache/storage sections read (default 16)")
    p.add_argument("--seq-lens", default="", help="scaling: sequence lengths at the first vocabulary (default 128,512,1024)")
    p.add_argument("--vocabs", default="", help="scaling: vocabulary sizes at seq len 512 (or the first seq len) (default 32768,131072,262144)")
    p.add_argument("--scaling-batch", type=int, default=1, help="scaling: sequences per step")
    p.add_argument("--memory-models", default="", help="memory: comma-separated model folders (default: assets/model "
                   "and assets/gemma/model, those that exist; else --model or a tiny Llama)")
    p.add_argument("--ingest-scales", default="", help="ingest: multiples of the corpus (default 1,10,100; quick 1,2)")
    p.add_argument("--ingest-tokens", type=int, default=0, help="ingest: tokens of the 1x corpus (default 1,000,000)")
    p.add_argument("--ingest-seq-len", type=int, default=64, help="ingest: --seq-len of the builds")
    p.add_argument("--ingest-top-k", type=int, default=4, help="ingest: --top-k of the builds")
    p.add_argument("--ingest-batch-size", type=int, default=256, help="ingest: --batch-size of the builds (large: the "
                   "tiny teacher's forward would otherwise be all overhead)")
    p.add_argument("--ingest-shard-mb", type=float, default=8.0, help="ingest: --shard-mb of the builds (8: even the "
                   "1x corpus fills several shards, so what is compared is the corpus size, not a shard's)")
    p.add_argument("--ingest-baseline", default="", help="ingest: a git revision whose code builds the same caches "
                   "beside (e.g. the commit before streaming ingestion)")
    p.add_argument("--ingest-baseline-max-scale", type=int, default=10, help="ingest: the largest scale the baseline "
                   "runs at (it holds the corpus in memory)")
    p.add_argument("--memory-seq-lens", default="", help="memory: sequence lengths (default 256,2048; quick 64)")
    p.add_argument("--memory-modes", default=",".join(MEMORY_MODES), help="memory: modes, a subset of "
                   f"{','.join(MEMORY_MODES)}")
    p.add_argument("--memory-variants", default=",".join(MEMORY_VARIANTS), help="memory: variants, a subset of "
                   f"{','.join(MEMORY_VARIANTS)}")
    p.add_argument("--memory-allocator", default="lean", choices=("lean", "default"),
                   help="memory, on CPU: every row runs with `mft train --cpu-allocator` this (lean: RSS follows the "
                   "live tensors, which is what --plan estimates; default: glibc's own policy, which keeps some of "
                   "what a step freed)")
    p.add_argument("--memory-keep", action="store_true",
                   help="memory: keep the rows of the results file that this run does not measure (same allocator), "
                   "each with the commit and command that measured it, so that the long table can be measured in parts")
    p.add_argument("--unfused", action="store_true",
                   help="train: also (c) through StudentLoss's checkpointed-chunks fallback instead of the fused loss")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables of the train section")
    p.add_argument("--work", default=str(ROOT / "bench" / "out"), help="scratch folder (caches, logs, profiles)")
    p.add_argument("--results", default="", help="results JSON to write (default bench/results.json; with --quick "
                   "WORK/results.json)")
    p.add_argument("--markdown", default="", help="page to write (default: BENCHMARKS.md at the repository root; "
                   "<work>/BENCHMARKS.md with --quick)")
    p.add_argument("--allow-dirty", action="store_true", help="measure a tree with uncommitted changes (the page says so)")
    p.add_argument("--render", default="", help="measure nothing: print the tables and write --markdown from this results.json")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    q = args.quick
    args.batch = args.batch or (2 if q else 4)
    args.seq_len = args.seq_len or (64 if q else 256)
    args.repeats = args.repeats or (1 if q else 0)
    args.steps = args.steps or 2
    args.no_profile = args.no_profile or q
    args.sequences = args.sequences or (8 if q else 16)
    args.seq_lens = [int(x) for x in (args.seq_lens or ("32" if q else "128,512,1024")).split(",")]
    args.vocabs = [int(x) for x in (args.vocabs or ("1024,262144" if q else "32768,131072,262144")).split(",")]
    args.results = args.results or str(Path(args.work) / "results.json" if q else ROOT / "bench" / "results.json")
    args.ingest_scales = [int(x) for x in (args.ingest_scales or ("1,2" if q else "1,10,100")).split(",")]
    args.ingest_tokens = args.ingest_tokens or (20_000 if q else 1_000_000)
    args.memory_seq_lens = [int(x) for x in (args.memory_seq_lens or ("64" if q else "256,2048")).split(",")]
    for name, allowed in (("memory_modes", MEMORY_MODES), ("memory_variants", MEMORY_VARIANTS)):
        chosen = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        if not chosen or [x for x in chosen if x not in allowed]:
            p.error(f"--{name.replace('_', '-')}: choose from {','.join(allowed)}; got {getattr(args, name)}")
        setattr(args, name, chosen)
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


ROW_KEY = ("model", "seq_len", "mode", "variant")


def keep_memory_rows(section: dict, args, stamp: dict) -> None:
    """Stamp each new memory row with the run that measured it and its allocator; with --memory-keep, add the
    earlier rows of the results file that this run did not measure (with the allocator they ran under)."""
    for row in section["rows"]:
        row["measured"], row["cpu_allocator"] = stamp, section.get("cpu_allocator")
    if not args.memory_keep or not Path(args.results).exists():
        return
    old = json.loads(Path(args.results).read_text()).get("sections", {}).get("memory")
    if not old:
        return
    have = {tuple(r[k] for k in ROW_KEY) for r in section["rows"]}
    # rows from before the allocator was recorded ran under glibc's default
    kept = [r | {"measured": r.get("measured", old.get("measured")),
                 "cpu_allocator": r.get("cpu_allocator", old.get("cpu_allocator", "default"))}
            for r in old["rows"] if tuple(r[k] for k in ROW_KEY) not in have]
    order = {(m, s): i for i, (m, s) in enumerate(dict.fromkeys((r["model"], r["seq_len"]) for r in kept + section["rows"]))}
    section["rows"] = sorted(kept + section["rows"], key=lambda r: (order[(r["model"], r["seq_len"])],
                                                                     MEMORY_MODES.index(r["mode"]),
                                                                     list(MEMORY_VARIANTS).index(r["variant"])))
    section["kept_rows"] = len(kept)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def say(msg: str) -> None:
    print(msg, flush=True)


# -- sections ---------------------------------------------------------------------------------------
def build_train_cache(args, work: Path, model: str, data: str, device: str, out: Path | None = None,
                      seq_len: int = 0, sequences: int = 0) -> Path:
    """The cache the train (and memory) section reads, built by `mft cache` itself (once: a finished cache is kept)."""
    out = out or work / "train-cache"
    n = sequences or max(args.sequences, args.batch * (args.warmup + args.steps + 2))
    cmd = [sys.executable, "-m", "mft_cache.cli", "cache", "--model", model, "--data", data, "--out", str(out),
           "--seq-len", str(seq_len or args.seq_len), "--top-k", str(args.top_k), "--batch-size", str(min(args.batch, n)),
           "--max-sequences", str(n), "--device", device]
    log = work / "logs" / f"{out.name}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        cmd.append("--overwrite")  # another configuration or an old format in the folder: rebuild
        with open(log, "a") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"mft cache failed; see {log}")
    return out


def section_train(args, work: Path, model: str, data: str, device: str) -> dict:
    cache = build_train_cache(args, work, model, data, device)
    repeats = args.repeats or 2
    modes = TRAIN_MODES + (("mft-cache+ckpt",) if args.unfused else ())
    runs = {m: [] for m in modes}
    for rep in range(repeats):
        order = modes[rep % len(modes):] + modes[:rep % len(modes)]  # each mode takes each position in turn
        for mode in order:
            spec = {"mode": mode, "model": model, "cache": str(cache), "batch": args.batch, "warmup": args.warmup,
                    "steps": args.steps, "device": device, "tau": 0.25,
                    "profile": str(work / f"profile-train-{mode}.txt")
                    if rep == 0 and mode in ("ft-hf", "mft-cache") and not args.no_profile else None}
            r = benchlib.run_child("train_step.py", spec, work / "logs" / f"train-{mode}-{rep}.log")
            runs[mode].append(r)
            say(f"  train rep {rep} {mode:<14} step {median(r['step_s']):7.3f} s  peak {r['memory']['peak_mb']:8.0f} MB")
    return summarize_modes(runs, modes) | {"cache": str(cache), "batch": args.batch, "seq_len": args.seq_len,
                                                 "warmup_steps": args.warmup, "timed_steps": args.steps,
                                                 "repeats": repeats, "tau": 0.25, "top_k": args.top_k}


def memory_models(args, work: Path, model: str) -> list[tuple[str, str]]:
    """(folder, name) of each model the memory section measures."""
    if args.memory_models:
        given = [m for m in args.memory_models.split(",") if m.strip()]
        known = {str(ROOT / "assets" / "model"): "SmolLM2-135M", str(ROOT / "assets" / "gemma" / "model"): "Gemma-3-270M"}
        return [(m, known.get(str(Path(m).resolve())) or "/".join(Path(m).parts[-2:])) for m in given]
    if not args.quick:
        found = [(str(ROOT / p), name) for p, name in (("assets/model", "SmolLM2-135M"), ("assets/gemma/model", "Gemma-3-270M"))
                 if (ROOT / p / "config.json").exists()]
        if found:
            return found
    return [(model, Path(model).name)]


def plan_estimate(spec: dict, seq_len: int, device: str, profiles: dict) -> dict:
    """`mft train --plan`'s estimate of the run a memory child measures (the same TrainConfig)."""
    from transformers import AutoConfig

    from memory_step import train_config
    from mft_cache.trainer.plan import activation_profile, estimate, model_shape

    cfg = train_config(spec)
    key = (spec["model"], cfg.peft, cfg.base_dtype)
    if key not in profiles:
        config = AutoConfig.from_pretrained(spec["model"])
        profiles[key] = (model_shape(config, cfg), activation_profile(config, cfg))
    shape, acts = profiles[key]
    top_k = spec["top_k"] if spec["mode"] in ("ft", "mft-cache") else 0
    return estimate(shape, acts, cfg, seq_len, device.split(":")[0], top_k)


def memory_spec(mode: str, variant: str, *, model: str, cache: Path, warmup: int, steps: int, device: str,
                top_k: int, allocator: str, chunk_size: int = 1024) -> dict:
    """What bench/memory_step.py runs for one (mode, variant): batch 1, the variant's adapter, checkpointing and dtype."""
    peft, ckpt, dtype = MEMORY_VARIANTS[variant]
    return {"mode": mode, "model": model, "cache": str(cache), "batch": 1, "warmup": warmup, "steps": steps,
            "device": device, "peft": peft, "checkpointing": ckpt, "base_dtype": dtype, "top_k": top_k,
            "cpu_allocator": allocator, "chunk_size": chunk_size}


def section_memory(args, work: Path, model: str, data: str, device: str) -> dict:
    rows, profiles = [], {}
    # A run's peak is reached from its second step on: AdamW's state exists only after the first optimizer step, so a
    # one-step measurement of full finetuning would miss it (cached MFT at 2,048: 3,702 MB alone, 4,773 after a step).
    warmup = max(args.warmup, 1)
    for folder, name in memory_models(args, work, model):
        for seq in args.memory_seq_lens:
            cache = build_train_cache(args, work, folder, data, device, out=work / f"memory-cache-{name}-{seq}",
                                      seq_len=seq, sequences=warmup + args.steps + 2)
            base_step = None
            for mode in args.memory_modes:
                for variant in args.memory_variants:
                    peft, ckpt, dtype = MEMORY_VARIANTS[variant]
                    spec = memory_spec(mode, variant, model=folder, cache=cache, warmup=warmup, steps=args.steps,
                                       device=device, top_k=args.top_k, allocator=args.memory_allocator)
                    r = benchlib.run_child("memory_step.py", spec, work / "logs" / f"memory-{name}-{seq}-{mode}-{variant}.log")
                    est = plan_estimate(spec, seq, device, profiles)
                    m = r["memory"]
                    step = median(r["step_s"])
                    if mode == "ft-hf" and variant == "full":
                        base_step = step
                    row = {"model": name, "seq_len": seq, "mode": mode, "variant": variant, "peft": peft,
                           "checkpointing": ckpt, "base_dtype": dtype, "peak_mb": m["delta_mb"],
                           "loading_mb": m.get("loading_delta_mb"), "memory_kind": m["kind"], "step_s": step,
                           "estimate_mb": est["total"] / 2**20, "estimate_phase": est["peak_phase"],
                           "estimate_parts_mb": {k: v / 2**20 for k, v in est.items()
                                                 if isinstance(v, (int, float)) and k != "total"},
                           "ratio_estimate": est["total"] / 2**20 / m["delta_mb"], "loss": r["loss"],
                           "params": r["params"], "trainable": r["trainable"]}
                    rows.append(row)
                    say(f"  memory {name} T={seq:<5} {mode:<10} {variant:<10} peak {row['peak_mb']:8.0f} MB  "
                        f"estimate {row['estimate_mb']:8.0f} MB ({row['ratio_estimate']:.3f})  step {step:7.3f} s")
            for row in rows:  # step time against transformers' FT of the same model and length, this run
                if row["model"] == name and row["seq_len"] == seq:
                    row["step_ratio"] = row["step_s"] / base_step if base_step else None
    return {"rows": rows, "batch": 1, "warmup_steps": warmup, "timed_steps": args.steps, "top_k": args.top_k,
            "cpu_allocator": args.memory_allocator if device.startswith("cpu") else None,
            "measure": "peak RSS above the process after its imports (CPU); torch.cuda.max_memory_allocated (CUDA)"}


def summarize_modes(runs: dict, modes) -> dict:
    """Medians per mode and ratios to ft-hf taken within each repeat (then their median)."""
    base = runs["ft-hf"]
    out = {}
    for m in modes:
        rs = runs[m]
        step_ratio = [median(r["step_s"]) / median(b["step_s"]) for r, b in zip(rs, base)]
        peak_ratio = [r["memory"]["peak_mb"] / b["memory"]["peak_mb"] for r, b in zip(rs, base)]
        delta_ratio = [r["memory"]["delta_mb"] / max(b["memory"]["delta_mb"], 1e-9) for r, b in zip(rs, base)]
        out[m] = {
            "step_s": median(s for r in rs for s in r["step_s"]),
            "step_ratio": median(step_ratio),
            "step_ratio_per_repeat": step_ratio,
            "tokens_per_step": rs[0]["tokens_per_step"],
            "tokens_per_s": rs[0]["tokens_per_step"] / median(s for r in rs for s in r["step_s"]),
            "peak_mb": median(r["memory"]["peak_mb"] for r in rs),
            "baseline_mb": median(r["memory"]["baseline_mb"] for r in rs),
            "delta_mb": median(r["memory"]["delta_mb"] for r in rs),
            "peak_ratio": median(peak_ratio),
            "delta_ratio": median(delta_ratio),
            "memory_kind": rs[0]["memory"]["kind"],
            "phases_s": {p: median(x for r in rs for x in r["phases_s"][p]) for p in rs[0]["phases_s"]},
            "wait_max_s": max(x for r in rs for x in r["phases_s"]["wait"]),
            "loss": [r["loss"] for r in rs],
            "params": rs[0]["params"],
            "raw": [{k: r[k] for k in ("step_s", "phases_s", "memory")} for r in rs],
        }
    return {"modes": out}


def section_cache(args, work: Path, model: str, data: str, device: str) -> dict:
    spec = {"work": str(work / "cache-stage"), "model": model, "data": data, "seq_len": args.seq_len,
            "top_k": args.top_k, "batch": args.batch, "sequences": args.sequences, "repeats": args.repeats or 3,
            "device": device}
    r = benchlib.run_child("cache_stage.py", spec, work / "logs" / "cache-stage.log")
    say(f"  cache stage: build_cache {r['tokens_per_s']['build_cache']:,.0f} tok/s, bare forward "
        f"{r['tokens_per_s']['bare']:,.0f} tok/s, ratio {r['ratio_build_cache_to_bare']:.3f}")
    return r | {"seq_len": args.seq_len, "top_k": args.top_k, "batch": args.batch, "repeats": spec["repeats"]}


def section_storage(args, work: Path, model: str, data: str, device: str) -> dict:
    ks = [8, 16, 32, 64, 128]
    spec = {"work": str(work / "storage"), "model": model, "data": data, "seq_len": args.seq_len, "batch": args.batch,
            "sequences": args.sequences, "ks": ks, "repeats": args.repeats or 3, "device": device}
    r = benchlib.run_child("storage_io.py", spec, work / "logs" / "storage.log")
    say(f"  storage: {len(r['rows'])} configurations over {r['tokens']:,} tokens")
    return r | {"ks": ks, "repeats": spec["repeats"]}


def section_scaling(args, work: Path, device: str) -> dict:
    repeats = args.repeats or 2
    hidden, layers, k = (64, 2, 8) if args.quick else (128, 2, 32)
    base_vocab, base_seq = args.vocabs[0], (512 if 512 in args.seq_lens else args.seq_lens[0])
    points = [("seq_len", s, base_vocab) for s in args.seq_lens]
    points += [("vocab", base_seq, v) for v in args.vocabs if v != base_vocab]
    runs = {p: {m: [] for m in SCALING_MODES} for p in points}
    for rep in range(repeats):
        for i, p in enumerate(points):
            modes = SCALING_MODES[(rep + i) % 3:] + SCALING_MODES[:(rep + i) % 3]
            for mode in modes:
                _, seq, vocab = p
                spec = {"mode": mode, "vocab_size": vocab, "hidden": hidden, "layers": layers, "seq_len": seq,
                        "rows": 4 * args.scaling_batch, "top_k": k, "batch": args.scaling_batch, "warmup": 1,
                        "steps": args.steps, "device": device, "tau": 0.25, "threads": None}
                r = benchlib.run_child("train_step.py", spec, work / "logs" / f"scaling-{seq}-{vocab}-{mode}-{rep}.log")
                runs[p][mode].append(r)
                say(f"  scaling rep {rep} T={seq:<5} V={vocab:<7} {mode:<10} step {median(r['step_s']):7.3f} s  "
                    f"peak {r['memory']['peak_mb']:8.0f} MB")
    rows = []
    for p in points:
        s = summarize_modes(runs[p], SCALING_MODES)["modes"]
        for m in SCALING_MODES:
            rows.append({"axis": p[0], "seq_len": p[1], "vocab": p[2], "mode": m,
                         **{k2: v for k2, v in s[m].items() if k2 not in ("raw", "loss")}})
    return {"rows": rows, "hidden": hidden, "layers": layers, "top_k": k, "batch": args.scaling_batch,
            "repeats": repeats, "timed_steps": args.steps, "tied_embeddings": True}


# -- tables -----------------------------------------------------------------------------------------
def _f(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def tables(results: dict) -> str:
    out = []
    s = results["sections"]
    if "train" in s:
        t = s["train"]
        unit = "peak RSS MB" if t["modes"]["ft-hf"]["memory_kind"] == "rss" else "peak CUDA MB"
        out.append(f"### Training step ({results['inputs']['model_what']}; batch {t['batch']} x {t['seq_len']}, "
                   f"{t['repeats']} repeats x {t['timed_steps']} timed steps after {t['warmup_steps']} warm-up)\n")
        out.append(f"| mode | step s | x (a) | tok/s | {unit} | x (a) | above model-loaded MB | x (a) |")
        out.append("|---|---|---|---|---|---|---|---|")
        for m in t["modes"]:
            r = t["modes"][m]
            out.append(f"| {MODE_NAMES[m]} | {_f(r['step_s'])} | {_f(r['step_ratio'])} | {_f(r['tokens_per_s'], 0)} | "
                       f"{_f(r['peak_mb'], 0)} | {_f(r['peak_ratio'])} | {_f(r['delta_mb'], 0)} | {_f(r['delta_ratio'])} |")
        out.append("\nStep phases (median ms; wait = blocked on the Prefetcher for the next batch, outside the step):\n")
        phases = list(t["modes"]["ft-hf"]["phases_s"])
        out.append("| mode | " + " | ".join(phases) + " | max wait |")
        out.append("|---|" + "---|" * (len(phases) + 1))
        for m in t["modes"]:
            r = t["modes"][m]
            out.append(f"| {MODE_NAMES[m]} | " + " | ".join(_f(r["phases_s"][p] * 1000, 1) for p in phases)
                       + f" | {_f(r['wait_max_s'] * 1000, 1)} |")
        out.append("")
    if "cache" in s:
        c = s["cache"]
        out.append(f"### Cache stage ({c['sequences']} sequences x {c['seq_len']}, {c['tokens']:,} tokens, k {c['top_k']}, "
                   f"batch {c['batch']}, teacher {c['dtype']}, {c['repeats']} repeats)\n")
        out.append("| path | tokens/s | x bare forward |")
        out.append("|---|---|---|")
        bare = c["tokens_per_s"]["bare"]
        for w, name in (("bare", "bare teacher forward (model(...).logits)"), ("build_cache", "`build_cache` (real)"),
                        ("split", "inner loop re-run phase by phase")):
            out.append(f"| {name} | {_f(c['tokens_per_s'][w], 0)} | {_f(c['tokens_per_s'][w] / bare)} |")
        out.append(f"\nRatio of the medians within each repeat, build_cache / bare: **{_f(c['ratio_build_cache_to_bare'])}**"
                   f" (per repeat: {', '.join(_f(x) for x in c['ratio_per_repeat'])}).\n")
        total = sum(c["split_s"].values())
        out.append("| phase | s | share |")
        out.append("|---|---|---|")
        for p, v in c["split_s"].items():
            out.append(f"| {p} | {_f(v)} | {_f(100 * v / total, 1)}% |")
        out.append("")
    if "storage" in s:
        st = s["storage"]
        out.append(f"### Storage ({st['sequences']} sequences x {st['seq_len']}, {st['tokens']:,} tokens, "
                   f"vocab {st['vocab_size']:,}; MB/s of uncompressed row bytes; reads row by row in shuffled order "
                   f"as CacheRows does)\n")
        out.append("| format | log-probs | k | bytes/token | uncompressed | write MB/s | write tok/s | read MB/s | "
                   "read tok/s | first read (verify lazy) tok/s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in st["rows"]:
            out.append(f"| {r['format']} | {r['logprob_dtype']} | {r['k']} | {_f(r['bytes_per_token'], 1)} | "
                       f"{_f(r['raw_bytes_per_token'], 1)} | {_f(r['write_MB_s'], 1)} | {_f(r['write_tokens_s'], 0)} | "
                       f"{_f(r['read_MB_s'], 1)} | {_f(r['read_tokens_s'], 0)} | {_f(r['read_verified_tokens_s'], 0)} |")
        out.append("")
    if "scaling" in s:
        sc = s["scaling"]
        out.append(f"### Scaling (tiny Llama from config: hidden {sc['hidden']}, {sc['layers']} layers, tied embeddings; "
                   f"batch {sc['batch']}; cached MFT with synthetic top-{sc['top_k']} rows; {sc['repeats']} repeats)\n")
        out.append("| seq len | vocab | mode | step s | x FT (a) | peak MB | x (a) | above model-loaded MB | x (a) |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in sc["rows"]:
            out.append(f"| {r['seq_len']} | {r['vocab']:,} | {r['mode']} | {_f(r['step_s'])} | {_f(r['step_ratio'])} | "
                       f"{_f(r['peak_mb'], 0)} | {_f(r['peak_ratio'])} | {_f(r['delta_mb'], 0)} | {_f(r['delta_ratio'])} |")
        out.append("")
    if "memory" in s:
        mm = s["memory"]
        unit = "peak RSS MB above the imports" if mm["rows"] and mm["rows"][0]["memory_kind"] == "rss" else "peak CUDA MB"
        out.append(f"### Memory options (batch {mm['batch']}, {mm['timed_steps']} timed steps after {mm['warmup_steps']}; "
                   f"{unit}; estimate: `mft train --plan` for the same run; step time as a multiple of FT with "
                   f"transformers' loss, full weights, same model and length)\n")
        allocators = list(dict.fromkeys(r.get("cpu_allocator") for r in mm["rows"]))
        if allocators == ["lean"] or allocators == ["default"]:
            out.append(f"On the CPU every row ran with `--cpu-allocator {allocators[0]}`.\n")
        commits = list(dict.fromkeys(str((r.get("measured") or {}).get("commit"))[:10] for r in mm["rows"]))
        several = len(commits) > 1 or len(allocators) > 1
        out.append("| model | seq len | mode | variant | peak MB | estimate MB | estimate / peak | peak phase (estimate) | "
                   "loading MB | step s | x FT (a) |" + (" allocator | commit |" if several else ""))
        out.append("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if several else ""))
        for r in mm["rows"]:
            out.append(f"| {r['model']} | {r['seq_len']} | {MODE_NAMES.get(r['mode'], r['mode'])} | {r['variant']} | "
                       f"{_f(r['peak_mb'], 0)} | {_f(r['estimate_mb'], 0)} | {_f(r['ratio_estimate'])} | "
                       f"{r['estimate_phase']} | {_f(r['loading_mb'], 0)} | {_f(r['step_s'])} | {_f(r.get('step_ratio'))} |"
                       + (f" {r.get('cpu_allocator')} | {str((r.get('measured') or {}).get('commit'))[:10]} |"
                          if several else ""))
        if several:
            out.append("\nThe rows were measured in parts (`--memory-keep`), each under the allocator and at the commit "
                       "named; an estimate is of the run under its row's allocator. Step times compare only within "
                       "one commit's rows of the same model and length.")
        out.append("")
    if "ingest" in s:
        g = s["ingest"]
        out.append(f"### Ingestion (`mft cache` on a {g['model']}, --seq-len {g['seq_len']} --top-k {g['top_k']}; a "
                   f"--batch-size {g.get('batch_size')} --shard-mb {g.get('shard_mb')}; a synthetic corpus of {g['tokens_1x']:,} tokens at 1x; each build a fresh process, one thread (OMP_NUM_THREADS=1); streamed: this "
                   f"commit; previous: commit {str(g['baseline'])[:10]}, which read the whole corpus into memory)\n")
        out.append("| corpus | code | input tokens | wall s | tokens/s | x 1x | peak RSS MB | x 1x | same bytes as the "
                   "other code |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in g["rows"]:
            if "skipped" in r:
                out.append(f"| {r['scale']}x | {r['code']} | | | | | | | not run (only up to "
                           f"--ingest-baseline-max-scale){growth(g['rows'], r['code'])} |")
                continue
            same = {True: "yes", False: "**no**", None: ""}[r.get("identical_to_other_code")]
            out.append(f"| {r['scale']}x | {r['code']} | {r['input_tokens']:,} | {_f(r['wall_s'], 1)} | "
                       f"{_f(r['tokens_per_s'], 0)} | {_f(r.get('tokens_per_s_ratio_to_1x'))} | {_f(r['peak_rss_mb'], 0)} | "
                       f"{_f(r.get('rss_ratio_to_1x'))} | {same} |")
        out.append("")
    return "\n".join(out)


def growth(rows: list[dict], code: str) -> str:
    """What the measured scales of `code` say of its peak memory per corpus token (for a row not run)."""
    run = sorted((r for r in rows if r["code"] == code and "wall_s" in r), key=lambda r: r["scale"])
    if len(run) < 2:
        return ""
    a, b = run[0], run[-1]
    per_token = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (b["input_tokens"] - a["input_tokens"])
    return (f"; from {a['scale']}x to {b['scale']}x its peak grew by {per_token:.0f} bytes per corpus token, "
            f"{a['peak_rss_mb'] + per_token * (rows[-1]['scale'] - a['scale']) * a['input_tokens'] / 2**20:,.0f} MB at "
            f"{rows[-1]['scale']}x if it went on so")


def verdicts(results: dict) -> list[dict]:
    """Each target of the issue against what was measured; "info" rows are comparisons, not targets."""
    s, v = results["sections"], []

    def add(target, value, ok, detail, info=False):
        v.append({"target": target, "value": value, "met": None if info else bool(ok), "detail": detail})

    if "train" in s:
        m = s["train"]["modes"]
        a, c = m["ft-hf"], m["mft-cache"]
        add("cached MFT step time <= 1.05 x plain FT (transformers loss)", c["step_ratio"], c["step_ratio"] <= 1.05,
            f"{c['step_ratio']:.3f} x ({c['step_s']:.2f} vs {a['step_s']:.2f} s)")
        add("cached MFT peak memory <= plain FT (transformers loss)", c["peak_ratio"], c["peak_ratio"] <= 1.0,
            f"{c['peak_ratio']:.3f} x peak ({c['peak_mb']:.0f} vs {a['peak_mb']:.0f} MB); above the loaded "
            f"model {c['delta_mb']:.0f} vs {a['delta_mb']:.0f} MB ({c['delta_ratio']:.3f} x)")
        o = m["mft-online"]
        add("online MFT vs plain FT", o["step_ratio"], None,
            f"{o['step_ratio']:.3f} x step time, {100 * (o['peak_ratio'] - 1):+.1f}% peak memory", info=True)
        add("cached MFT vs online MFT", c["step_s"] / o["step_s"], None,
            f"{c['step_ratio'] / o['step_ratio']:.3f} x step time, {c['peak_mb'] / o['peak_mb']:.3f} x peak memory", info=True)
        w = c["wait_max_s"]
        add("reading the cache never stalls a step (cached MFT, longest wait for the Prefetcher)", w,
            w < 0.01 * c["step_s"], f"max wait {w * 1000:.1f} ms vs a {c['step_s'] * 1000:.0f} ms step")
        if "mft-cache+ckpt" in m:
            u = m["mft-cache+ckpt"]
            add("what the fused linear+loss changed (cached MFT, fused vs checkpointed chunks)", u["step_ratio"], None,
                f"fused {c['step_ratio']:.3f} x vs checkpointed {u['step_ratio']:.3f} x FT step time; peak "
                f"{c['peak_mb']:.0f} vs {u['peak_mb']:.0f} MB", info=True)
    if "memory" in s and s["memory"]["rows"]:
        rows = s["memory"]["rows"]
        ratios = [r["ratio_estimate"] for r in rows]
        worst = max(ratios, key=lambda x: abs(x - 1))
        by = {}
        for r in rows:
            by.setdefault(r.get("cpu_allocator") or "default", []).append(r["ratio_estimate"])
        parts = "; ".join(f"{a} allocator: {min(x):.3f} to {max(x):.3f} over {len(x)}, "
                          f"{sum(not 0.85 <= q <= 1.15 for q in x)} outside" for a, x in by.items())
        add("`mft train --plan` within 15% of the measured peak (every memory row)", worst,
            all(0.85 <= x <= 1.15 for x in ratios),
            f"estimate / measured from {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} runs ({parts})")
        pick = {(r["model"], r["seq_len"], r["mode"], r["variant"]): r for r in rows}
        for (model, seq, mode, variant), r in pick.items():
            same = (model, seq, "ft-hf", "full") in pick and \
                pick[(model, seq, "ft-hf", "full")].get("cpu_allocator") == r.get("cpu_allocator")
            if (mode, variant) == ("mft-cache", "lora+bf16+ckpt") and same:
                base = pick[(model, seq, "ft-hf", "full")]["peak_mb"]
                ratio = r["peak_mb"] / base
                add(f"{model} at {seq} tokens: cached MFT, LoRA, checkpointing, bf16 base <= 0.4 x transformers' full "
                    "FT peak", ratio, ratio <= 0.4, f"{r['peak_mb']:.0f} vs {base:.0f} MB ({ratio:.3f} x)",
                    info=not (model.lower().startswith("gemma") and seq >= 2048))
        pairs = [(r, pick[(r["model"], r["seq_len"], "mft-online", r["variant"])]) for r in rows
                 if r["mode"] == "mft-cache" and (r["model"], r["seq_len"], "mft-online", r["variant"]) in pick
                 and pick[(r["model"], r["seq_len"], "mft-online", r["variant"])].get("cpu_allocator")
                 == r.get("cpu_allocator")]
        if pairs:
            more = [o["peak_mb"] > c["peak_mb"] for c, o in pairs]
            least = min(o["peak_mb"] / c["peak_mb"] for c, o in pairs)
            add("the online teacher needs more memory than the cache in every row", least, all(more),
                f"{sum(more)} of {len(more)} rows; online / cached peak at least {least:.2f} x")
        for model, seq in sorted({(r["model"], r["seq_len"]) for r in rows}):
            trains = [r for r in rows if (r["model"], r["seq_len"]) == (model, seq) and r["mode"] == "mft-cache"]
            if trains and seq >= 2048:
                r = min(trains, key=lambda r: r["peak_mb"])
                add(f"smallest cached-MFT configuration for {model} at {seq} tokens", r["peak_mb"], None,
                    f"{r['variant']}: {r['peak_mb']:.0f} MB, step {r['step_s']:.2f} s = {r.get('step_ratio') or 0:.2f} x "
                    "transformers' full FT", info=True)
    if "ingest" in s:
        rows = [r for r in s["ingest"]["rows"] if r["code"] == "streamed" and "wall_s" in r]
        top = max(rows, key=lambda r: r["scale"])
        add(f"streamed ingestion: peak RSS at {top['scale']}x within 1.2 x of 1x", top["rss_ratio_to_1x"],
            top["rss_ratio_to_1x"] <= 1.2, f"{top['peak_rss_mb']:.0f} vs {rows[0]['peak_rss_mb']:.0f} MB "
            f"({top['rss_ratio_to_1x']:.3f} x)")
        add(f"streamed ingestion: tokens/s at {top['scale']}x do not drop (>= 0.95 x of 1x)",
            top["tokens_per_s_ratio_to_1x"], top["tokens_per_s_ratio_to_1x"] >= 0.95,
            f"{top['tokens_per_s']:,.0f} vs {rows[0]['tokens_per_s']:,.0f} tokens/s")
        same = [r.get("identical_to_other_code") for r in s["ingest"]["rows"] if "identical_to_other_code" in r]
        if same:
            add("streamed and previous code write the same bytes", all(same), all(same),
                f"{sum(same)} of {len(same)} builds identical (every shard and documents.npy)")
    if "cache" in s:
        r = s["cache"]["ratio_build_cache_to_bare"]
        add("cache stage >= 0.9 x bare teacher forward", r, r >= 0.9, f"{r:.3f} x")
    if "storage" in s:
        for r in s["storage"]["rows"]:
            if r["k"] == 32:
                add(f"<= 100 bytes/token at k=32 ({r['format']}, {r['logprob_dtype']})", r["bytes_per_token"],
                    r["bytes_per_token"] <= 100, f"{r['bytes_per_token']:.1f} bytes/token",
                    info=(r["format"], r["logprob_dtype"]) != ("zarr", "float16"))
    return v


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
    model, data, what = resolve_inputs(args, work)
    say(f"mft-cache benchmarks: sections {','.join(args.sections)} on {device}; model {what}")
    results = {"command": " ".join(["python", "bench/run.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
               "quick": args.quick, "device": device, "machine": benchlib.machine_info(),
               "inputs": {"model": model, "model_what": what, "data": data}, "sections": {}}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        say(f"[{name}]")
        ts = time.perf_counter()
        if name == "train":
            r = section_train(args, work, model, data, device)
        elif name == "cache":
            r = section_cache(args, work, model, data, device)
        elif name == "storage":
            r = section_storage(args, work, model, data, device)
        elif name == "memory":
            r = section_memory(args, work, model, data, device)
        elif name == "ingest":
            from ingest import section_ingest

            r = section_ingest(args, work, say)
        else:
            r = section_scaling(args, work, device)
        results["sections"][name] = r | {"wall_s": time.perf_counter() - ts, "measured": measured(results, args)}
        if name == "memory":
            keep_memory_rows(results["sections"]["memory"], args, measured(results, args))
    results["wall_s"] = time.perf_counter() - t0
    if not args.quick and Path(args.results).exists():  # keep the sections this run did not measure
        old = json.loads(Path(args.results).read_text())
        for name, section in old.get("sections", {}).items():
            if name not in results["sections"]:
                section.setdefault("measured", {"command": old.get("command"), "commit": old["machine"]["git_commit"],
                                                "dirty": old["machine"]["git_dirty"]})
                results["sections"][name] = section
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
