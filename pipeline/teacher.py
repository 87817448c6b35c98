"""The teacher's pass over one batch: final hidden states -> full-vocabulary log_softmax in chunks of
positions -> top-k log-probs and ids, and the label's log-prob. Never a [B, T, V] logits tensor."""
from __future__ import annotations

import torch

from mft_cache.masks import real_tokens
from mft_cache.models import hidden_states


def auto_chunk_tokens(vocab_size: int, budget_bytes: int = 1 << 28) -> int:
    """Positions per chunk so one chunk's fp32 logits take about `budget_bytes` (256 MiB)."""
    return max(1, min(8192, budget_bytes // (4 * vocab_size)))


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, labels: torch.Tensor, head, k: int, chunk_tokens: int):
    """Top-k and label log-probs of the next-token distribution at each position.

    Args:
        hidden: (N, H) final hidden states of the positions.
        labels: (N,) the next token of each position.
        head: callable (n, H) -> (n, V) logits.
        k: how many of the most likely tokens to keep.
        chunk_tokens: positions per chunk.
    Returns:
        topk_lp (N, k) float32, descending; topk_ids (N, k) int64; label_lp (N,) float32. Log-probs are
        log_softmax over the full vocabulary at temperature 1, in float32.
    """
    n = hidden.shape[0]
    topk_lp = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    topk_ids = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    label_lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk_tokens):
        e = min(n, s + chunk_tokens)
        lp = torch.log_softmax(head(hidden[s:e]).float(), dim=-1)  # (n, V) fp32
        vals, ids = torch.topk(lp, k, dim=-1, sorted=True)
        topk_lp[s:e], topk_ids[s:e] = vals, ids
        label_lp[s:e] = lp.gather(1, labels[s:e, None]).squeeze(1)
        del lp  # before the next chunk's logits are made: one chunk's (n, V) buffers alive at a time, not two
    return topk_lp, topk_ids, label_lp


@torch.no_grad()
def teach_batch(backbone, head, input_ids: torch.Tensor, lengths: torch.Tensor, k: int, chunk_tokens: int,
                valid: torch.Tensor, forward_kwargs: dict | None = None):
    """One batch of packed rows (B, T) -> the teacher's values at the positions where `valid` (B, T-1) is True,
    (N, ...) in row order: the head runs on those alone. `forward_kwargs`: what the backbone gets instead of the
    padding mask (mft_cache.attention.packed_forward_kwargs: documents packed whole).

    Returns:
        topk_lp (N, k) float32, topk_ids (N, k) int64, label_lp (N,) float32 (topk_logprobs).
    """
    t = input_ids.shape[1]
    attention_mask = real_tokens(lengths, t).long()  # (B, T)
    h = hidden_states(backbone, input_ids, **(forward_kwargs or {"attention_mask": attention_mask}))
    labels = input_ids[:, 1:]  # (B, T-1)
    lp, ids, label_lp = topk_logprobs(h[:, :-1][valid], labels[valid], head, k, chunk_tokens)  # (N, K), (N, K), (N,)
    if not torch.isfinite(lp[:, 0]).all() or torch.isnan(label_lp).any():
        raise FloatingPointError("the teacher produced NaN log-probabilities; try --dtype float32")
    return lp, ids, label_lp
