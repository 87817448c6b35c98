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

from mft_cache.storage import Cache, Packed


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64, copy=False))


class CacheRows:
    """Rows of a cache as training batches: tokens plus the teacher's sparse targets."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        parts = [self.cache.read_rows(r, r + 1) for r in rows]
        a = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return {
            "input_ids": _long(a["input_ids"]),  # (B, T)
            "length": _long(a["length"]),  # (B,)
            "topk_ids": _long(a["topk_ids"]),  # (B, T-1, K)
            "topk_logprobs": torch.from_numpy(a["topk_logprobs"]),  # (B, T-1, K) stored dtype
            "label_logprob": torch.from_numpy(a["label_logprob"]),  # (B, T-1) float32
        }


class PackedRows:
    """Rows packed from raw text (the online-teacher baseline, evaluation sets): tokens only."""

    def __init__(self, packed: Packed):
        self.packed = packed

    def __len__(self) -> int:
        return self.packed.num_sequences

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": _long(self.packed.input_ids[rows]), "length": _long(self.packed.lengths[rows])}


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
