"""The student and its loss as one nn.Module, so that DDP/FSDP see the whole forward (their hooks fire) while
the output layer still runs in chunks of positions (loss.py)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mft_cache.attention import packed_forward_kwargs
from mft_cache.masks import real_tokens
from mft_cache.models import backbone_and_head, hidden_states, output_linear

from .loss import LOSS_IMPLS, chunked_mft_loss, fused_linear_mft_loss
from .targets import TeacherTargets


class StudentLoss(nn.Module):
    """forward(input_ids, length, label_mask, **teacher tensors) -> (summed loss, number of trained positions); with
    per_row=True (evaluation) -> ((B,) summed loss of each row, (B,) trained positions of each row). With
    segment_ids (B, T) (documents packed whole), every document attends only to itself, from position 0
    (mft_cache.attention), as the teacher saw it.

    Args:
        model: a transformers causal LM (possibly wrapped by peft).
        chunk_size: positions per chunk of the output layer.
        impl: "fused" (a plain linear head: logits and gradients in one pass; any other head falls back to
            "checkpointed"), "checkpointed" (the head's own forward, chunk by chunk under activation
            checkpointing), or "transformers" (the model's own loss over full logits; plain cross-entropy only,
            kept to measure against).
    """

    def __init__(self, model: nn.Module, chunk_size: int, impl: str = "fused"):
        super().__init__()
        if impl not in LOSS_IMPLS:
            raise ValueError(f"--loss-impl must be one of {LOSS_IMPLS}; got {impl!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size (--chunk-size) must be an integer >= 1; got {chunk_size!r}")
        self.model, self.chunk_size, self.impl = model, chunk_size, impl

    def forward(self, input_ids, length, label_mask, weight=None, topk_ids=None, logprobs=None, label_logprob=None,
                drop_tail=False, per_row=False, segment_ids=None):
        b, t = input_ids.shape
        if segment_ids is not None:  # the model itself, not a wrapper: its config says how it attends
            attention = packed_forward_kwargs(self.model, segment_ids)  # 4-D mask (or varlen) and position ids
        else:
            attention = {"attention_mask": real_tokens(length, t).long()}
        targets = TeacherTargets(weight, topk_ids, logprobs, label_logprob, drop_tail)
        if self.impl == "transformers":
            if per_row:
                return self._transformers_row_losses(input_ids, attention, label_mask, targets)
            return self._transformers_loss(input_ids, attention, label_mask, targets)
        backbone, head = backbone_and_head(self.model)
        h = hidden_states(backbone, input_ids, **attention)[:, :-1].reshape(b * (t - 1), -1)  # (N, H)
        flat_mask = label_mask.reshape(-1)  # (N,) trained positions
        labels = input_ids[:, 1:].reshape(-1)  # (N,)
        targets = targets.flatten()
        linear, softcap = output_linear(self.model) if self.impl == "fused" else (None, None)

        def loss_of(rows: slice):  # the summed loss of the positions in `rows`
            idx = torch.arange(rows.start, rows.stop, device=h.device)
            if linear is not None:
                return fused_linear_mft_loss(h[rows], linear.weight, linear.bias, labels[rows], flat_mask[rows],
                                             targets.rows(idx), chunk_size=self.chunk_size, softcap=softcap)
            return chunked_mft_loss(h[rows], head, labels[rows], flat_mask[rows], targets.rows(idx),
                                    chunk_size=self.chunk_size)

        if per_row:  # each row's own sum: the standard error of an evaluation is over sequences
            losses = torch.stack([loss_of(slice(i * (t - 1), (i + 1) * (t - 1))) for i in range(b)])  # (B,)
            return losses, label_mask.sum(-1)
        if linear is not None:
            loss = fused_linear_mft_loss(h, linear.weight, linear.bias, labels, flat_mask, targets,
                                         chunk_size=self.chunk_size, softcap=softcap)
        else:
            loss = chunked_mft_loss(h, head, labels, flat_mask, targets, chunk_size=self.chunk_size)
        return loss, flat_mask.sum()

    def _transformers_loss(self, input_ids, attention, mask, targets: TeacherTargets):
        if targets.kind != "none":
            raise ValueError("--loss-impl transformers computes plain cross-entropy only (--objective ft)")
        labels = torch.full_like(input_ids, -100)
        labels[:, 1:] = torch.where(mask, input_ids[:, 1:], -100)  # the model shifts labels itself
        n = mask.sum()
        loss = self.model(input_ids=input_ids, **attention, labels=labels, use_cache=False).loss
        return loss.float() * n, n

    def _transformers_row_losses(self, input_ids, attention, mask, targets: TeacherTargets):
        """per_row for --loss-impl transformers: the model's full logits, cross-entropy summed per row."""
        if targets.kind != "none":
            raise ValueError("--loss-impl transformers computes plain cross-entropy only (--objective ft)")
        logits = self.model(input_ids=input_ids, **attention, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, T-1)
        return torch.where(mask, nll, 0.0).sum(-1), mask.sum(-1)
