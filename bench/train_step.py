"""Child process: optimiser steps of one training mode, timed phase by phase, and its peak memory.

Modes (same model, batch, sequence length and rows):
  ft-hf       plain finetuning with transformers' own loss over full logits (StudentLoss impl "transformers")
  ft          plain finetuning through the trainer's chunked loss (objective ft)
  mft-cache   MFT from cached top-k targets (CacheRows or synthetic rows, targets.from_cache)
  mft-online  MFT with the teacher in memory (targets.from_logits, the same StudentLoss)
A suffix "+ckpt" (ft+ckpt, mft-cache+ckpt) selects --loss-impl checkpointed, the head's own forward chunk by
chunk under activation checkpointing, instead of the fused linear + loss.

Every step follows trainer.train.train_step for one process and one micro-batch: move the batch to
the device, targets, forward + loss (sum / trained tokens), backward, clip to 1.0, AdamW step, zero_grad.
Phases: wait (for the Prefetcher's next batch), h2d, targets (from the cache / the online teacher's
forward), forward (+ loss), backward, optimizer. On CUDA every phase ends with a synchronize.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import Memory, now  # noqa: E402

MODES = ("ft-hf", "ft", "mft-cache", "mft-online", "ft+ckpt", "mft-cache+ckpt")
PHASES = ("wait", "h2d", "targets", "forward", "backward", "optimizer")


class ArrayRows:
    """Rows held in memory (synthetic cache rows, or the tokens of a cache): CacheRows' batch format."""

    def __init__(self, arrays: dict, with_targets: bool, bos_id=None):
        import numpy as np
        import torch

        from mft_cache.storage.packing import label_mask

        self.n = len(arrays["length"])
        self.t = {k: torch.from_numpy(np.ascontiguousarray(v.astype(np.int64) if v.dtype.kind in "ui" else v))
                  for k, v in arrays.items() if with_targets or k in ("input_ids", "length")}
        self.t["mask"] = torch.from_numpy(label_mask(arrays["input_ids"], arrays["length"], bos_id))

    def __len__(self):
        return self.n

    def batch(self, rows):
        return {k: v[rows].clone() for k, v in self.t.items()}


def load_rows(spec: dict, mode: str):
    """The rows a mode trains on: CacheRows of a real cache (what `mft train` reads) for ft and mft-cache,
    the same sequences' tokens for ft-hf and mft-online (what the online baseline reads)."""
    if spec.get("cache"):
        from mft_cache.storage import open_cache
        from mft_cache.storage.packing import rule_of
        from mft_cache.trainer.data import CacheRows

        cache = open_cache(spec["cache"])
        if mode in ("ft", "mft-cache"):
            return CacheRows(cache)
        return ArrayRows(cache.read_rows(0, len(cache)), with_targets=False, bos_id=rule_of(cache.manifest))
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
        scale = 1.0 / max(mb["mask"].sum().item(), 1.0)
        lap("h2d")
        t_mb = targets(mb)
        lap("targets")
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
    tokens = int(micro[0]["mask"].sum())
    return {
        "mode": spec["mode"],
        "step_s": [r["step"] for r in records],
        "phases_s": {p: [r[p] for r in records] for p in PHASES},
        "tokens_per_step": tokens,
        "loss": losses,
        "memory": {**memory, **mark},
        "params": sum(p.numel() for p in model.parameters()),
    }


if __name__ == "__main__":
    benchlib.child_main(run)
