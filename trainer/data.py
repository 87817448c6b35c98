"""Training rows and their order: from the cache (targets included) or from raw data (online teacher).

The order is a pure function of (seed, step): an endless stream of per-epoch permutations, cut into
global batches. Resuming at step s needs nothing but s, and every process count sees the same
global batches (each process takes its own slice of every micro-batch).
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from mft_cache.rows import Packed
from mft_cache.storage import Cache
from mft_cache.masks import real_tokens


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64, copy=False))


class Rows:
    """Training batches of rows: a cache's (tokens, trained positions and the teacher's cached values, which
    targets.from_cache turns into what the loss consumes) or rows packed in memory (mft_cache.rows.Packed: the
    online teacher's, evaluation sets, raw replay documents); with documents packed whole, their segment ids."""

    def __init__(self, source: Cache | Packed, limit: int = 0):
        self.source = source
        self.limit = limit  # --train-rows: only the first `limit` rows are drawn (0: all)

    def __len__(self) -> int:
        return min(len(self.source), self.limit) if self.limit else len(self.source)

    def first(self, n: int, what: str) -> "Rows":
        """The first n rows only (n = 0: all of them); `what` names the source for the error when it has fewer."""
        if n > len(self.source):
            raise ValueError(f"--train-rows {n}: {what} holds only {len(self.source)} rows")
        return Rows(self.source, n)

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        a = self.source.take(rows)
        out = {
            "input_ids": _long(a["input_ids"]),  # (B, T)
            "length": _long(a["length"]),  # (B,)
            "label_mask": torch.from_numpy(a["label_mask"]),  # (B, T-1) trained
        }
        if "topk_ids" in a:  # a cache's rows
            out.update(topk_ids=_long(a["topk_ids"]),  # (B, T-1, K)
                       topk_logprobs=torch.from_numpy(a["topk_logprobs"]),  # (B, T-1, K) stored dtype
                       label_logprob=torch.from_numpy(a["label_logprob"]))  # (B, T-1) float32
        if "segment_ids" in a:
            out["segment_ids"] = _long(a["segment_ids"])  # (B, T) each document attends only to itself
        return out


def step_rows(step: int, global_batch: int, num_rows: int, seed: int) -> list[int]:
    """The rows of optimiser step `step`: positions [step*G, (step+1)*G) of the permutation stream."""
    out = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(i, num_rows)
        out.append(int(_permutation(seed, epoch, num_rows)[pos]))
    return out


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERM_CACHE:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=g).numpy()
    return _PERM_CACHE[key]


class MixedRows:
    """Finetuning rows then replay rows in one index space: row i < len(main) is main's, the rest replay's.

    A batch holds the fields both sources have (tokens only when replay is raw documents). Two caches may hold
    different top-k: their columns are sorted, so both are cut to the narrower K, which is each one's top K
    exactly (training has checked that the K it uses fits both)."""

    def __init__(self, main, replay):
        self.main, self.replay, self.num_main = main, replay, len(main)

    def __len__(self) -> int:
        return self.num_main + len(self.replay)

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        ours = [r for r in rows if r < self.num_main]
        theirs = [r - self.num_main for r in rows if r >= self.num_main]
        parts = [src.batch(r) for src, r in ((self.main, ours), (self.replay, theirs)) if r]
        if any("segment_ids" in p for p in parts):  # rows of one document each: causal attention as segments
            t = parts[0]["input_ids"].shape[1]
            parts = [p if "segment_ids" in p else {**p, "segment_ids": real_tokens(p["length"], t).long()} for p in parts]
        keys = [k for k in parts[0] if all(k in p for p in parts)]
        if "topk_ids" in keys:
            k_min = min(p["topk_ids"].shape[-1] for p in parts)
            parts = [{**p, "topk_ids": p["topk_ids"][..., :k_min], "topk_logprobs": p["topk_logprobs"][..., :k_min]}
                     for p in parts]
        order = torch.as_tensor(np.argsort([r >= self.num_main for r in rows], kind="stable"))  # main first
        back = torch.empty_like(order)
        back[order] = torch.arange(len(rows))
        return {k: torch.cat([p[k] for p in parts])[back] for k in keys}


def replay_layout(global_batch: int, num_replay: int) -> list[bool]:
    """Which positions of a global batch are replay: `num_replay` of them, spread evenly, so every
    micro-batch (of every process) holds the fraction as closely as its size allows."""
    return [(i + 1) * num_replay // global_batch > i * num_replay // global_batch for i in range(global_batch)]


def mixed_step_rows(step: int, global_batch: int, num_main: int, num_replay_rows: int, fraction: float,
                    seed: int) -> list[int]:
    """step_rows over MixedRows: round(fraction * G) replay rows per step from a stream of their own."""
    r = max(1, min(global_batch - 1, round(fraction * global_batch)))
    main = iter(step_rows(step, global_batch - r, num_main, seed))
    replay = iter(num_main + i for i in step_rows(step, r, num_replay_rows, seed + 1))
    return [next(replay) if is_replay else next(main) for is_replay in replay_layout(global_batch, r)]


def micro_batches(rows: list[int], batch_size: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one global batch laid out as [accum][process][batch]."""
    return [rows[(a * world + rank) * batch_size:(a * world + rank + 1) * batch_size] for a in range(grad_accum)]


class Prefetcher:
    """Loads the micro-batches of upcoming steps in a background thread, so reading never stalls a step."""

    def __init__(self, source, steps: range, rows_of_step, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.source, self.steps, self.rows_of_step = source, steps, rows_of_step
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for step in self.steps:
                self.q.put((step, [self.source.batch(r) for r in self.rows_of_step(step)]))
        except BaseException as e:  # hand the error to the consumer
            self.q.put((None, e))

    def __iter__(self):
        for _ in self.steps:
            step, item = self.q.get()
            if step is None:
                raise item
            yield step, item
