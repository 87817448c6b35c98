"""The output layer + loss, forward and backward: fused_linear_mft_loss vs chunked_mft_loss (activation
checkpointing) vs plain full-logits F.cross_entropy, on the demo's shapes, one CPU thread.

Every measurement is its own subprocess (peak RSS is per process); the methods run interleaved, in a
rotated order, for several rounds, and the table reports ratios to plain cross-entropy, not seconds.

    python bench/loss_bench.py                       # N = 4*255, H = 576, V = 49152, K = 32, 3 rounds
    python bench/loss_bench.py --rounds 5 --iters 3
Writes bench/out/loss_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, current_rss_mb, peak_rss_mb  # noqa: E402

METHODS = ("plain_ce", "chunked", "fused")


def child(a: argparse.Namespace) -> dict:
    """One method, one process: build the inputs, one warm-up step, then `iters` timed steps."""
    import torch
    import torch.nn.functional as F
    from mft_cache.trainer.loss import chunked_mft_loss, fused_linear_mft_loss
    from mft_cache.trainer.targets import TeacherTargets

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, h_dim, v, k = a.n, a.hidden, a.vocab, a.k
    hidden = torch.randn(n, h_dim, generator=g)  # (N, H)
    head_w = torch.randn(v, h_dim, generator=g).mul_(h_dim**-0.5).requires_grad_()  # (V, H) trainable, no bias
    labels = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.02  # a few positions without a label
    weight = torch.rand(n, generator=g)
    lp, ids, label_lp = [], [], []
    for s in range(0, n, 64):  # a full teacher, 64 rows at a time (no N x V transient before the baseline)
        teacher = torch.log_softmax(torch.randn(min(64, n - s), v, generator=g) * 3, -1)  # (64, V)
        lp_s, ids_s = teacher.topk(k, -1)
        lp.append(lp_s), ids.append(ids_s), label_lp.append(teacher.gather(1, labels[s : s + 64, None])[:, 0])
    lp, ids, label_lp = torch.cat(lp), torch.cat(ids), torch.cat(label_lp)  # (N, K), (N, K), (N,)
    targets = TeacherTargets(weight, ids, lp, label_lp) if a.teacher else TeacherTargets()

    def step() -> float:
        h = hidden.clone().requires_grad_()
        head_w.grad = None
        if a.method == "plain_ce":
            logits = h @ head_w.T  # (N, V) all at once
            loss = F.cross_entropy(logits, torch.where(mask, labels, -100), reduction="sum")
        elif a.method == "chunked":
            loss = chunked_mft_loss(h, lambda x: x @ head_w.T, labels, mask, targets, chunk_size=a.chunk_size)
        else:
            loss = fused_linear_mft_loss(h, head_w, None, labels, mask, targets, chunk_size=a.chunk_size)
        loss.backward()
        return float(loss.detach())

    base = current_rss_mb()
    assert peak_rss_mb() - base < 64, "the inputs' construction left a peak above the baseline"
    loss = step()  # warm-up
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_rss_delta_mb": peak_rss_mb() - base, "loss": loss}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4 * 255, help="positions (batch 4 x 255 labels)")
    p.add_argument("--hidden", type=int, default=576, help="hidden size H (SmolLM2-135M)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary V (SmolLM2-135M)")
    p.add_argument("--k", type=int, default=32, help="cached top-k")
    p.add_argument("--chunk-sizes", default="1024,256", help="chunk sizes for chunked and fused, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one process per method per round)")
    p.add_argument("--iters", type=int, default=2, help="timed steps per process, after one warm-up")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "loss_bench.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    a = parse()
    if a.child:
        print(json.dumps(child(a)))
        return
    chunks = [int(c) for c in a.chunk_sizes.split(",")]
    configs = [("plain_ce", None, 0)] + [(m, c, 1) for c in chunks for m in ("chunked", "fused")]
    configs.append(("fused", chunks[0], 0))  # the fused path as plain cross-entropy: like for like with plain_ce
    results: dict[str, list[dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for r in range(a.rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]  # rotated: no method always first
        for method, chunk, teacher in order:
            cmd = [sys.executable, __file__, "--child", "1", "--method", method, "--teacher", str(teacher),
                   "--chunk-size", str(chunk or 1024), "--n", str(a.n), "--hidden", str(a.hidden),
                   "--vocab", str(a.vocab), "--k", str(a.k), "--iters", str(a.iters)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
            out = done.stdout
            name = method if chunk is None else f"{method}{'' if teacher else '_ce'}@{chunk}"
            results.setdefault(name, []).append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{a.rounds} {name:<14} {results[name][-1]}", file=sys.stderr, flush=True)

    def med(name, key):
        return statistics.median(x[key] for x in results[name])

    plain_t, plain_m = med("plain_ce", "step_s"), med("plain_ce", "peak_rss_delta_mb")
    table = []
    for name in results:
        row = {"method": name, "time_vs_plain_ce": med(name, "step_s") / plain_t,
               "peak_mem_vs_plain_ce": med(name, "peak_rss_delta_mb") / plain_m,
               "step_s_median": med(name, "step_s"), "peak_rss_delta_mb_median": med(name, "peak_rss_delta_mb"),
               "loss": results[name][0]["loss"]}
        if name.startswith("fused@"):
            chunked = name.replace("fused@", "chunked@")
            row["time_vs_chunked"] = med(name, "step_s") / med(chunked, "step_s")
            row["peak_mem_vs_chunked"] = med(name, "peak_rss_delta_mb") / med(chunked, "peak_rss_delta_mb")
        table.append(row)

    print(f"\nforward+backward of the output layer and loss: N={a.n} H={a.hidden} V={a.vocab} K={a.k}, "
          f"CPU, 1 thread, {a.rounds} interleaved rounds x {a.iters} steps (medians)")
    print(f"{'method':<14} {'time/plain':>10} {'mem/plain':>10} {'time/chunked':>12} {'mem/chunked':>11}  loss")
    for row in table:
        tc, mc = row.get("time_vs_chunked"), row.get("peak_mem_vs_chunked")
        print(f"{row['method']:<14} {row['time_vs_plain_ce']:>10.3f} {row['peak_mem_vs_plain_ce']:>10.3f} "
              f"{'' if tc is None else f'{tc:.3f}':>12} {'' if mc is None else f'{mc:.3f}':>11}  {row['loss']:.2f}")
    print(f"plain_ce and fused_ce: -log q_label alone; chunked and fused: the MFT loss against a top-{a.k} cache.")

    import torch

    report = {
        "shape": {"n": a.n, "hidden": a.hidden, "vocab": a.vocab, "k": a.k},
        "rounds": a.rounds, "iters": a.iters, "threads": 1,
        "memory": "peak RSS of each process above its RSS once its inputs exist (W and its grad included)",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "table": table, "raw": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
