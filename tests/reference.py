"""Plain references the library is tested against: written with autograd and dense tensors, for clarity, not speed.

`sparse_mft_loss` is the MFT loss per position exactly as docs/MATH.md writes it (the library computes it, with its
gradient in closed form, in mft_cache.trainer.loss.chunk_loss_and_grad); `corrected_targets` is p^C itself.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sparse_mft_loss(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    mask: Tensor,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    label_logprob: Tensor | None = None,
    drop_tail: bool = False,
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
        drop_tail: the ablation other distillation tools make: ignore the teacher mass m outside
            S = top-k ∪ {label} (no tail bucket; the target then sums to 1 - m).

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
        if drop_tail:
            m = torch.zeros_like(m)
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


def corrected_targets(teacher_logprobs: Tensor, labels: Tensor, w: Tensor) -> Tensor:
    """Dense corrected targets p^C = (1 - w) p + w onehot(label).

    Args: teacher_logprobs (N, V) full-vocabulary log-probs, labels (N,) long, w (N,) weights.
    Returns: (N, V) float32 p^C.
    """
    w = w.float()[:, None]  # (N, 1)
    p = teacher_logprobs.float().exp()  # (N, V)
    return ((1 - w) * p).scatter_add(1, labels[:, None], w)  # (N, V)
