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
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import Memory, now  # noqa: E402

MODES = ("ft-hf", "ft", "mft-cache", "mft-online")


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
    from train_step import load_rows

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
        scale = 1.0 / max(mb["mask"].sum().item(), 1.0)
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
            "tokens_per_step": int(micro[0]["mask"].sum())}


if __name__ == "__main__":
    benchlib.child_main(run)
