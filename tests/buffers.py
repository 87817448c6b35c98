"""A dispatch mode that records how many bytes of large tensors are alive at once: the peak memory a chunked
computation really holds, checked against what `mft train --plan` counts for it."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ChunkBuffers(TorchDispatchMode):
    """Records the most bytes held at once by tensors of at least `numel` elements made under it (views and
    in-place results share their base's memory and count once)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.live, self.peak = numel, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.live.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        self.live = [(r, ptr, size) for r, ptr, size in self.live if r() is not None]
        self.peak = max(self.peak, sum(dict((ptr, size) for _, ptr, size in self.live).values()))
        return out
