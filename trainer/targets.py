"""What the loss consumes, built in one place: the correction weight and the teacher's distribution per position.

MFT trains the student against p^C = (1 - w) p + w onehot(label), with w chosen so that the label leads every
other token by at least tau (docs/MATH.md). This module turns a batch into `TeacherTargets`:
- from cache rows (`from_cache`): the first `top_k` cached columns (the top-k cut is made here and only here),
  the tail mode applied once, and w from the exact cached p_max and p_label;
- from an online teacher's logits (`from_logits`): the full distribution;
- for plain finetuning: no teacher (`no_teacher`).
Everything here is a pure tensor function.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

OBJECTIVES = ("mft", "ft", "distill-partial", "corrective-ft")
TAIL_MODES = ("bucket", "renormalize", "drop")


@dataclass
class TeacherTargets:
    """Per-position targets, rows of N positions (or (B, T-1) before flattening). Kinds:
    - no teacher (plain cross-entropy -log q_label): every field None;
    - sparse (a cache): weight, topk_ids (N, K), logprobs (N, K) and label_logprob (N,);
    - dense (an online teacher): weight and logprobs (N, V), the full vocabulary in id order.
    Log-probs are normalised over the full vocabulary. drop_tail: ignore the teacher mass outside
    top-k ∪ {label} instead of keeping it as one tail bucket (an ablation)."""

    weight: Tensor | None = None  # (N,) weight w of the one-hot label
    topk_ids: Tensor | None = None  # (N, K) long
    logprobs: Tensor | None = None  # (N, K) sparse or (N, V) dense
    label_logprob: Tensor | None = None  # (N,) sparse only
    drop_tail: bool = False

    def __post_init__(self):
        if self.logprobs is not None and self.weight is None:
            raise ValueError("TeacherTargets: a teacher needs its correction weight")
        if self.topk_ids is not None and (self.logprobs is None or self.label_logprob is None):
            raise ValueError("TeacherTargets: a sparse teacher needs logprobs and label_logprob")

    @property
    def kind(self) -> str:
        if self.logprobs is None:
            return "none"
        return "dense" if self.topk_ids is None else "sparse"

    def tensors(self) -> dict[str, Tensor]:
        """The tensor fields that are set, by name (keyword arguments of StudentLoss.forward)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "drop_tail" and getattr(self, f.name) is not None}

    def map(self, fn) -> "TeacherTargets":
        """The same targets with `fn` applied to every tensor (flattening, selecting rows, moving)."""
        return TeacherTargets(**{k: fn(v) for k, v in self.tensors().items()}, drop_tail=self.drop_tail)

    def flatten(self) -> "TeacherTargets":
        """(B, T-1, ...) -> (B*(T-1), ...)."""
        return self.map(lambda x: x.reshape(-1, *x.shape[2:]))

    def rows(self, index: Tensor) -> "TeacherTargets":
        """The positions `index` (n,) of flat targets."""
        return self.map(lambda x: x.index_select(0, index))


def no_teacher() -> TeacherTargets:
    return TeacherTargets()


def correction_weight(top1_logprob: Tensor, top1_id: Tensor, labels: Tensor, label_logprob: Tensor, *,
                      objective: str, tau: float) -> Tensor:
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


def renormalize(topk_ids: Tensor, topk_logprobs: Tensor, label_logprob: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probs shifted so the probabilities on S = top-k ∪ {label} sum to 1 (the tail ablation).

    Args: topk_ids (..., K), topk_logprobs (..., K), label_logprob (...), labels (...).
    Returns: (topk_logprobs, label_logprob) float32, same shapes; rows whose S has no mass (padding) unchanged.
    """
    lp, label_lp = topk_logprobs.float(), label_logprob.float()
    in_topk = (topk_ids == labels[..., None]).any(-1)  # (...)
    extra = torch.where(in_topk, float("-inf"), label_lp)  # the label counts once
    log_z = torch.logsumexp(torch.cat([lp, extra[..., None]], dim=-1), dim=-1)  # (...) log sum_S p
    log_z = torch.where(torch.isfinite(log_z), log_z, 0.0)  # padding rows stay finite
    return lp - log_z[..., None], label_lp - log_z


def from_cache(batch: dict, *, objective: str, tau: float, top_k: int = 0, tail: str = "bucket") -> TeacherTargets:
    """Targets from cache rows.

    Args:
        batch: input_ids (B, T), topk_ids (B, T-1, K), topk_logprobs (B, T-1, K), label_logprob (B, T-1).
        objective, tau: as in correction_weight ("ft": no teacher).
        top_k: use the first top_k columns (0: all); being sorted, they are the teacher's top-k exactly.
        tail: "bucket" (exact), "renormalize" or "drop" (see TAIL_MODES).
    Returns:
        TeacherTargets of shapes (B, T-1, ...). w always comes from the exact cached p_max (column 0) and
        p_label, whatever the tail mode does to the distribution.
    """
    if objective == "ft":
        return no_teacher()
    if tail not in TAIL_MODES:
        raise ValueError(f"--tail must be one of {TAIL_MODES}; got {tail!r}")
    labels = batch["input_ids"][:, 1:]  # (B, T-1)
    ids, lp, label_lp = batch["topk_ids"], batch["topk_logprobs"], batch["label_logprob"]
    w = correction_weight(lp[..., 0], ids[..., 0], labels, label_lp, objective=objective, tau=tau)
    if top_k:
        ids, lp = ids[..., :top_k], lp[..., :top_k]
    lp, label_lp = lp.float(), label_lp.float()
    if tail == "renormalize":
        lp, label_lp = renormalize(ids, lp, label_lp, labels)
    return TeacherTargets(w, ids, lp, label_lp, drop_tail=tail == "drop")


def from_logits(teacher_logits: Tensor, labels: Tensor, *, objective: str, tau: float) -> TeacherTargets:
    """Targets from an online teacher's logits (the paper's Algorithm 1: the full distribution, every step).

    Args: teacher_logits (B, T-1, V) at the positions predicting `labels` (B, T-1).
    Returns: dense TeacherTargets of shapes (B, T-1, ...), log-probs float32.
    """
    if objective == "ft":
        return no_teacher()
    lp = torch.log_softmax(teacher_logits.float(), dim=-1)  # (B, T-1, V)
    top1_lp, top1_id = lp.max(-1)
    label_lp = lp.gather(-1, labels[..., None])[..., 0]
    return TeacherTargets(correction_weight(top1_lp, top1_id, labels, label_lp, objective=objective, tau=tau),
                          logprobs=lp)


def check_top_k(top_k: int, cache_top_k: int, what: str) -> None:
    """--top-k reads the first columns of a cache: it cannot exceed what the cache holds."""
    if top_k > cache_top_k:
        raise ValueError(f"--top-k {top_k} exceeds the top-k of {cache_top_k} that {what} holds")
