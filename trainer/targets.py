"""Corrected targets: how much of the one-hot label MFT mixes into the teacher distribution.

p^C = (1 - w) p + w onehot(label), with w chosen so that the label leads every other token by at
least tau (arXiv 2506.15702; shared/MATH.md). Everything here is a pure tensor function.
"""
from __future__ import annotations

import torch
from torch import Tensor

OBJECTIVES = ("mft", "ft", "distill-partial", "corrective-ft")
TAIL_MODES = ("bucket", "renormalize", "drop")


def correction_weight(
    top1_logprob: Tensor,
    top1_id: Tensor,
    labels: Tensor,
    label_logprob: Tensor,
    *,
    objective: str,
    tau: float,
) -> Tensor:
    """Weight of the one-hot label in the corrected target, per position.

    Args:
        top1_logprob: (N,) teacher log-prob of its argmax token (normalised over the full vocabulary).
        top1_id: (N,) long, the teacher's argmax id (ties broken as torch.topk does).
        labels: (N,) long, the label ids.
        label_logprob: (N,) teacher log-prob of the label.
        objective: one of OBJECTIVES.
            "mft": a where the teacher is wrong, b where it is right;
            "ft": 1 everywhere (plain fine-tuning);
            "distill-partial": a where wrong, 0 where right;
            "corrective-ft": 1 where wrong, 0 where right.
        tau: the margin in [0, 1] by which the label must lead in p^C.
            a = (p_max - p_l + tau) / (1 + p_max - p_l)
            b = (min(1, p_l + tau) - p_l) / (1 - p_l) = min(1, tau / (1 - p_l)), and 1 at p_l = 1.

    Returns:
        (N,) float32 weights in [0, 1]; finite for any finite inputs.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if not 0.0 <= tau <= 1.0:  # also refuses NaN
        raise ValueError(f"--tau must be in [0, 1]; got {tau!r}")
    wrong = top1_id != labels  # (N,)
    if objective == "ft":
        return torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    if objective == "corrective-ft":
        return wrong.float()

    ll = label_logprob.float()  # (N,)
    d = top1_logprob.float().exp() - ll.exp()  # (N,) p_max - p_l, >= 0 where wrong
    a = (d + tau) / (1 + d)  # (N,) denominator >= 1 where wrong
    if objective == "distill-partial":
        w = torch.where(wrong, a, 0.0)
    else:
        # b = min(1 - p_l, tau) / (1 - p_l); 1 - p_l = -expm1(log p_l) stays exact near p_l = 1, and
        # b = 1 whenever 1 - p_l <= tau, which covers 1 - p_l == 0 without dividing by it.
        rest = -torch.expm1(ll)  # (N,) 1 - p_l
        b = torch.where(rest > tau, tau / rest.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
        w = torch.where(wrong, a, b)
    # w mixes two distributions: keep it in [0, 1] even where cached log-probs were rounded so
    # that a label outside the top-1 looks more likely than the top-1 (p_max < p_l).
    return w.clamp(0.0, 1.0)


def corrected_targets(teacher_logprobs: Tensor, labels: Tensor, w: Tensor) -> Tensor:
    """Dense corrected targets p^C = (1 - w) p + w onehot(label), for tests and small diagnostics.

    Args:
        teacher_logprobs: (N, V) full-vocabulary teacher log-probs.
        labels: (N,) long.
        w: (N,) weights from correction_weight.

    Returns:
        (N, V) float32 p^C.
    """
    w = w.float()[:, None]  # (N, 1)
    p = teacher_logprobs.float().exp()  # (N, V)
    return ((1 - w) * p).scatter_add(1, labels[:, None], w)  # (N, V)


def sparse_teacher(
    topk_ids: Tensor, topk_logprobs: Tensor, label_logprob: Tensor, labels: Tensor, *, top_k: int = 0, tail: str = "bucket"
) -> tuple[Tensor, Tensor, Tensor]:
    """The cached sparse teacher as the loss will see it: the first `top_k` columns, and the tail's treatment.

    Args:
        topk_ids: (..., K) ids, by descending log-prob.
        topk_logprobs: (..., K) their log-probs over the full vocabulary.
        label_logprob: (...) the label's log-prob.
        labels: (...) the label ids.
        top_k: keep the first top_k columns (0: all); being sorted, they are the teacher's top-k exactly.
        tail: "bucket" or "drop": values unchanged (the loss keeps or ignores the mass outside S);
            "renormalize": log-probs shifted so the probabilities on S = top-k ∪ {label} sum to 1.

    Returns:
        (topk_ids, topk_logprobs float32, label_logprob float32) of shapes (..., k), (..., k), (...).
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"--tail must be one of {TAIL_MODES}; got {tail!r}")
    k = topk_ids.shape[-1]
    if top_k > k:
        raise ValueError(f"--top-k {top_k} exceeds the cache's top-k of {k}")
    if top_k:
        topk_ids, topk_logprobs = topk_ids[..., :top_k], topk_logprobs[..., :top_k]
    lp, label_lp = topk_logprobs.float(), label_logprob.float()
    if tail == "renormalize":
        in_topk = (topk_ids == labels[..., None]).any(-1)  # (...)
        extra = torch.where(in_topk, float("-inf"), label_lp)  # the label counts once
        log_z = torch.logsumexp(torch.cat([lp, extra[..., None]], dim=-1), dim=-1)  # (...) log sum_S p
        log_z = torch.where(torch.isfinite(log_z), log_z, 0.0)  # padding rows stay finite
        lp, label_lp = lp - log_z[..., None], label_lp - log_z
    return topk_ids, lp, label_lp
