"""Real tokens and trained positions: one definition for numpy and torch, against a plain loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mft_cache.masks import label_mask, real_tokens


def _by_hand(ids: np.ndarray, lengths: np.ndarray, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    r, t = ids.shape
    real = np.zeros((r, t), bool)
    trained = np.zeros((r, t - 1), bool)
    for i in range(r):
        for j in range(t):
            real[i, j] = j < lengths[i]
        for j in range(t - 1):
            trained[i, j] = j < lengths[i] - 1 and (bos is None or ids[i, j + 1] != bos)
    return real, trained


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bos", [None, 1])
def test_masks_match_a_plain_loop_in_numpy_and_torch(seed, bos):
    g = np.random.default_rng(seed)
    ids = g.integers(0, 4, size=(5, 7))
    lengths = g.integers(0, 8, size=5).astype(np.int32)  # empty rows and full rows included
    real, trained = _by_hand(ids, lengths, bos)
    np.testing.assert_array_equal(real_tokens(lengths, 7), real)
    np.testing.assert_array_equal(label_mask(ids, lengths, bos), trained)
    np.testing.assert_array_equal(real_tokens(torch.from_numpy(lengths), 7).numpy(), real)
    np.testing.assert_array_equal(label_mask(torch.from_numpy(ids), torch.from_numpy(lengths), bos).numpy(), trained)
