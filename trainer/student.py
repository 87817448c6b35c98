"""The student: loading it, checking it against the cache, and its loss as one nn.Module.

The loss lives inside the module that `accelerator.prepare` wraps, so DDP/FSDP see the whole
forward (their hooks fire) while the output layer still runs in chunks of positions.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from mft_cache.models import backbone_and_head, hidden_states, output_linear, tokenizer_fingerprint, vocab_size_of

from mft_cache.storage.packing import bos_rule

from .loss import chunked_mft_loss, fused_linear_mft_loss
from .targets import correction_weight

log = logging.getLogger(__name__)


def check_student(manifest: dict, tokenizer, model: nn.Module, model_id: str) -> None:
    """Refuse a student whose tokenizer or vocabulary differs from the cache's teacher."""
    cached_vocab, vocab = int(manifest["vocab_size"]), vocab_size_of(model)
    if vocab != cached_vocab:
        raise ValueError(f"--model {model_id} predicts a vocabulary of {vocab} tokens but the cache was made with "
                         f"{cached_vocab} ({manifest['model']['id']}); use a student with the teacher's vocabulary")
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise ValueError(f"--model {model_id}: its tokenizer differs from the one the cache was made with "
                         f"({manifest['model']['id']}); the cached targets would name the wrong tokens")
    if "packing" not in manifest and bos_rule(tokenizer) is not None:
        log.warning("the cache was made before rows started with BOS: the tokenizer of %s adds a BOS, but most of the "
                    "cache's rows start without one, so the teacher's targets and the training rows are degraded; "
                    "rebuild the cache (mft cache --overwrite) with this version", model_id)


def position_mask(length: torch.Tensor, num_positions: int) -> torch.Tensor:
    """(B, T-1) bool: position t has a real label (t < length - 1)."""
    return torch.arange(num_positions, device=length.device)[None, :] < (length[:, None] - 1)


def cache_weight(batch: dict, objective: str, tau: float) -> torch.Tensor:
    """(B, T-1) correction weight from the cache: top-1 is topk[..., 0], both log-probs exact."""
    labels = batch["input_ids"][:, 1:]
    return correction_weight(batch["topk_logprobs"][..., 0], batch["topk_ids"][..., 0], labels,
                             batch["label_logprob"], objective=objective, tau=tau)


@torch.no_grad()
def online_targets(teacher: nn.Module, batch: dict, objective: str, tau: float) -> dict:
    """The paper's Algorithm 1: the teacher's full next-token distribution, every step."""
    attention = position_mask(batch["length"] + 1, batch["input_ids"].shape[1]).long()  # (B, T): t < length
    logits = teacher(input_ids=batch["input_ids"], attention_mask=attention, use_cache=False).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
    labels = batch["input_ids"][:, 1:]
    top1_lp, top1_id = lp.max(-1)
    label_lp = lp.gather(-1, labels[..., None])[..., 0]
    w = correction_weight(top1_lp, top1_id, labels, label_lp, objective=objective, tau=tau)
    return {"weight": w, "teacher_logprobs": lp}


class StudentLoss(nn.Module):
    """forward(batch) -> (summed loss, number of label tokens) of one micro-batch."""

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, length, mask, weight=None, topk_ids=None, topk_logprobs=None, label_logprob=None,
                teacher_logprobs=None, drop_tail=False):
        backbone, head = backbone_and_head(self.model)
        b, t = input_ids.shape
        attention = (torch.arange(t, device=input_ids.device)[None, :] < length[:, None]).long()
        h = hidden_states(backbone, input_ids, attention)[:, :-1].reshape(b * (t - 1), -1)  # (N, H)
        mask = mask.reshape(-1)  # (N,) trained positions
        labels = input_ids[:, 1:].reshape(-1)

        def flat(x, trailing=0):
            return None if x is None else x.reshape(b * (t - 1), *x.shape[x.dim() - trailing:])

        if topk_ids is not None:  # sparse teacher from the cache
            teacher = (flat(topk_ids, 1), flat(topk_logprobs, 1), flat(label_logprob))
        elif teacher_logprobs is not None:  # dense online teacher
            teacher = (None, flat(teacher_logprobs, 1), None)
        else:  # plain cross-entropy
            teacher = (None, None, None)
        linear, softcap = output_linear(self.model)
        if linear is not None:  # logits and their gradients in one pass, none recomputed in the backward
            loss = fused_linear_mft_loss(h, linear.weight, linear.bias, labels, flat(weight), mask, *teacher,
                                         chunk_size=self.chunk_size, softcap=softcap, drop_tail=drop_tail)
        else:  # any other head: through its own forward, chunk by chunk under checkpointing
            loss = chunked_mft_loss(h, head, labels, flat(weight), mask, *teacher, chunk_size=self.chunk_size,
                                    drop_tail=drop_tail)
        return loss, mask.sum()
