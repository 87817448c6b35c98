"""How far a bfloat16 teacher and bfloat16 training move what MFT sees and what it gives, against float32.

    python bench/bf16_fidelity.py teacher --out bench/out/fidelity        # the teacher's values, bf16 vs float32
    python bench/bf16_fidelity.py train --out bench/out/fidelity          # S and DG of MFT and FT, 3 seeds each way
    python bench/bf16_fidelity.py report --out bench/out/fidelity         # the tables (markdown) from what was run

teacher: the demo's model and specialized training text (assets/, `make assets`), rows of 256 tokens; at every
trained position the float32 teacher and the bfloat16 teacher (weights in bfloat16, log_softmax in float32, as
`mft cache --dtype bfloat16` computes them): top-1 agreement, |difference| of the label's log-prob and of p_max, and
the share of positions whose MFT branch flips (the argmax is the label for one and not the other: a for b).

train: `mft train --config configs/demo.yaml` (the demo's 20 steps, evaluations at 0, 10 and 20) for MFT (tau 0.25)
and FT, seeds 0, 1 and 2: float32 training from the float32 teacher's cache, bf16 training (--mixed-precision
bf16) from the same cache, and (MFT) float32 training from a bf16 teacher's cache (built once, `mft cache --dtype
bfloat16`), each run in its own folder under --out; a run whose summary.json exists is not run again, so the job
resumes after a crash. Runs one at a time (2 cores: never two).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL, TEXT = ROOT / "assets" / "model", ROOT / "assets" / "data" / "licenses_train.jsonl"
SEEDS = (0, 1, 2)
OBJECTIVES = ("mft", "ft")
# (name, --mixed-precision, the teacher's dtype of the cache it trains from)
VARIANTS = (("fp32", "no", "float32"), ("bf16", "bf16", "float32"), ("bf16-teacher", "no", "bfloat16"))


def teacher(out: Path, seq_len: int = 256, batch: int = 4, max_rows: int = 64) -> dict:
    import numpy as np
    import torch

    from mft_cache.models import backbone_and_head, load_model, load_tokenizer
    from mft_cache.pipeline.teacher import teach_batch
    from mft_cache.rows import build_rows

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(MODEL))
    packed, _ = build_rows(str(TEXT), tokenizer, seq_len)
    packed.truncate(min(max_rows, packed.num_sequences))
    ids, lengths, trained = packed.input_ids, packed.lengths, packed.label_mask
    outs = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = load_model(str(MODEL), dtype, torch.device("cpu")).eval()
        backbone, head = backbone_and_head(model)
        parts: list[tuple] = []
        t0 = time.perf_counter()
        for b in range(0, len(ids), batch):
            lp, top, label_lp = teach_batch(backbone, head, torch.as_tensor(ids[b:b + batch]),
                                            torch.as_tensor(lengths[b:b + batch], dtype=torch.long), 32, 4096,
                                            torch.as_tensor(trained[b:b + batch]))
            parts.append((lp.numpy(), top.numpy(), label_lp.numpy()))
        outs[name] = {"lp": np.concatenate([p[0] for p in parts]), "ids": np.concatenate([p[1] for p in parts]),
                      "label_lp": np.concatenate([p[2] for p in parts]), "s": time.perf_counter() - t0}
        del model
    labels = ids[:, 1:][trained]  # (N,)
    a, b = outs["float32"], outs["bfloat16"]
    d_label = np.abs(a["label_lp"] - b["label_lp"])
    d_pmax = np.abs(np.exp(a["lp"][:, 0]) - np.exp(b["lp"][:, 0]))
    branch_a, branch_b = a["ids"][:, 0] == labels, b["ids"][:, 0] == labels
    result = {"model": MODEL.name, "text": TEXT.name, "rows": int(len(ids)), "positions": int(len(labels)),
              "seq_len": seq_len, "top1_agreement": float((a["ids"][:, 0] == b["ids"][:, 0]).mean()),
              "label_logprob_abs_diff_mean": float(d_label.mean()), "label_logprob_abs_diff_max": float(d_label.max()),
              "p_max_abs_diff_mean": float(d_pmax.mean()), "p_max_abs_diff_max": float(d_pmax.max()),
              "branch_flip_share": float((branch_a != branch_b).mean()),
              "seconds": {"float32": a["s"], "bfloat16": b["s"]}}
    (out / "teacher.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_name(objective: str, variant: str, seed: int) -> str:
    return f"{objective}-{variant}-s{seed}"


def runs():
    for seed in SEEDS:
        for objective in OBJECTIVES:
            for variant, precision, teacher_dtype in VARIANTS:
                if objective == "ft" and teacher_dtype != "float32":  # FT reads no teacher value
                    continue
                yield objective, variant, precision, teacher_dtype, seed


def train(out: Path, cache: str, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    bf16_cache = out / "cache-bf16"
    if not (bf16_cache / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "mft_cache.cli", "cache", "--config", str(ROOT / "configs" / "demo.yaml"),
                        "--out", str(bf16_cache), "--dtype", "bfloat16"], check=True, env=env, cwd=ROOT)
    for objective, variant, precision, teacher_dtype, seed in runs():
        folder = out / run_name(objective, variant, seed)
        if (folder / "summary.json").exists():
            continue
        source = cache if teacher_dtype == "float32" else str(bf16_cache)
        cmd = [sys.executable, "-m", "mft_cache.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
               "--cache", source, "--out", str(folder), "--objective", objective, "--seed", str(seed),
               "--mixed-precision", precision, "--overwrite", *extra]
        print(" ".join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)


def report(out: Path) -> str:
    import statistics

    lines = []
    t = out / "teacher.json"
    if t.exists():
        r = json.loads(t.read_text())
        lines += [f"Teacher ({r['model']}, {r['rows']} rows of {r['seq_len']} tokens of {r['text']}, {r['positions']:,} "
                  "trained positions), bfloat16 against float32:", "",
                  "| top-1 agreement | label log-prob, mean / max abs. diff. | p_max, mean / max abs. diff. | "
                  "MFT branch flips |", "|---|---|---|---|",
                  f"| {100 * r['top1_agreement']:.2f}% | {r['label_logprob_abs_diff_mean']:.4f} / "
                  f"{r['label_logprob_abs_diff_max']:.3f} | {r['p_max_abs_diff_mean']:.4f} / {r['p_max_abs_diff_max']:.3f} "
                  f"| {100 * r['branch_flip_share']:.2f}% |", ""]
    rows = []
    for objective in OBJECTIVES:
        for variant, precision, teacher_dtype in VARIANTS:
            s, dg = [], []
            for seed in SEEDS:
                path = out / run_name(objective, variant, seed) / "summary.json"
                if path.exists():
                    summary = json.loads(path.read_text())
                    s.append(summary["S"])
                    dg.append(summary["DG"])
            if s:
                def spread(v):
                    return f"{statistics.mean(v):+.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:+.4f}"
                rows.append(f"| {objective.upper()} | {'bf16' if precision == 'bf16' else 'float32'} | {teacher_dtype} "
                            f"| {len(s)} | {spread(s)} | {spread(dg)} |")
    if rows:
        lines += ["Training (the demo's run: 20 steps of 4 x 256 tokens, lr 5e-4, tau 0.25; mean ± sd over seeds):", "",
                  "| objective | training | teacher of the cache | seeds | S | DG |", "|---|---|---|---|---|---|", *rows,
                  ""]
    text = "\n".join(lines)
    (out / "fidelity.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("teacher", "train", "report"))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "fidelity"))
    p.add_argument("--cache", default=str(ROOT / "caches" / "demo"), help="the demo's cache (make cache)")
    args, extra = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "teacher":
        print(json.dumps(teacher(out), indent=2))
    elif args.what == "train":
        train(out, args.cache, extra)
    print(report(out))


if __name__ == "__main__":
    main()
