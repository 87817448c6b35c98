"""A cache inside your own training loop (public as `mft_cache.hf`): a torch Dataset of a cache's rows, the
collator that batches them as `mft train` does, the MFT loss as a callable of (model, batch), and a
`transformers.Trainer` whose compute_loss is that loss.

The loss is `mft train`'s own: targets from `targets.from_cache`, the student's hidden states through the fused
output-layer+loss of `StudentLoss` (the full logits never exist), normalised as `mft train` does: the sum of the
per-token losses of the batch over its number of trained tokens.

    from mft_cache.hf import CacheDataset, MFTLoss, MFTTrainer, collate
    trainer = MFTTrainer(model=model, args=TrainingArguments(...), train_dataset=CacheDataset("caches/demo"),
                         mft_loss=MFTLoss(objective="mft", tau=0.25))
    trainer.train()
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

from mft_cache.storage import Manifest, open_cache

from .data import CacheRows, step_rows
from .loss_module import StudentLoss
from .targets import OBJECTIVES, TAIL_MODES, check_top_k, from_cache
from .train import student_forward


class CacheDataset(torch.utils.data.Dataset):
    """The rows of a cache folder (checked as `mft train` checks it): item i is row i as a dict of tensors,
    input_ids (T,), length (), label_mask (T-1,) of trained positions, topk_ids (T-1, K), topk_logprobs (T-1, K) in the
    stored dtype, label_logprob (T-1,); with documents packed whole (chat data), segment_ids (T,), which MFTLoss
    turns into the same block-causal attention the teacher had."""

    def __init__(self, cache: str | Path):
        self.cache = open_cache(cache)
        self.rows = CacheRows(self.cache)

    @property
    def manifest(self) -> Manifest:
        return self.cache.manifest

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.rows.batch([int(i)]).items()}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CacheDataset items -> the batch dict `mft train` feeds its loss (the same as CacheRows.batch of those rows)."""
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


class MFTLoss:
    """loss(model, batch) -> the MFT loss of a batch (a scalar): sum over its trained tokens / their number.

    Args: objective ("mft", "ft" or the ablations), tau, top_k (0: every cached column), tail ("bucket", the exact
    loss; "renormalize" or "drop"), chunk_size (positions per chunk of the output layer), impl ("fused" or
    "checkpointed"), as the `mft train` flags of those names."""

    def __init__(self, objective: str = "mft", tau: float = 0.25, top_k: int = 0, tail: str = "bucket",
                 chunk_size: int = 1024, impl: str = "fused"):
        if objective not in OBJECTIVES or tail not in TAIL_MODES or not 0.0 <= tau <= 1.0:
            raise ValueError(f"MFTLoss: objective in {OBJECTIVES}, tail in {TAIL_MODES}, tau in [0, 1]; got "
                             f"{objective!r}, {tail!r}, {tau}")
        self.objective, self.tau, self.top_k, self.tail, self.chunk_size, self.impl = (
            objective, tau, top_k, tail, chunk_size, impl)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.top_k:
            check_top_k(self.top_k, batch["topk_ids"].shape[-1], "the batch")
        targets = from_cache(batch, objective=self.objective, tau=self.tau, top_k=self.top_k, tail=self.tail)
        loss_sum, tokens = student_forward(StudentLoss(model, self.chunk_size, self.impl), batch, targets)
        return loss_sum / tokens.clamp(min=1)


class CacheOrderSampler(torch.utils.data.Sampler):
    """The rows in `mft train`'s order: step s takes rows step_rows(s, global_batch, len, seed)."""

    def __init__(self, num_rows: int, global_batch: int, steps: int, seed: int):
        self.num_rows, self.global_batch, self.steps, self.seed = num_rows, global_batch, steps, seed

    def __len__(self) -> int:
        return self.steps * self.global_batch

    def __iter__(self):
        for s in range(self.steps):
            yield from step_rows(s, self.global_batch, self.num_rows, self.seed)


class MFTTrainer(Trainer):
    """transformers.Trainer with compute_loss = MFTLoss (not compute_loss_func, which receives full logits).

    mft_loss: the MFTLoss to train with (default MFTLoss()). same_order_as_mft_train: read the rows in `mft train`'s
    order for args.seed and args.max_steps (one process) instead of Trainer's random sampler. The batch keys are
    kept (the model's forward does not name them, so Trainer would otherwise drop them); data_collator defaults to
    `collate`."""

    def __init__(self, *args, mft_loss: MFTLoss | None = None, same_order_as_mft_train: bool = False, **kwargs):
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        self.mft_loss = mft_loss or MFTLoss()
        self.same_order_as_mft_train = same_order_as_mft_train

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.mft_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            return self.mft_loss(model, inputs).detach(), None, None

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def _get_train_sampler(self, train_dataset=None):
        if not self.same_order_as_mft_train:
            return super()._get_train_sampler(train_dataset)
        a = self.args
        if a.max_steps <= 0 or a.world_size != 1:
            raise ValueError("same_order_as_mft_train needs args.max_steps and one process")
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        g = a.per_device_train_batch_size * a.gradient_accumulation_steps
        return CacheOrderSampler(len(dataset), g, a.max_steps, a.seed)
