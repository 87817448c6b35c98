"""Child process of the memory section: a few optimiser steps of one configuration, its peak memory and step time.

Modes as in train_step.py (ft-hf: transformers' loss over full logits; ft: our fused loss; mft-cache; mft-online),
each with the memory options of `mft train`: --peft, --gradient-checkpointing, --base-dtype, --optimizer. The model
is loaded and prepared by the trainer's own functions (load_model in --base-dtype, prepare_student, build_optimizer),
and each step follows trainer.train.train_step for one process and one micro-batch, holding nothing the trainer
does not hold (the targets are dropped after the forward).

Memory is what `mft train --plan` predicts: on CPU the peak resident set (ru_maxrss) above the resident set measured
after every import (torch, transformers, peft, the trainer), so the weights, whatever loading them costs, the
activations, gradients and optimiser state all count; on CUDA torch.cuda.max_memory_allocated (everything is
allocated after the baseline, which is 0).

Below the child, the `memory` section of bench/run.py (SECTION): every (model, length, mode, variant) in its own
process, beside `mft train --plan`'s estimate of the same run; its table and verdicts. bench/memory_ab.py builds its
children's specs with the same memory_spec.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ROOT, Memory, fmt, ints, median, now, say, verdict  # noqa: E402
from train_step import MODE_NAMES, build_train_cache, load_rows  # noqa: E402

MODES = ("ft-hf", "ft", "mft-cache", "mft-online")
# variant: (peft, gradient checkpointing, base dtype)
VARIANTS = {"full": ("none", False, "float32"), "full+ckpt": ("none", True, "float32"),
            "lora": ("lora", False, "float32"), "lora+ckpt": ("lora", True, "float32"),
            "lora+bf16": ("lora", False, "bfloat16"), "lora+bf16+ckpt": ("lora", True, "bfloat16")}
ROW_KEY = ("model", "seq_len", "mode", "variant")  # what names a row of the memory table


def train_config(spec: dict):
    from mft_cache.trainer.config import TrainConfig

    mode = spec["mode"]
    return TrainConfig(objective="ft" if mode.startswith("ft") else "mft", tau=0.25, batch_size=spec["batch"],
                       chunk_size=spec.get("chunk_size", 1024), peft=spec.get("peft", "none"),
                       base_dtype=spec.get("base_dtype", "float32"), optimizer=spec.get("optimizer", "adamw"),
                       gradient_checkpointing=bool(spec.get("checkpointing")),
                       cpu_allocator=spec.get("cpu_allocator", "default"),
                       loss_impl="transformers" if mode == "ft-hf" else "fused",
                       teacher="online" if mode == "mft-online" else "cache",
                       model=spec["model"] if mode == "mft-online" else "", data="-" if mode == "mft-online" else "")


def run(spec: dict) -> dict:
    import torch
    import transformers  # noqa: F401  (imported before the baseline, as `mft train` has it)

    from mft_cache.models import DTYPES, load_model
    from mft_cache.trainer.data import Prefetcher, micro_batches, step_rows
    from mft_cache.trainer.loss_module import StudentLoss
    from mft_cache.trainer.optim import build_optimizer
    from mft_cache.trainer.train import make_targets, prepare_student, student_forward

    import peft  # noqa: F401

    mode = spec["mode"]
    assert mode in MODES, mode
    cfg = train_config(spec)
    device = torch.device(spec.get("device", "cpu"))
    if device.type == "cpu" and cfg.cpu_allocator == "lean":  # as `mft train --cpu-allocator lean` does
        from mft_cache.allocator import use_lean_allocator

        assert use_lean_allocator(), "--cpu-allocator lean needs glibc"
    mem = Memory(device)
    mark = mem.mark()  # baseline: everything imported, nothing loaded
    rows = load_rows(spec, mode)
    dtype = DTYPES[cfg.base_dtype]
    model = load_model(spec["model"], dtype, device)
    model.config.use_cache = False
    teacher = load_model(spec["model"], dtype, device).eval().requires_grad_(False) if mode == "mft-online" else None
    model = prepare_student(cfg, model)
    loaded = mem.report()  # the peak so far: loading (on CPU it can exceed training's, with a cast base)
    module = StudentLoss(model, cfg.chunk_size, cfg.loss_impl)
    optimizer = build_optimizer(cfg.optimizer, [p for p in module.parameters() if p.requires_grad], cfg.lr,
                                cfg.weight_decay)
    targets = make_targets(cfg, teacher)
    module.train()
    warmup, steps, batch = spec["warmup"], spec["steps"], spec["batch"]
    prefetch = Prefetcher(rows, range(warmup + steps),
                          lambda s: micro_batches(step_rows(s, batch, len(rows), 0), batch, 1, 0, 1))
    times, losses, step_peaks = [], [], []
    for i, (_, micro) in enumerate(prefetch):
        t0 = now()
        mb = {k: v.to(device, non_blocking=True) for k, v in micro[0].items()}
        scale = 1.0 / max(mb["label_mask"].sum().item(), 1.0)
        loss_sum, _ = student_forward(module, mb, targets(mb))  # the targets are dropped here, as in train_step
        loss = loss_sum * scale
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mem.sync()
        step_peaks.append(mem.report()["delta_mb"])
        if i >= warmup:
            times.append(now() - t0)
            losses.append(float(loss.detach()))
        del loss, loss_sum, mb
    return {"mode": mode, "spec": spec, "step_s": times, "loss": losses, "memory": {**mem.report(), **mark, "loading_delta_mb": loaded["delta_mb"],
                                                                       "after_step_delta_mb": step_peaks},
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "tokens_per_step": int(micro[0]["label_mask"].sum())}


# -- the memory section of bench/run.py -------------------------------------------------------------
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
    peft, ckpt, dtype = VARIANTS[variant]
    return {"mode": mode, "model": model, "cache": str(cache), "batch": 1, "warmup": warmup, "steps": steps,
            "device": device, "peft": peft, "checkpointing": ckpt, "base_dtype": dtype, "top_k": top_k,
            "cpu_allocator": allocator, "chunk_size": chunk_size}


def section_memory(args, inputs: benchlib.Inputs) -> dict:
    work, data, device = inputs.work, inputs.data, inputs.device
    rows, profiles = [], {}
    # A run's peak is reached from its second step on: AdamW's state exists only after the first optimizer step, so a
    # one-step measurement of full finetuning would miss it (cached MFT at 2,048: 3,702 MB alone, 4,773 after a step).
    warmup = max(args.warmup, 1)
    for folder, name in memory_models(args, work, inputs.model):
        for seq in args.memory_seq_lens:
            cache = build_train_cache(args, work, folder, data, device, out=work / f"memory-cache-{name}-{seq}",
                                      seq_len=seq, sequences=warmup + args.steps + 2)
            base_step = None
            for mode in args.memory_modes:
                for variant in args.memory_variants:
                    peft, ckpt, dtype = VARIANTS[variant]
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
                                                                     MODES.index(r["mode"]),
                                                                     list(VARIANTS).index(r["variant"])))
    section["kept_rows"] = len(kept)


def flags(group) -> None:
    group.add_argument("--memory-models", default="", help="memory: comma-separated model folders (default: assets/model "
                       "and assets/gemma/model, those that exist; else --model or a tiny Llama)")
    group.add_argument("--memory-seq-lens", default="", help="memory: sequence lengths (default 256,2048; quick 64)")
    group.add_argument("--memory-modes", default=",".join(MODES), help="memory: modes, a subset of "
                       f"{','.join(MODES)}")
    group.add_argument("--memory-variants", default=",".join(VARIANTS), help="memory: variants, a subset of "
                       f"{','.join(VARIANTS)}")
    group.add_argument("--memory-allocator", default="lean", choices=("lean", "default"),
                       help="memory, on CPU: every row runs with `mft train --cpu-allocator` this (lean: RSS follows the "
                       "live tensors, which is what --plan estimates; default: glibc's own policy, which keeps some of "
                       "what a step freed)")
    group.add_argument("--memory-keep", action="store_true",
                       help="memory: keep the rows of the results file that this run does not measure (same allocator), "
                       "each with the commit and command that measured it, so that the long table can be measured in parts")


def resolve(args, error) -> None:
    args.memory_seq_lens = ints(args.memory_seq_lens or ("64" if args.quick else "256,2048"))
    for name, allowed in (("memory_modes", MODES), ("memory_variants", VARIANTS)):
        chosen = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        if not chosen or [x for x in chosen if x not in allowed]:
            error(f"--{name.replace('_', '-')}: choose from {','.join(allowed)}; got {getattr(args, name)}")
        setattr(args, name, chosen)


def table(mm: dict, results: dict) -> list[str]:
    unit = "peak RSS MB above the imports" if mm["rows"] and mm["rows"][0]["memory_kind"] == "rss" else "peak CUDA MB"
    out = [f"### Memory options (batch {mm['batch']}, {mm['timed_steps']} timed steps after {mm['warmup_steps']}; "
           f"{unit}; estimate: `mft train --plan` for the same run; step time as a multiple of FT with "
           f"transformers' loss, full weights, same model and length)\n"]
    allocators = list(dict.fromkeys(r.get("cpu_allocator") for r in mm["rows"]))
    if allocators == ["lean"] or allocators == ["default"]:
        out.append(f"On the CPU every row ran with `--cpu-allocator {allocators[0]}`.\n")
    commits = list(dict.fromkeys(str((r.get("measured") or {}).get("commit"))[:10] for r in mm["rows"]))
    several = len(commits) > 1 or len(allocators) > 1  # rows measured in parts: say by what, row by row
    out.append("| model | seq len | mode | variant | peak MB | estimate MB | estimate / peak | peak phase (estimate) | "
               "loading MB | step s | x FT (a) |" + (" allocator | commit |" if several else ""))
    out.append("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if several else ""))
    for r in mm["rows"]:
        out.append(f"| {r['model']} | {r['seq_len']} | {MODE_NAMES.get(r['mode'], r['mode'])} | {r['variant']} | "
                   f"{fmt(r['peak_mb'], 0)} | {fmt(r['estimate_mb'], 0)} | {fmt(r['ratio_estimate'])} | "
                   f"{r['estimate_phase']} | {fmt(r['loading_mb'], 0)} | {fmt(r['step_s'])} | {fmt(r.get('step_ratio'))} |"
                   + (f" {r.get('cpu_allocator')} | {str((r.get('measured') or {}).get('commit'))[:10]} |"
                      if several else ""))
    if several:
        out.append("\nThe rows were measured in parts (`--memory-keep`), each under the allocator and at the commit "
                   "named; an estimate is of the run under its row's allocator. Step times compare only within "
                   "one commit's rows of the same model and length.")
    return out + [""]


def _plan_verdict(rows: list[dict]) -> dict:
    """`mft train --plan` against every row, the spread per allocator in the detail."""
    ratios = [r["ratio_estimate"] for r in rows]
    worst = max(ratios, key=lambda x: abs(x - 1))
    by = {}
    for r in rows:
        by.setdefault(r.get("cpu_allocator") or "default", []).append(r["ratio_estimate"])
    parts = "; ".join(f"{a} allocator: {min(x):.3f} to {max(x):.3f} over {len(x)}, "
                      f"{sum(not 0.85 <= q <= 1.15 for q in x)} outside" for a, x in by.items())
    return verdict("`mft train --plan` within 15% of the measured peak (every memory row)", worst,
                   all(0.85 <= x <= 1.15 for x in ratios),
                   f"estimate / measured from {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} runs ({parts})")


def _leanest_verdicts(pick: dict) -> list[dict]:
    """Cached MFT with every memory option against transformers' full FT of the same model and length, under the
    same allocator: a target for Gemma at 2,048 tokens or more, a comparison elsewhere."""
    v = []
    for (model, seq, mode, variant), r in pick.items():
        same = (model, seq, "ft-hf", "full") in pick and \
            pick[(model, seq, "ft-hf", "full")].get("cpu_allocator") == r.get("cpu_allocator")
        if (mode, variant) == ("mft-cache", "lora+bf16+ckpt") and same:
            base = pick[(model, seq, "ft-hf", "full")]["peak_mb"]
            ratio = r["peak_mb"] / base
            v.append(verdict(f"{model} at {seq} tokens: cached MFT, LoRA, checkpointing, bf16 base <= 0.4 x "
                             "transformers' full FT peak", ratio, ratio <= 0.4,
                             f"{r['peak_mb']:.0f} vs {base:.0f} MB ({ratio:.3f} x)",
                             info=not (model.lower().startswith("gemma") and seq >= 2048)))
    return v


def _online_verdict(rows: list[dict], pick: dict) -> list[dict]:
    """Online MFT against cached MFT of the same row, under the same allocator (none where no row has both)."""
    pairs = [(r, pick[(r["model"], r["seq_len"], "mft-online", r["variant"])]) for r in rows
             if r["mode"] == "mft-cache" and (r["model"], r["seq_len"], "mft-online", r["variant"]) in pick
             and pick[(r["model"], r["seq_len"], "mft-online", r["variant"])].get("cpu_allocator")
             == r.get("cpu_allocator")]
    if not pairs:
        return []
    more = [o["peak_mb"] > c["peak_mb"] for c, o in pairs]
    least = min(o["peak_mb"] / c["peak_mb"] for c, o in pairs)
    return [verdict("the online teacher needs more memory than the cache in every row", least, all(more),
                    f"{sum(more)} of {len(more)} rows; online / cached peak at least {least:.2f} x")]


def _smallest_verdicts(rows: list[dict]) -> list[dict]:
    """The cached-MFT variant with the smallest peak, per model at 2,048 tokens or more."""
    v = []
    for model, seq in sorted({(r["model"], r["seq_len"]) for r in rows}):
        trains = [r for r in rows if (r["model"], r["seq_len"]) == (model, seq) and r["mode"] == "mft-cache"]
        if trains and seq >= 2048:
            r = min(trains, key=lambda r: r["peak_mb"])
            v.append(verdict(f"smallest cached-MFT configuration for {model} at {seq} tokens", r["peak_mb"], None,
                             f"{r['variant']}: {r['peak_mb']:.0f} MB, step {r['step_s']:.2f} s = "
                             f"{r.get('step_ratio') or 0:.2f} x transformers' full FT", info=True))
    return v


def verdicts(mm: dict) -> list[dict]:
    rows = mm["rows"]
    if not rows:
        return []
    pick = {tuple(r[k] for k in ROW_KEY): r for r in rows}
    return [_plan_verdict(rows), *_leanest_verdicts(pick), *_online_verdict(rows, pick), *_smallest_verdicts(rows)]


SECTION = benchlib.Section("memory", section_memory, table, verdicts, flags=flags, resolve=resolve,
                           finish=keep_memory_rows, default=False)


if __name__ == "__main__":
    benchlib.child_main(run)
