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

from mft_cache.models import tokenizer_fingerprint, vocab_size_of
from mft_cache.storage import Manifest, open_cache

from .data import Rows, step_rows
from .loss import LOSS_IMPLS
from .loss_module import StudentLoss
from .targets import OBJECTIVES, TAIL_MODES, from_cache
from .train import student_forward


class CacheDataset(torch.utils.data.Dataset):
    """The rows of a cache folder (checked as `mft train` checks it): item i is row i as a dict of tensors,
    input_ids (T,), length (), label_mask (T-1,) of trained positions, topk_ids (T-1, K), topk_logprobs (T-1, K) in the
    stored dtype, label_logprob (T-1,); with documents packed whole (chat data), segment_ids (T,), which MFTLoss
    turns into the same block-causal attention the teacher had.

    model (and tokenizer), when given: the student, refused unless it predicts the cache's vocabulary (and its
    tokenizer is the one the cache was made with), as `mft train` refuses it (check_student)."""

    def __init__(self, cache: str | Path, model: torch.nn.Module | None = None, tokenizer=None):
        self.cache = open_cache(cache)
        self.rows = Rows(self.cache)
        if model is not None or tokenizer is not None:
            self.check_student(model, tokenizer)

    @property
    def manifest(self) -> Manifest:
        return self.cache.manifest

    def check_student(self, model: torch.nn.Module | None, tokenizer=None, tokenizer_arg: str = "tokenizer") -> None:
        """Refuse a model whose vocabulary, or a tokenizer (`tokenizer_arg`: the argument that gave it), that is not
        the cache's teacher's: the cached targets would name other tokens."""
        m = self.manifest
        if model is not None:
            vocab = vocab_size_of(model)
            if vocab != m.vocab_size:
                raise ValueError(f"model: predicts a vocabulary of {vocab} tokens, but the cache {self.cache.folder} "
                                 f"was made with {m.vocab_size} ({m.model.id}); use a student with the teacher's "
                                 "vocabulary")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != m.tokenizer.fingerprint:
            raise ValueError(f"{tokenizer_arg}: not the tokenizer the cache {self.cache.folder} was made with "
                             f"({m.model.id}); the cached targets would name the wrong tokens")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.rows.batch([int(i)]).items()}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CacheDataset items -> the batch dict `mft train` feeds its loss (the same as Rows.batch of those rows)."""
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


class MFTLoss:
    """loss(model, batch) -> the MFT loss of a batch (a scalar): sum over its trained tokens / their number.

    Args: objective ("mft", "ft" or the ablations), tau, top_k (0: every cached column), tail ("bucket", the exact
    loss; "renormalize" or "drop"), chunk_size (positions per chunk of the output layer), impl ("fused" or
    "checkpointed"), as the `mft train` flags of those names, each refused with a ValueError naming it when out of
    range; vocab_size: the cache's vocabulary (CacheDataset.manifest.vocab_size; MFTTrainer sets it from its
    datasets), where given a model that predicts another is refused."""

    def __init__(self, objective: str = "mft", tau: float = 0.25, top_k: int = 0, tail: str = "bucket",
                 chunk_size: int = 1024, impl: str = "fused", vocab_size: int | None = None):
        if objective not in OBJECTIVES:
            raise ValueError(f"MFTLoss: objective must be one of {OBJECTIVES}; got {objective!r}")
        if tail not in TAIL_MODES:
            raise ValueError(f"MFTLoss: tail must be one of {TAIL_MODES}; got {tail!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:  # also refuses NaN
            raise ValueError(f"MFTLoss: tau must be a number in [0, 1]; got {tau!r}")
        for name, value, least in (("top_k", top_k, 0), ("chunk_size", chunk_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"MFTLoss: {name} must be an integer >= {least}; got {value!r}")
        if impl not in LOSS_IMPLS or (impl == "transformers" and objective != "ft"):
            raise ValueError(f"MFTLoss: impl must be 'fused' or 'checkpointed' ('transformers' with objective 'ft' "
                             f"only); got {impl!r}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"MFTLoss: vocab_size must be a positive integer or None; got {vocab_size!r}")
        self.objective, self.tau, self.top_k, self.tail, self.chunk_size, self.impl = (
            objective, tau, top_k, tail, chunk_size, impl)
        self.vocab_size = vocab_size

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.vocab_size is not None and vocab_size_of(model) != self.vocab_size:
            raise ValueError(f"model: predicts a vocabulary of {vocab_size_of(model)} tokens, but MFTLoss's cache "
                             f"(vocab_size) holds targets over {self.vocab_size}; use a student with the teacher's "
                             "vocabulary")
        if self.top_k and self.top_k > batch["topk_ids"].shape[-1]:
            raise ValueError(f"MFTLoss: top_k {self.top_k} exceeds the top-k of {batch['topk_ids'].shape[-1]} that "
                             "the batch holds")
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
        if mft_loss is not None and not isinstance(mft_loss, MFTLoss):
            raise ValueError(f"mft_loss must be an MFTLoss; got {type(mft_loss).__name__}")
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        self.mft_loss = mft_loss or MFTLoss()
        self.same_order_as_mft_train = same_order_as_mft_train
        self._check_caches()

    def _check_caches(self) -> None:
        """The student, its tokenizer and mft_loss against every CacheDataset given, as `mft train` checks them
        against its cache: the same vocabulary and tokenizer, a top_k the caches hold; mft_loss then refuses a
        model of another vocabulary at every call."""
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        caches = [d for d in (self.train_dataset, *evals) if isinstance(d, CacheDataset)]
        tokenizer = getattr(self, "processing_class", None)
        tokenizer = tokenizer if hasattr(tokenizer, "get_vocab") else None  # a tokenizer, not another processor
        for ds in caches:
            ds.check_student(self.model, tokenizer, tokenizer_arg="processing_class")
            if self.mft_loss.top_k > ds.manifest.top_k:
                raise ValueError(f"mft_loss: top_k {self.mft_loss.top_k} exceeds the top-k of {ds.manifest.top_k} "
                                 f"that the cache {ds.cache.folder} holds")
        if caches and self.mft_loss.vocab_size is None:
            self.mft_loss.vocab_size = caches[0].manifest.vocab_size

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
