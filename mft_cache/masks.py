"""Which tokens of a row are real and which positions are trained: the two rules that rows of concatenated text
follow, and the label mask each implies (rows of every other kind carry their mask with them). Each function works
on numpy arrays and on torch tensors alike."""
from __future__ import annotations

import numpy as np

CONCAT = "concat"  # rows are plain slices of the stream (tokenizers without BOS; caches made before the rule)
BOS_PER_ROW = "bos-per-row"  # every row starts with BOS; positions whose label is BOS are not trained


def real_tokens(lengths, t: int):
    """(R, t) bool: token j of row r is real (not padding) iff j < lengths[r]; the attention mask of the rows."""
    if isinstance(lengths, np.ndarray):
        return np.arange(t)[None, :] < lengths[:, None]
    import torch

    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]


def label_mask(input_ids, lengths, bos_id: int | None):
    """(R, T-1) bool: position t is trained (its label is input_ids[:, t+1]) iff t < length - 1 and, under the
    BOS_PER_ROW rule, the label is not the BOS."""
    if isinstance(input_ids, np.ndarray):
        lengths = np.asarray(lengths)
    mask = real_tokens(lengths - 1, input_ids.shape[1] - 1)
    if bos_id is not None:
        mask = mask & (input_ids[:, 1:] != bos_id)
    return mask
