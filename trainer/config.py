"""The configuration of `mft train` (and of each run of `mft sweep`)."""
from __future__ import annotations

from dataclasses import dataclass

from mft_cache.config import opt

from .targets import OBJECTIVES


@dataclass(frozen=True)
class TrainConfig:
    cache: str = opt("caches/demo", "cache folder written by `mft cache` (ignored with --teacher online)")
    out: str = opt("runs/demo", "run folder: config.json, metrics.jsonl, summary.json, best/, final/, checkpoints/")
    model: str = opt("", "student to start from (default: the teacher recorded in the cache's manifest)")
    teacher: str = opt("cache", "where the teacher's targets come from: the cache, or an online teacher "
                       "(the paper's Algorithm 1: teacher in memory, full distribution every step)", choices=("cache", "online"))
    data: str = opt("", "with --teacher online: the finetuning documents (same formats as `mft cache`)")
    text_field: str = opt("text", "field holding the text in --data / --eval-* files")
    seq_len: int = opt(0, "with --teacher online: tokens per packed sequence (default: 256)")
    objective: str = opt("mft", "mft (corrected distillation), ft (plain cross-entropy), or the paper's ablations",
                         choices=OBJECTIVES)
    tau: float = opt(0.25, "MFT target margin in [0, 1]; 1 is plain finetuning")
    steps: int = opt(60, "optimiser steps")
    batch_size: int = opt(4, "sequences per micro-batch (per process)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = opt(5, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: off)")
    mixed_precision: str = opt("no", "autocast dtype", choices=("no", "bf16", "fp16"))
    seed: int = opt(0, "seed for data order and initialisation of anything random")
    eval_specialized: str = opt("", "specialized-domain validation documents (perplexity -> S)")
    eval_general: str = opt("", "general-domain validation documents (perplexity -> DG)")
    eval_every: int = opt(20, "evaluate every N steps (also at the start and the end)")
    eval_batch_size: int = opt(8, "sequences per evaluation batch")
    eval_max_sequences: int = opt(0, "evaluate on the first N sequences of each set (0: all)")
    save_every: int = opt(20, "save the training state every N steps (0: never) for --resume")
    resume: bool = opt(False, "continue from the last saved state in --out (starts fresh if there is none)")
    overwrite: bool = opt(False, "replace an existing run in --out")
    log_every: int = opt(10, "write a step line to the log every N steps (metrics.jsonl gets every step)")
    chunk_size: int = opt(1024, "positions per chunk of the output layer in the loss")
    trust_remote_code: bool = opt(False, "allow the model's own code from the hub to run")

    def __post_init__(self):
        if not 0.0 <= self.tau <= 1.0:  # also refuses NaN
            raise ValueError(f"--tau must be in [0, 1]; got {self.tau}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "log_every", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_max_sequences", "seq_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive; got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.teacher == "online" and not (self.data and self.model):
            raise ValueError("--teacher online needs --model (the teacher, also the student's start) and --data")
        if self.teacher == "cache" and self.data:
            raise ValueError("--data is only for --teacher online; the cache already holds the sequences")
