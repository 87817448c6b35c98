"""The student and its loss as one nn.Module, so that DDP/FSDP see the whole forward (their hooks fire) while
the output layer still runs in chunks of positions (loss.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from mft_cache.models import backbone_and_head, hidden_states, output_linear

from .loss import LOSS_IMPLS, chunked_mft_loss, fused_linear_mft_loss
from .targets import TeacherTargets


class StudentLoss(nn.Module):
    """forward(input_ids, length, mask, **teacher tensors) -> (summed loss, number of trained positions).

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
        self.model, self.chunk_size, self.impl = model, chunk_size, impl

    def forward(self, input_ids, length, mask, weight=None, topk_ids=None, logprobs=None, label_logprob=None,
                drop_tail=False):
        b, t = input_ids.shape
        attention = (torch.arange(t, device=input_ids.device)[None, :] < length[:, None]).long()  # (B, T)
        targets = TeacherTargets(weight, topk_ids, logprobs, label_logprob, drop_tail)
        if self.impl == "transformers":
            return self._transformers_loss(input_ids, attention, mask, targets)
        backbone, head = backbone_and_head(self.model)
        h = hidden_states(backbone, input_ids, attention)[:, :-1].reshape(b * (t - 1), -1)  # (N, H)
        flat_mask = mask.reshape(-1)  # (N,) trained positions
        labels = input_ids[:, 1:].reshape(-1)  # (N,)
        targets = targets.flatten()
        linear, softcap = output_linear(self.model) if self.impl == "fused" else (None, None)
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
        loss = self.model(input_ids=input_ids, attention_mask=attention, labels=labels, use_cache=False).loss
        return loss.float() * n, n
