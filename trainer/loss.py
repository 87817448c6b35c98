"""The MFT loss against a sparse (cached top-k) or dense teacher, its chunked form for any head, and
its fused form for a linear head (logits and their gradients in one pass, nothing recomputed).

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
    drop_tail: bool = False,
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
        return sparse_mft_loss(head(h), *rows, drop_tail=drop_tail).sum()

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


# ----- fused output layer + loss -----

def _chunk_loss_and_grad(
    z: Tensor, labels: Tensor, weight: Tensor | None, teacher_ids: Tensor | None, teacher_logprobs: Tensor | None,
    label_logprob: Tensor | None, need_grad: bool, drop_tail: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """sparse_mft_loss of every row of one chunk (all rows count), and its gradient with respect to z.

    z: (c, V) float32 logits, overwritten (it becomes the gradient). Returns ((c,) losses, (c, V) dL/dz
    or None). The gradient is that of the loss as sparse_mft_loss computes it, q·(Σ_S p + m) - p on S
    and the tail's share, which is q - t of shared/MATH.md wherever Σ_S p <= 1.
    """
    neg_inf = float("-inf")
    if teacher_logprobs is not None and teacher_ids is None:  # dense teacher: S is the whole vocabulary
        w = weight.float()  # (c,)
        p = teacher_logprobs.float().exp()  # (c, V)
        p_sum = p.sum(-1)  # (c,)
        pz = torch.linalg.vecdot(p, z)  # (c,) Σ_j p_j z_j
        z_label = z.gather(1, labels[:, None]).squeeze(1)  # (c,)
        zmax = z.amax(-1)  # (c,)
        e = z.sub_(zmax[:, None]).exp_()  # (c, V) in z's memory: q·Σe
        e_sum = e.sum(-1)  # (c,)
        lse = zmax + e_sum.log()  # (c,)
        loss = (1 - w) * (p_sum * lse - pz) + w * (lse - z_label)
        if not need_grad:
            return loss, None
        g = e.mul_((((1 - w) * p_sum + w) / e_sum)[:, None])  # (c, V) Σ-weighted q
        g.sub_(p.mul_((1 - w)[:, None]))
        return loss, g.scatter_add_(1, labels[:, None], -w[:, None])

    # Sparse teacher, or none (S = {label}). S's logits are gathered; the rest of z (the tail) is
    # exponentiated relative to its own maximum, so the tail's mass never underflows, whatever the
    # student puts on S; logsumexp(z) then comes from S's part and the tail's part in O(c·K).
    if teacher_logprobs is None:  # plain cross-entropy: w = 1, no teacher mass
        s_ids = labels[:, None]  # (c, 1)
        p_s = z.new_zeros(z.shape[0], 1)  # (c, 1)
        w = z.new_ones(z.shape[0])  # (c,)
        dup = None
    else:
        ids = teacher_ids.long()  # (c, K)
        in_topk = (ids == labels[:, None]).any(-1)  # (c,)
        s_ids = torch.cat([ids, labels[:, None]], dim=1)  # (c, K+1); the label's column last
        lp_label = torch.where(in_topk, neg_inf, label_logprob.float())  # (c,) counted once
        p_s = torch.cat([teacher_logprobs.float(), lp_label[:, None]], dim=1).exp()  # (c, K+1)
        w = weight.float()  # (c,)
        dup = in_topk
    p_sum = p_s.sum(-1)  # (c,) Σ_S p
    m = (1 - p_sum).clamp_min(0.0)  # (c,) teacher mass off S
    if drop_tail:  # the ablation: no tail bucket (its loss term and gradient share vanish with m)
        m = torch.zeros_like(m)

    z_s = z.gather(1, s_ids)  # (c, K+1)
    z_label = z_s[:, -1]  # (c,)
    z_s_once = z_s if dup is None else torch.cat([z_s[:, :-1], torch.where(dup, neg_inf, z_label)[:, None]], 1)
    lse_s = torch.logsumexp(z_s_once, dim=-1)  # (c,) log Σ_S e^z
    z.scatter_(1, s_ids, neg_inf)  # (c, V) the tail's logits only
    tail_max = z.amax(-1)  # (c,)
    has_tail = tail_max > neg_inf  # (c,) False where S is the whole vocabulary
    tail_max = torch.where(has_tail, tail_max, 0.0)
    e = z.sub_(tail_max[:, None]).exp_()  # (c, V) in z's memory: e^(z - tail max) on the tail, 0 on S
    e_sum = e.sum(-1)  # (c,) >= 1 where there is a tail
    lse_tail = torch.where(has_tail, tail_max + e_sum.log(), neg_inf)  # (c,) log Σ_tail e^z
    lse = torch.logaddexp(lse_s, lse_tail)  # (c,) logsumexp(z)
    # An empty tail's term is m·log 1 = 0, as in sparse_mft_loss.
    log_q_tail = torch.where(has_tail, lse_tail - lse, 0.0)  # (c,) log Σ_tail q
    log_q_s = z_s - lse[:, None]  # (c, K+1)
    ce = -(p_s * log_q_s).sum(-1) - m * log_q_tail  # (c,)
    loss = (1 - w) * ce + w * (lse - z_label)
    if not need_grad:
        return loss, None

    # dL/dz_j = A·q_j - (1-w)·m·q_j/Σ_tail q on the tail, A·q_j - (1-w)·p_j - w·[j = l] on S.
    m_tail = torch.where(has_tail, m, 0.0)  # (c,)
    a = (1 - w) * (p_sum + m_tail) + w  # (c,)
    e_sum = torch.where(has_tail, e_sum, 1.0)
    g = e.mul_((a * (tail_max - lse).exp() - (1 - w) * m_tail / e_sum)[:, None])  # (c, V) tail entries
    g.scatter_(1, s_ids, a[:, None] * log_q_s.exp())  # a duplicated label column writes the same value
    g.scatter_add_(1, s_ids, -(1 - w)[:, None] * p_s)  # the duplicated column's p is 0
    return loss, g.scatter_add_(1, labels[:, None], -w[:, None])


def _fused_forward(
    hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None, labels: Tensor, weight: Tensor | None,
    mask: Tensor, teacher_ids: Tensor | None, teacher_logprobs: Tensor | None, label_logprob: Tensor | None,
    chunk_size: int, softcap: float | None, compute_dtype: torch.dtype, need_dh: bool, need_dw: bool, need_db: bool,
    drop_tail: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The summed loss and its gradients for hidden, head_weight and head_bias (None where not needed)."""
    v = head_weight.shape[0]
    live = mask.nonzero().squeeze(1)  # (n_live,) the one host sync; masked rows never enter the math
    w_c = head_weight.to(compute_dtype)  # (V, H)
    b_c = None if head_bias is None else head_bias.to(compute_dtype)  # (V,)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.zeros_like(hidden) if need_dh else None  # (N, H) in hidden's dtype, 0 on masked rows
    dw = torch.zeros(head_weight.shape, dtype=torch.float32, device=hidden.device) if need_dw else None  # (V, H)
    db = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need_db else None  # (V,)
    need_grad = need_dh or need_dw or need_db
    for s in range(0, live.shape[0], chunk_size):
        idx = live[s : s + chunk_size]  # (c,)
        labels_c, weight_c, ids_c, lp_c, label_lp_c = (
            None if x is None else x.index_select(0, idx)
            for x in (labels, weight, teacher_ids, teacher_logprobs, label_logprob))
        h = hidden.index_select(0, idx).to(compute_dtype)  # (c, H)
        z = h @ w_c.T if b_c is None else torch.addmm(b_c, h, w_c.T)  # (c, V)
        z = z.float()  # a no-op in float32
        capped = None
        if softcap:
            capped = z.div_(softcap).tanh_()  # (c, V) tanh(z / cap), kept for the chain rule
            z = capped * softcap
        loss, g = _chunk_loss_and_grad(z, labels_c, weight_c, ids_c, lp_c, label_lp_c, need_grad, drop_tail)
        total += loss.sum()
        if g is None:
            continue
        if capped is not None:  # d(cap·tanh(x/cap))/dx = 1 - tanh²
            g.addcmul_(g, capped.square_(), value=-1.0)
        if need_db:
            db += g.sum(0)
        g = g.to(compute_dtype)
        if need_dh:
            dh.index_copy_(0, idx, (g @ w_c).to(dh.dtype))
        if need_dw:
            if g.dtype == torch.float32:
                dw.addmm_(g.T, h)
            else:
                dw += g.T @ h  # one chunk's product in compute_dtype, summed over chunks in float32
    dw = None if dw is None else dw.to(head_weight.dtype)
    db = None if db is None else db.to(head_bias.dtype)
    return total, dh, dw, db


class _FusedLinearMFTLoss(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, head_weight, head_bias, labels, weight, mask, teacher_ids, teacher_logprobs,
                label_logprob, chunk_size, softcap, compute_dtype, drop_tail=False):
        need = ctx.needs_input_grad
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly
            total, dh, dw, db = _fused_forward(
                hidden, head_weight, head_bias, labels, weight, mask, teacher_ids, teacher_logprobs, label_logprob,
                chunk_size, softcap, compute_dtype, need[0], need[1], head_bias is not None and need[2], drop_tail)
        ctx.save_for_backward(dh, dw, db)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        dh, dw, db = ctx.saved_tensors
        scale = [None if x is None else x * grad_output.to(x.dtype) for x in (dh, dw, db)]
        return (*scale, None, None, None, None, None, None, None, None, None, None)


def fused_linear_mft_loss(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor,
    weight: Tensor | None,
    mask: Tensor,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    label_logprob: Tensor | None = None,
    chunk_size: int = 1024,
    softcap: float | None = None,
    drop_tail: bool = False,
) -> Tensor:
    """chunked_mft_loss for a linear output layer, without recomputing logits in the backward.

    The forward computes, chunk by chunk of unmasked positions, the logits h W^T + b (soft-capped as
    cap·tanh(z/cap) when softcap is set), the loss and its gradient dL/dz in closed form (MATH.md),
    and from it dL/dh = g W and dL/dW += g^T h, dL/db += Σ g; it keeps only dL/dh (N, H), dL/dW and
    dL/db, which the backward scales by the incoming gradient. One chunk of logits exists at a time.
    The loss math is float32; the matmuls run in the autocast dtype where autocast is on (else in
    hidden's dtype), and the gradients come back in the inputs' dtypes. Teacher values and weights
    get no gradient. The gradient of W (of the bias) is computed only if it requires grad.

    Args:
        hidden: (N, H) final hidden states.
        head_weight: (V, H) output embedding (tied or not). head_bias: (V,) or None.
        labels, weight, mask, teacher_ids, teacher_logprobs, label_logprob: per position, as in
            sparse_mft_loss (rows of N).
        chunk_size: positions per chunk.
        softcap: final logit soft-capping value (Gemma-style), or None.
        drop_tail: ignore the teacher mass outside top-k ∪ {label} (as sparse_mft_loss).

    Returns:
        float32 scalar: the SUM of per-position losses, equal to chunked_mft_loss's. All positions
        masked: an exact 0 whose gradients are zeros.
    """
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1; got {chunk_size}")
    if teacher_logprobs is not None and weight is None:
        raise ValueError("fused_linear_mft_loss: weight is required with a teacher")
    if teacher_ids is not None and label_logprob is None:
        raise ValueError("fused_linear_mft_loss: label_logprob is required with teacher_ids")
    if teacher_logprobs is None:
        weight = teacher_ids = label_logprob = None
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, head_weight.dtype)
    args = (hidden, head_weight, head_bias, labels, weight, mask, teacher_ids, teacher_logprobs, label_logprob,
            chunk_size, softcap or None)
    grads = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, head_weight, head_bias)]
    if any(grads):
        return _FusedLinearMFTLoss.apply(*args, compute_dtype, drop_tail)
    with torch.autocast(device, enabled=False):  # evaluation: the loss alone
        return _fused_forward(*args, compute_dtype, False, False, False, drop_tail)[0]
