"""The `scaling` section of bench/run.py: step time and peak memory of FT with transformers' loss, cached MFT and
online MFT against sequence length and vocabulary size, on tiny Llamas built from config (tied embeddings), each
point and mode a fresh bench/train_step.py process over synthetic cache rows."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import fmt, ints, median, say  # noqa: E402
from train_step import summarize_modes  # noqa: E402

MODES = ("ft-hf", "mft-cache", "mft-online")


def section_scaling(args, inputs: benchlib.Inputs) -> dict:
    work, device = inputs.work, inputs.device
    repeats = args.repeats or 2
    hidden, layers, k = (64, 2, 8) if args.quick else (128, 2, 32)
    base_vocab, base_seq = args.vocabs[0], (512 if 512 in args.seq_lens else args.seq_lens[0])
    points = [("seq_len", s, base_vocab) for s in args.seq_lens]
    points += [("vocab", base_seq, v) for v in args.vocabs if v != base_vocab]
    runs = {p: {m: [] for m in MODES} for p in points}
    for rep in range(repeats):
        for i, p in enumerate(points):
            modes = MODES[(rep + i) % 3:] + MODES[:(rep + i) % 3]
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
        s = summarize_modes(runs[p], MODES)["modes"]
        for m in MODES:
            rows.append({"axis": p[0], "seq_len": p[1], "vocab": p[2], "mode": m,
                         **{k2: v for k2, v in s[m].items() if k2 not in ("raw", "loss")}})
    return {"rows": rows, "hidden": hidden, "layers": layers, "top_k": k, "batch": args.scaling_batch,
            "repeats": repeats, "timed_steps": args.steps, "tied_embeddings": True}


def flags(group) -> None:
    group.add_argument("--seq-lens", default="",
                       help="scaling: sequence lengths at the first vocabulary (default 128,512,1024)")
    group.add_argument("--vocabs", default="", help="scaling: vocabulary sizes at seq len 512 (or the first seq len) "
                       "(default 32768,131072,262144)")
    group.add_argument("--scaling-batch", type=int, default=1, help="scaling: sequences per step")


def resolve(args, error) -> None:
    args.seq_lens = ints(args.seq_lens or ("32" if args.quick else "128,512,1024"))
    args.vocabs = ints(args.vocabs or ("1024,262144" if args.quick else "32768,131072,262144"))


def table(sc: dict, results: dict) -> list[str]:
    out = [f"### Scaling (tiny Llama from config: hidden {sc['hidden']}, {sc['layers']} layers, tied embeddings; "
           f"batch {sc['batch']}; cached MFT with synthetic top-{sc['top_k']} rows; {sc['repeats']} repeats)\n",
           "| seq len | vocab | mode | step s | x FT (a) | peak MB | x (a) | above model-loaded MB | x (a) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sc["rows"]:
        out.append(f"| {r['seq_len']} | {r['vocab']:,} | {r['mode']} | {fmt(r['step_s'])} | {fmt(r['step_ratio'])} | "
                   f"{fmt(r['peak_mb'], 0)} | {fmt(r['peak_ratio'])} | {fmt(r['delta_mb'], 0)} | {fmt(r['delta_ratio'])} |")
    return out + [""]


SECTION = benchlib.Section("scaling", section_scaling, table, flags=flags, resolve=resolve)
