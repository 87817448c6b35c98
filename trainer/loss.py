"""The MFT loss against a sparse (cached top-k) or dense teacher, and its chunked form.

Per position (shared/MATH.md): loss = (1 - w) CE_S(p, q) + w (-log q_label), where S = top-k ∪ {label},
m = max(0, 1 - Σ_S p) is the teacher mass outside S and
    CE_S(p, q) = -Σ_{i∈S} p_i log q_i - m log Σ_{j∉S} q_j.
Its gradient with respect to the logits is q - t with t_j = (1-w) p_j + w [j = l] on S and
t_j = (1-w) m q_j / Σ_{j'∉S} q_{j'} on the tail.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def sparse_mft_loss(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    mask: Tensor,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    label_logprob: Tensor | None = None,
) -> Tensor:
    """Per-position MFT loss, computed in float32.

    Args:
        logits: (N, V) student logits, any float dtype.
        labels: (N,) long label ids; anything (e.g. -100) where mask is False.
        weight: (N,) weight w of the one-hot label (targets.correction_weight); ignored without a teacher.
        mask: (N,) bool, True at positions that count.
        teacher_ids: (N, K) long top-k ids of the sparse teacher, or None for a dense teacher.
        teacher_logprobs: (N, K) log-probs of teacher_ids (sparse), or (N, V) full-vocabulary
            log-probs in id order (dense), normalised over the full vocabulary; any float dtype.
            None: no teacher, the loss is the plain cross-entropy -log q_label.
        label_logprob: (N,) teacher log-prob of the label; required with teacher_ids.

    Returns:
        (N,) float32 losses, exactly 0 where mask is False; nothing from masked rows (labels,
        teacher values) reaches the values or the gradients of the others.
    """
    z = logits.float()  # (N, V)
    labels = torch.where(mask, labels, 0)  # (N,) a valid id on masked rows
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    nll = lse - z.gather(1, labels[:, None]).squeeze(1)  # (N,) -log q_label
    if teacher_logprobs is None:
        return torch.where(mask, nll, 0.0)
    if weight is None:
        raise ValueError("sparse_mft_loss: weight is required with a teacher")

    rows = mask[:, None]  # (N, 1)
    if teacher_ids is None:  # dense teacher: S is the whole vocabulary, no tail
        p = torch.where(rows, teacher_logprobs.float(), float("-inf")).exp()  # (N, V)
        ce = -(p * (z - lse[:, None])).sum(-1)  # (N,)
    else:
        if label_logprob is None:
            raise ValueError("sparse_mft_loss: label_logprob is required with teacher_ids")
        ids = torch.where(rows, teacher_ids, 0)  # (N, K) a valid id on masked rows
        s_ids = torch.cat([ids, labels[:, None]], dim=1)  # (N, K+1)
        # The label's teacher prob counts once: where it is already in the top-k, its extra column is 0.
        in_topk = (ids == labels[:, None]).any(-1)  # (N,)
        lp_label = torch.where(in_topk | ~mask, float("-inf"), label_logprob.float())  # (N,)
        lp_topk = torch.where(rows, teacher_logprobs.float(), float("-inf"))  # (N, K)
        lp_s = torch.cat([lp_topk, lp_label[:, None]], dim=1)  # (N, K+1)
        p_s = lp_s.exp()  # (N, K+1)
        m = (1 - p_s.sum(-1)).clamp_min(0.0)  # (N,) teacher mass off S
        ce_s = -(p_s * (z.gather(1, s_ids) - lse[:, None])).sum(-1)  # (N,)

        # log Σ_{j∉S} q_j = logsumexp(z off S) - logsumexp(z); never log(1 - Σ_S q), which cancels.
        in_s = torch.zeros_like(z, dtype=torch.bool).scatter_(1, s_ids, True)  # (N, V)
        has_tail = ~in_s.all(-1)  # (N,)
        # A row with an empty tail keeps its logits unmasked, a finite substitute that makes its
        # tail term m·log 1 = 0: logsumexp over all -inf is -inf (0·-inf = NaN) with a NaN gradient.
        z_tail = z.masked_fill(in_s & has_tail[:, None], float("-inf"))  # (N, V)
        log_q_tail = torch.logsumexp(z_tail, dim=-1) - lse  # (N,)
        ce = ce_s - m * log_q_tail  # (N,)

    w = torch.where(mask, weight.float(), 0.0)  # (N,)
    return torch.where(mask, (1 - w) * ce + w * nll, 0.0)


def chunked_mft_loss(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    weight: Tensor | None,
    mask: Tensor,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    label_logprob: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Sum of sparse_mft_loss over unmasked positions, never holding all N x V logits at once.

    Each chunk of positions runs under non-reentrant activation checkpointing: the forward keeps
    only the chunk's inputs, and the backward recomputes one chunk's logits at a time.

    Args:
        hidden: (N, H) final hidden states.
        head: maps (n, H) -> (n, V) logits, e.g. the model's lm_head (possibly tied to the embedding).
        labels, weight, mask, teacher_ids, teacher_logprobs, label_logprob: per position, as in
            sparse_mft_loss (rows of N).
        chunk_size: positions per chunk.

    Returns:
        float32 scalar: the SUM of per-position losses (divide by the step's token count outside).
        All positions masked: an exact 0 that still backpropagates (zeros) to hidden and head.
    """
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1; got {chunk_size}")
    n = hidden.shape[0]
    per_row = (labels, weight, mask, teacher_ids, teacher_logprobs, label_logprob)

    def chunk_loss(h: Tensor, *rows: Tensor | None) -> Tensor:
        return sparse_mft_loss(head(h), *rows).sum()

    # An empty head call: an exact 0 connected to hidden and to head's parameters, so that an
    # all-masked batch still backpropagates (zeros) to every parameter.
    total = head(hidden[:0]).float().sum()
    starts = range(0, n, chunk_size)
    live = torch.stack([mask[s : s + chunk_size].any() for s in starts]).tolist() if n else []  # one sync
    for s, is_live in zip(starts, live):
        if not is_live:
            continue
        rows = [None if x is None else x[s : s + chunk_size] for x in per_row]
        total = total + checkpoint(chunk_loss, hidden[s : s + chunk_size], *rows, use_reentrant=False)
    return total


def token_nll_sum(
    hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, mask: Tensor, chunk_size: int = 1024
) -> Tensor:
    """Summed -log q_label over unmasked positions (evaluation): chunked_mft_loss without a teacher.

    Args: hidden (N, H), head (n, H) -> (n, V), labels (N,), mask (N,) bool. Returns a float32 scalar.
    """
    return chunked_mft_loss(hidden, head, labels, None, mask, chunk_size=chunk_size)
