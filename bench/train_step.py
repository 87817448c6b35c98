"""Child process: optimiser steps of one training mode, timed phase by phase, and its peak memory.

Modes (same model, batch, sequence length and rows):
  ft-hf       plain finetuning with transformers' own loss over full logits (StudentLoss impl "transformers")
  ft          plain finetuning through the trainer's chunked loss (objective ft)
  mft-cache   MFT from cached top-k targets (Rows or synthetic rows, targets.from_cache)
  mft-online  MFT with the teacher in memory (targets.from_logits, the same StudentLoss)
A suffix "+ckpt" (ft+ckpt, mft-cache+ckpt) selects --loss-impl checkpointed, the head's own forward chunk by
chunk under activation checkpointing, instead of the fused linear + loss. spec "autocast": "bfloat16" runs the
forward and loss under torch.autocast in bf16 over float32 weights, as `mft train --mixed-precision bf16` does
(Accelerate wraps the prepared module's forward; the online teacher's forward stays outside).

Every step follows trainer.train.train_step for one process and one micro-batch: move the batch to
the device, targets, forward + loss (sum / trained tokens), backward, clip to 1.0, AdamW step, zero_grad.
Phases: wait (for the Prefetcher's next batch), h2d, targets (from the cache / the online teacher's
forward), forward (+ loss), backward, optimizer. On CUDA every phase ends with a synchronize.

Below the child, the `train` section of bench/run.py (SECTION): each mode in its own process, interleaved, over a
cache built by `mft cache`; its table and verdicts. The memory section reads the same cache (build_train_cache)
and the scaling section the same summary of modes (summarize_modes).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ROOT, Memory, fmt, median, now, say, verdict  # noqa: E402

MODES = ("ft-hf", "ft", "mft-cache", "mft-online", "ft+ckpt", "mft-cache+ckpt")
PHASES = ("wait", "h2d", "targets", "forward", "backward", "optimizer")
TRAIN_MODES = ("ft-hf", "ft", "mft-cache", "mft-online")  # what the train section runs (+ mft-cache+ckpt: --unfused)
MODE_NAMES = {"ft-hf": "FT, transformers loss (a)", "ft": "FT, our loss (b)",
              "mft-cache": "MFT from the cache (c)", "mft-online": "MFT, online teacher (d)",
              "ft+ckpt": "FT, our loss, checkpointed chunks (b')", "mft-cache+ckpt": "MFT from the cache, checkpointed chunks (c')"}


class ArrayRows:
    """Rows held in memory (synthetic cache rows, or the tokens of a cache): Rows' batch format."""

    def __init__(self, arrays: dict, with_targets: bool, bos_id=None):
        import numpy as np
        import torch

        from mft_cache.masks import label_mask

        self.n = len(arrays["length"])
        self.t = {k: torch.from_numpy(np.ascontiguousarray(v.astype(np.int64) if v.dtype.kind in "ui" else v))
                  for k, v in arrays.items() if with_targets or k in ("input_ids", "length")}
        self.t["label_mask"] = torch.from_numpy(label_mask(arrays["input_ids"], arrays["length"], bos_id))

    def __len__(self):
        return self.n

    def batch(self, rows):
        return {k: v[rows].clone() for k, v in self.t.items()}


def load_rows(spec: dict, mode: str):
    """The rows a mode trains on: Rows of a real cache (what `mft train` reads) for ft and mft-cache,
    the same sequences' tokens for ft-hf and mft-online (what the online baseline reads)."""
    if spec.get("cache"):
        from mft_cache.storage import open_cache
        from mft_cache.trainer.data import Rows

        cache = open_cache(spec["cache"])
        if mode in ("ft", "mft-cache"):
            return Rows(cache)
        return ArrayRows(cache.read_rows(0, len(cache)), with_targets=False, bos_id=cache.manifest.bos_id)
    arrays = benchlib.synthetic_rows(spec["rows"], spec["seq_len"], spec["vocab_size"], spec["top_k"], seed=1)
    return ArrayRows(arrays, with_targets=mode in ("ft", "mft-cache"))


def load_model(spec: dict, device, seed: int = 0):
    import torch

    if spec.get("model"):
        from mft_cache.models import load_model as load

        model = load(spec["model"], torch.float32, device)
    else:
        model = benchlib.build_llama(spec["vocab_size"], spec["hidden"], spec["layers"], seed=seed).to(device)
    model.config.use_cache = False
    return model


def run(spec: dict) -> dict:
    import contextlib

    import torch

    from mft_cache.trainer.config import TrainConfig
    from mft_cache.trainer.data import Prefetcher, micro_batches, step_rows
    from mft_cache.trainer.loss_module import StudentLoss
    from mft_cache.trainer.train import make_targets, student_forward

    mode = spec["mode"]
    assert mode in MODES, mode
    impl = "checkpointed" if mode.endswith("+ckpt") else "transformers" if mode == "ft-hf" else "fused"
    mode = mode.removesuffix("+ckpt")
    device = torch.device(spec.get("device", "cpu"))
    mem = Memory(device)
    rows = load_rows(spec, mode)
    model = load_model(spec, device)
    model.train()
    mark = mem.mark()  # baseline: the student loaded (the online teacher comes on top of it)
    teacher = None
    if mode == "mft-online":
        teacher = load_model(spec, device).eval().requires_grad_(False)
    cfg = TrainConfig(objective="ft" if mode.startswith("ft") else "mft", tau=spec.get("tau", 0.25),
                      chunk_size=spec.get("chunk_size", 1024), batch_size=spec["batch"])
    targets = make_targets(cfg, teacher)
    module = StudentLoss(model, cfg.chunk_size, impl)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps + (1 if spec.get("profile") else 0)
    B = spec["batch"]
    prefetch = Prefetcher(rows, range(total), lambda s: micro_batches(step_rows(s, B, len(rows), 0), B, 1, 0, 1))
    autocast = spec.get("autocast")
    assert autocast in (None, "bfloat16"), autocast

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step(micro: list[dict]) -> tuple[dict, float]:
        times = {}
        t = now()

        def lap(name):
            nonlocal t
            mem.sync()
            t2 = now()
            times[name] = t2 - t
            t = t2

        mb = {k: v.to(device, non_blocking=True) for k, v in micro[0].items()}
        scale = 1.0 / max(mb["label_mask"].sum().item(), 1.0)
        lap("h2d")
        t_mb = targets(mb)
        lap("targets")
        with amp():
            loss_sum, _ = student_forward(module, mb, t_mb)
        loss = loss_sum * scale
        lap("forward")
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lap("optimizer")
        return times, float(loss.detach())

    records, losses = [], []
    it = iter(prefetch)
    for i in range(warmup + steps):
        t0 = now()
        _, micro = next(it)
        wait = now() - t0
        times, loss = step(micro)
        times["wait"] = wait
        times["step"] = now() - t0 - wait  # what train.py times: train_step, not the wait for data
        if i >= warmup:
            records.append(times)
            losses.append(loss)
    memory = mem.report()  # before the profiled step: the profiler holds memory of its own
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        _, micro = next(it)
        with profile(activities=acts) as prof:
            step(micro)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(spec["profile"]).write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    tokens = int(micro[0]["label_mask"].sum())
    positions, seq_len = micro[0]["input_ids"].numel(), micro[0]["input_ids"].shape[1]
    shape = benchlib.model_shape(model)
    # the output layer counted at the trained positions in every mode: the same work, whatever the loss computes
    flops = benchlib.train_flops(shape, positions, tokens, seq_len)
    if teacher is not None:  # the online teacher's forward, logits at every position
        flops += benchlib.forward_flops(shape, positions, positions, seq_len)
    return {
        "mode": spec["mode"],
        "autocast": autocast,
        "flops_per_step": flops,
        "shape": shape,
        "step_s": [r["step"] for r in records],
        "phases_s": {p: [r[p] for r in records] for p in PHASES},
        "tokens_per_step": tokens,
        "loss": losses,
        "memory": {**memory, **mark},
        "params": sum(p.numel() for p in model.parameters()),
    }


# -- the train section of bench/run.py --------------------------------------------------------------
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


def summarize_modes(runs: dict, modes, base: list | None = None) -> dict:
    """Medians per mode and ratios to `base` (default ft-hf's runs) taken within each repeat (then their median)."""
    base = runs["ft-hf"] if base is None else base
    out = {}
    for m in modes:
        rs = runs[m]
        step_ratio = [median(r["step_s"]) / median(b["step_s"]) for r, b in zip(rs, base)]
        peak_ratio = [r["memory"]["peak_mb"] / b["memory"]["peak_mb"] for r, b in zip(rs, base)]
        delta_ratio = [r["memory"]["delta_mb"] / max(b["memory"]["delta_mb"], 1e-9) for r, b in zip(rs, base)]
        step_s = median(s for r in rs for s in r["step_s"])
        out[m] = {
            "step_s": step_s,
            "step_ratio": median(step_ratio),
            "step_ratio_per_repeat": step_ratio,
            "tokens_per_step": rs[0]["tokens_per_step"],
            "tokens_per_s": rs[0]["tokens_per_step"] / step_s,
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
        if "flops_per_step" in rs[0]:
            out[m] |= {"flops_per_step": rs[0]["flops_per_step"], "gflops": rs[0]["flops_per_step"] / step_s / 1e9}
    return {"modes": out}


def within_repeats(a: list, b: list, of) -> list[float]:
    """of(a's run) / of(b's run), repeat by repeat."""
    return [of(x) / of(y) for x, y in zip(a, b)]


def section_train(args, inputs: benchlib.Inputs) -> dict:
    work, device = inputs.work, inputs.device
    cache = build_train_cache(args, work, inputs.model, inputs.data, device)
    repeats = args.repeats or 2
    peaks = benchlib.matmul_peaks(args.dtypes, device, args.quick)
    modes = TRAIN_MODES + (("mft-cache+ckpt",) if args.unfused else ())
    bf16_modes = tuple(args.bf16_modes) if "bfloat16" in args.dtypes else ()
    items = [(m, None) for m in modes] + [(m, "bfloat16") for m in bf16_modes]  # (mode, autocast dtype)
    runs = {it: [] for it in items}
    for rep in range(repeats):
        order = items[rep % len(items):] + items[:rep % len(items)]  # each run takes each position in turn
        for mode, autocast in order:
            name = mode + ("-bf16" if autocast else "")
            spec = {"mode": mode, "model": inputs.model, "cache": str(cache), "batch": args.batch,
                    "warmup": args.warmup, "steps": args.steps, "device": device, "tau": 0.25, "autocast": autocast,
                    "profile": str(work / f"profile-train-{name}.txt")
                    if rep == 0 and mode in ("ft-hf", "mft-cache") and not args.no_profile else None}
            r = benchlib.run_child("train_step.py", spec, work / "logs" / f"train-{name}-{rep}.log")
            runs[(mode, autocast)].append(r)
            say(f"  train rep {rep} {name:<19} step {median(r['step_s']):7.3f} s  peak {r['memory']['peak_mb']:8.0f} MB"
                f"  {r['flops_per_step'] / median(r['step_s']) / 1e9:7.1f} GFLOP/s")
    peaks = benchlib.best_peaks(peaks, benchlib.matmul_peaks(args.dtypes, device, args.quick))
    f32 = {m: runs[(m, None)] for m in modes}
    out = summarize_modes(f32, modes) | {"cache": str(cache), "batch": args.batch, "seq_len": args.seq_len,
                                          "warmup_steps": args.warmup, "timed_steps": args.steps,
                                          "repeats": repeats, "tau": 0.25, "top_k": args.top_k, "peaks": peaks}
    for r in out["modes"].values():
        r["peak_share"] = r["gflops"] / peaks["float32"]["gflops"]
    if bf16_modes:
        bf = {m: runs[(m, "bfloat16")] for m in bf16_modes}
        s = summarize_modes(bf, bf16_modes, base=f32["ft-hf"])["modes"]  # x (a): against ft-hf in float32

        def step(r):
            return median(r["step_s"])

        for m, r in s.items():
            speedup = within_repeats(f32[m], bf[m], step)
            peak = within_repeats(bf[m], f32[m], lambda x: x["memory"]["peak_mb"])
            r |= {"peak_share": r["gflops"] / peaks["bfloat16"]["gflops"], "speedup": median(speedup),
                  "speedup_per_repeat": speedup, "peak_ratio_to_float32": median(peak)}
            if "ft-hf" in bf:
                same = within_repeats(bf[m], bf["ft-hf"], step)
                r |= {"step_ratio_bf16": median(same), "step_ratio_bf16_per_repeat": same}
        out["bfloat16"] = {"modes": s}
    return out


def flags(group) -> None:
    group.add_argument("--unfused", action="store_true",
                       help="train: also (c) through StudentLoss's checkpointed-chunks fallback instead of the fused loss")
    group.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables of the train section")
    group.add_argument("--bf16-modes", default="ft-hf,mft-cache",
                       help="train: the modes also run under bf16 autocast where --dtypes holds bfloat16 (comma-separated "
                       f"subset of {','.join(TRAIN_MODES)}, and mft-cache+ckpt with --unfused)")


def resolve(args, error) -> None:
    args.no_profile = args.no_profile or args.quick
    args.bf16_modes = [m.strip() for m in args.bf16_modes.split(",") if m.strip()]
    allowed = TRAIN_MODES + (("mft-cache+ckpt",) if args.unfused else ())
    unknown = [m for m in args.bf16_modes if m not in allowed]
    if unknown:
        error(f"--bf16-modes: {unknown} not among the train section's modes {','.join(allowed)}")


def table(t: dict, results: dict) -> list[str]:
    unit = "peak RSS MB" if t["modes"]["ft-hf"]["memory_kind"] == "rss" else "peak CUDA MB"
    flops = "peaks" in t  # a run that measured the matmul peak: a dtype, GFLOP/s and its share beside every row
    bf16 = t.get("bfloat16", {}).get("modes", {})
    rows = [(m, "float32", r) for m, r in t["modes"].items()] + [(m, "bf16 autocast", r) for m, r in bf16.items()]
    out = [f"### Training step ({results['inputs']['model_what']}; batch {t['batch']} x {t['seq_len']}, "
           f"{t['repeats']} repeats x {t['timed_steps']} timed steps after {t['warmup_steps']} warm-up)\n"]
    if flops:
        out += [f"| mode | precision | step s | x (a) | tok/s | GFLOP/s | % of the dtype's matmul peak | {unit} | "
                "x (a) | above model-loaded MB | x (a) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    else:
        out += [f"| mode | step s | x (a) | tok/s | {unit} | x (a) | above model-loaded MB | x (a) |",
                "|---|---|---|---|---|---|---|---|"]
    for m, dtype, r in rows:
        speed = [fmt(r["step_s"]), fmt(r["step_ratio"]), fmt(r["tokens_per_s"], 0)]
        if flops:
            speed = [dtype, *speed, fmt(r["gflops"], 1), f"{fmt(100 * r['peak_share'], 1)}%"]
        out.append(f"| {MODE_NAMES[m]} | " + " | ".join(speed) + f" | {fmt(r['peak_mb'], 0)} | {fmt(r['peak_ratio'])} | "
                   f"{fmt(r['delta_mb'], 0)} | {fmt(r['delta_ratio'])} |")
    if bf16:
        out += ["\nx (a): against (a) in float32, within each repeat. bf16 autocast against float32, mode by mode "
                "within each repeat:\n",
                "| mode | float32 / bf16 step time | bf16 step x (a) under bf16 | bf16 / float32 peak memory |",
                "|---|---|---|---|"]
        out += [f"| {MODE_NAMES[m]} | {fmt(r['speedup'])} | {fmt(r.get('step_ratio_bf16'))} | "
                f"{fmt(r['peak_ratio_to_float32'])} |" for m, r in bf16.items()]
    if flops:
        out.append(benchlib.peaks_note(t["peaks"], "every mode's step counted alike, the output layer at the trained "
                                       "positions (the online teacher's forward added to (d)), so GFLOP/s compares the "
                                       "modes' speed."))
    out.append("\nStep phases (median ms; wait = blocked on the Prefetcher for the next batch, outside the step):\n")
    phases = list(t["modes"]["ft-hf"]["phases_s"])
    out.append("| mode | " + " | ".join(phases) + " | max wait |")
    out.append("|---|" + "---|" * (len(phases) + 1))
    for m, dtype, r in rows:
        name = MODE_NAMES[m] + (f", {dtype}" if dtype != "float32" else "")
        out.append(f"| {name} | " + " | ".join(fmt(r["phases_s"][p] * 1000, 1) for p in phases)
                   + f" | {fmt(r['wait_max_s'] * 1000, 1)} |")
    return out + [""]


def verdicts(t: dict) -> list[dict]:
    m = t["modes"]
    a, c, o = m["ft-hf"], m["mft-cache"], m["mft-online"]
    w = c["wait_max_s"]
    v = [verdict("cached MFT step time <= 1.05 x plain FT (transformers loss)", c["step_ratio"], c["step_ratio"] <= 1.05,
                 f"{c['step_ratio']:.3f} x ({c['step_s']:.2f} vs {a['step_s']:.2f} s)"),
         verdict("cached MFT peak memory <= plain FT (transformers loss)", c["peak_ratio"], c["peak_ratio"] <= 1.0,
                 f"{c['peak_ratio']:.3f} x peak ({c['peak_mb']:.0f} vs {a['peak_mb']:.0f} MB); above the loaded "
                 f"model {c['delta_mb']:.0f} vs {a['delta_mb']:.0f} MB ({c['delta_ratio']:.3f} x)"),
         verdict("online MFT vs plain FT", o["step_ratio"], None,
                 f"{o['step_ratio']:.3f} x step time, {100 * (o['peak_ratio'] - 1):+.1f}% peak memory", info=True),
         verdict("cached MFT vs online MFT", c["step_s"] / o["step_s"], None,
                 f"{c['step_ratio'] / o['step_ratio']:.3f} x step time, {c['peak_mb'] / o['peak_mb']:.3f} x peak memory",
                 info=True),
         verdict("reading the cache never stalls a step (cached MFT, longest wait for the Prefetcher)", w,
                 w < 0.01 * c["step_s"], f"max wait {w * 1000:.1f} ms vs a {c['step_s'] * 1000:.0f} ms step")]
    if "mft-cache+ckpt" in m:
        u = m["mft-cache+ckpt"]
        v.append(verdict("what the fused linear+loss changed (cached MFT, fused vs checkpointed chunks)", u["step_ratio"],
                         None, f"fused {c['step_ratio']:.3f} x vs checkpointed {u['step_ratio']:.3f} x FT step time; "
                         f"peak {c['peak_mb']:.0f} vs {u['peak_mb']:.0f} MB", info=True))
    cb = t.get("bfloat16", {}).get("modes", {}).get("mft-cache")
    if cb is not None:
        x = cb["speedup"]
        v.append(verdict("cached MFT under bf16 autocast >= 1.6 x faster than in float32", x, x >= 1.6,
                         f"{x:.2f} x ({cb['step_s']:.2f} vs {c['step_s']:.2f} s)"))
        if "step_ratio_bf16" in cb:
            x, ab = cb["step_ratio_bf16"], t["bfloat16"]["modes"]["ft-hf"]
            v.append(verdict("cached MFT step time <= 1.05 x plain FT (transformers loss), both under bf16 autocast", x,
                             x <= 1.05, f"{x:.3f} x ({cb['step_s']:.2f} vs {ab['step_s']:.2f} s)"))
        x = cb["peak_ratio_to_float32"]
        v.append(verdict("cached MFT peak memory under bf16 autocast <= its float32 peak", x, x <= 1.0,
                         f"{x:.3f} x ({cb['peak_mb']:.0f} vs {c['peak_mb']:.0f} MB)"))
    if "peaks" in t:
        shares = [f"{100 * c['peak_share']:.1f}% of the float32 peak in float32"]
        if cb is not None:
            shares.append(f"{100 * cb['peak_share']:.1f}% of the bf16 peak under bf16 autocast")
        v.append(verdict("cached MFT step's share of the matmul peak", c["peak_share"], None, ", ".join(shares),
                         info=True))
    return v


SECTION = benchlib.Section("train", section_train, table, verdicts, flags=flags, resolve=resolve)


if __name__ == "__main__":
    benchlib.child_main(run)
