"""The MFT loss of a student against TeacherTargets, written once: a pure per-chunk function gives the loss and
its gradient with respect to the logits; two engines run it over all positions, one chunk at a time.

Per position (docs/MATH.md): loss = (1 - w) CE_S(p, q) + w (-log q_label), where S = top-k ∪ {label},
m = max(0, 1 - Σ_S p) is the teacher mass outside S (0 with drop_tail) and
    CE_S(p, q) = -Σ_{i∈S} p_i log q_i - m log Σ_{j∉S} q_j.
A dense teacher has S = the whole vocabulary; no teacher is w = 1 (plain cross-entropy).
Its gradient with respect to the logits is q - t with t_j = (1-w) p_j + w [j = l] on S and
t_j = (1-w) m q_j / Σ_{j'∉S} q_{j'} on the tail.

- `fused_linear_mft_loss` (a linear output layer, the production path): each chunk's logits, loss and
  dL/dz in the forward, from which dL/dh and dL/dW; the backward only scales them, nothing is recomputed.
- `chunked_mft_loss` (any other head): each chunk through the head's own forward under activation
  checkpointing, the same per-chunk function supplying the loss and dL/dz to autograd.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .targets import TeacherTargets, no_teacher

LOSS_IMPLS = ("fused", "checkpointed", "transformers")


def chunk_loss_and_grad(z: Tensor, labels: Tensor, targets: TeacherTargets, need_grad: bool
                        ) -> tuple[Tensor, Tensor | None]:
    """The loss of every row of one chunk (all rows count) and its gradient with respect to the logits.

    Args:
        z: (c, V) float32 logits, overwritten (it becomes the gradient).
        labels: (c,) long.
        targets: the chunk's rows of TeacherTargets (any kind).
        need_grad: also return dL/dz.
    Returns:
        ((c,) float32 losses, (c, V) dL/dz or None). The gradient is that of the loss as written above,
        q·(Σ_S p + m) - p on S plus the tail's share, which is q - t wherever Σ_S p <= 1.
    """
    if targets.kind == "dense":
        return _dense_loss_and_grad(z, labels, targets, need_grad)
    neg_inf = float("-inf")
    # S's logits are gathered; the rest of z (the tail) is exponentiated relative to its own maximum, so the
    # tail's mass never underflows, whatever the student puts on S; logsumexp(z) then comes from S's part
    # and the tail's part in O(c·K).
    if targets.kind == "none":  # plain cross-entropy: w = 1, no teacher mass, S = {label}
        s_ids = labels[:, None]  # (c, 1)
        p_s = z.new_zeros(z.shape[0], 1)  # (c, 1)
        w = z.new_ones(z.shape[0])  # (c,)
        dup = None
    else:
        ids = targets.topk_ids.long()  # (c, K)
        dup = (ids == labels[:, None]).any(-1)  # (c,) the label is in the top-k
        s_ids = torch.cat([ids, labels[:, None]], dim=1)  # (c, K+1); the label's column last
        lp_label = torch.where(dup, neg_inf, targets.label_logprob.float())  # (c,) counted once
        p_s = torch.cat([targets.logprobs.float(), lp_label[:, None]], dim=1).exp()  # (c, K+1)
        w = targets.weight.float()  # (c,)
    p_sum = p_s.sum(-1)  # (c,) Σ_S p
    m = z.new_zeros(z.shape[0]) if targets.drop_tail else (1 - p_sum).clamp_min(0.0)  # (c,) teacher mass off S

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
    # An empty tail's term is m·log 1 = 0: a finite value, and no NaN from 0·(-inf).
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


def _dense_loss_and_grad(z: Tensor, labels: Tensor, targets: TeacherTargets, need_grad: bool
                         ) -> tuple[Tensor, Tensor | None]:
    """chunk_loss_and_grad for a dense teacher: S is the whole vocabulary, there is no tail."""
    w = targets.weight.float()  # (c,)
    p = targets.logprobs.float().exp()  # (c, V)
    p_sum = p.sum(-1)  # (c,)
    pz = (p[:, None, :] @ z[:, :, None]).view(-1)  # (c,) Σ_j p_j z_j, with no (c, V) product (vecdot makes one)
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


def _live_rows(mask: Tensor) -> Tensor:
    return mask.nonzero().squeeze(1)  # (n_live,) the one host sync; masked rows never enter the math


# ----- a linear output layer: fused -----

def _fused_chunk(hidden: Tensor, w_c: Tensor, b_c: Tensor | None, labels: Tensor, targets: TeacherTargets,
                 idx: Tensor, softcap: float | None, compute_dtype: torch.dtype, need_grad: bool,
                 dh: Tensor | None, dw: Tensor | None, db: Tensor | None) -> Tensor:
    """The summed loss of the rows idx; their gradients are added into dh, dw and db (each None when not needed)."""
    h = hidden.index_select(0, idx).to(compute_dtype)  # (c, H)
    z = h @ w_c.T if b_c is None else torch.addmm(b_c, h, w_c.T)  # (c, V)
    z = z.float()  # a no-op in float32
    capped = None
    if softcap:
        capped = z.div_(softcap).tanh_()  # (c, V) tanh(z / cap), kept for the chain rule
        z = capped * softcap
    loss, g = chunk_loss_and_grad(z, labels.index_select(0, idx), targets.rows(idx), need_grad)
    if g is None:
        return loss.sum()
    if capped is not None:  # d(cap·tanh(x/cap))/dx = 1 - tanh²
        g.addcmul_(g, capped.square_(), value=-1.0)
        capped = None  # freed before the gradient's cast below
    if db is not None:
        db += g.sum(0)
    g = g.to(compute_dtype)
    if dh is not None:
        dh.index_copy_(0, idx, (g @ w_c).to(dh.dtype))
    if dw is not None:
        if g.dtype == torch.float32:
            dw.addmm_(g.T, h)
        else:
            dw += g.T @ h  # one chunk's product in compute_dtype, summed over chunks in float32
    return loss.sum()


def _fused_forward(hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None, labels: Tensor, mask: Tensor,
                   targets: TeacherTargets, chunk_size: int, softcap: float | None, compute_dtype: torch.dtype,
                   need_dh: bool, need_dw: bool, need_db: bool
                   ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The summed loss and its gradients for hidden, head_weight and head_bias (None where not needed)."""
    live = _live_rows(mask)
    w_c = head_weight.to(compute_dtype)  # (V, H)
    b_c = None if head_bias is None else head_bias.to(compute_dtype)  # (V,)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.zeros_like(hidden) if need_dh else None  # (N, H) in hidden's dtype, 0 on masked rows
    dw = torch.zeros(head_weight.shape, dtype=torch.float32, device=hidden.device) if need_dw else None  # (V, H)
    db = torch.zeros(head_weight.shape[0], dtype=torch.float32, device=hidden.device) if need_db else None  # (V,)
    need_grad = need_dh or need_dw or need_db
    for s in range(0, live.shape[0], chunk_size):
        # one chunk per call: its (c, V) buffers die when the call returns, before the next chunk's are made
        total += _fused_chunk(hidden, w_c, b_c, labels, targets, live[s : s + chunk_size], softcap, compute_dtype,
                              need_grad, dh, dw, db)
    dw = None if dw is None else dw.to(head_weight.dtype)
    db = None if db is None else db.to(head_bias.dtype)
    return total, dh, dw, db


class _FusedLinearMFTLoss(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, head_weight, head_bias, labels, mask, targets, chunk_size, softcap, compute_dtype):
        need = ctx.needs_input_grad
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly
            total, dh, dw, db = _fused_forward(hidden, head_weight, head_bias, labels, mask, targets, chunk_size,
                                               softcap, compute_dtype, need[0], need[1],
                                               head_bias is not None and need[2])
        ctx.save_for_backward(dh, dw, db)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        scaled = [None if x is None else x * grad_output.to(x.dtype) for x in ctx.saved_tensors]
        return (*scaled, None, None, None, None, None, None)


def fused_linear_mft_loss(hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None, labels: Tensor, mask: Tensor,
                          targets: TeacherTargets | None = None, chunk_size: int = 1024,
                          softcap: float | None = None) -> Tensor:
    """The summed MFT loss for a linear output layer, without recomputing logits in the backward.

    The forward computes, chunk by chunk of unmasked positions, the logits h W^T + b (soft-capped as
    cap·tanh(z/cap) when softcap is set), the loss and dL/dz (chunk_loss_and_grad), and from it
    dL/dh = g W, dL/dW += g^T h and dL/db += Σ g; the backward scales those by the incoming gradient.
    One chunk of logits exists at a time. The loss math is float32; the matmuls run in the autocast dtype
    where autocast is on (else in hidden's dtype), and the gradients come back in the inputs' dtypes.
    Teacher values get no gradient; W's (the bias's) gradient is computed only if it requires grad.

    Args:
        hidden: (N, H) final hidden states.
        head_weight: (V, H) output embedding (tied or not). head_bias: (V,) or None.
        labels: (N,) long label ids; anything where mask is False.
        mask: (N,) bool, True at the positions that count.
        targets: flat TeacherTargets of N rows (None: plain cross-entropy).
        chunk_size: positions per chunk.
        softcap: final logit soft-capping value (Gemma-style), or None.
    Returns:
        float32 scalar: the SUM of per-position losses (divide by the step's token count outside). All
        positions masked: an exact 0 whose gradients are zeros. Nothing from masked rows (labels, teacher
        values) reaches the value or the gradients.
    """
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1; got {chunk_size}")
    targets = targets or no_teacher()
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, head_weight.dtype)
    args = (hidden, head_weight, head_bias, labels, mask, targets, chunk_size, softcap or None, compute_dtype)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, head_weight, head_bias)):
        return _FusedLinearMFTLoss.apply(*args)
    with torch.autocast(device, enabled=False):  # evaluation: the loss alone
        return _fused_forward(*args, False, False, False)[0]


# ----- any other head: checkpointed chunks -----

class _LossOfLogits(torch.autograd.Function):
    """loss(z) through chunk_loss_and_grad: its forward keeps dL/dz, its backward scales it."""

    @staticmethod
    def forward(ctx, z, labels, targets):
        with torch.autocast(z.device.type, enabled=False):  # the loss math is float32 (a dense teacher's Σ p·z too)
            loss, g = chunk_loss_and_grad(z.detach().float().clone(), labels, targets, z.requires_grad)
        ctx.save_for_backward(g if g is not None else z.new_empty(0))
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (g,) = ctx.saved_tensors
        return g * grad_output, None, None


def chunked_mft_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, mask: Tensor,
                     targets: TeacherTargets | None = None, chunk_size: int = 1024) -> Tensor:
    """fused_linear_mft_loss for any output head: a callable (n, H) -> (n, V) logits.

    Each chunk of unmasked positions runs under non-reentrant activation checkpointing: the forward keeps
    only the chunk's inputs, and the backward recomputes one chunk's logits at a time.

    Args: as fused_linear_mft_loss, with `head` in place of the weight, bias and softcap.
    Returns: float32 scalar, the SUM of per-position losses. All positions masked: an exact 0 that still
        backpropagates (zeros) to hidden and to the head's parameters.
    """
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1; got {chunk_size}")
    targets = targets or no_teacher()

    def chunk_loss(h: Tensor, idx: Tensor) -> Tensor:
        return _LossOfLogits.apply(head(h), labels.index_select(0, idx), targets.rows(idx))

    # An empty head call: an exact 0 connected to hidden and to the head's parameters.
    total = head(hidden[:0]).float().sum()
    live = _live_rows(mask)
    for s in range(0, live.shape[0], chunk_size):
        idx = live[s : s + chunk_size]
        total = total + checkpoint(chunk_loss, hidden.index_select(0, idx), idx, use_reentrant=False)
    return total
