"""A cache inside your own training loop (public as `mft_cache.hf`): a torch Dataset of a cache's rows, the
collator that batches them as `mft train` does, the MFT loss as a callable of (model, batch), and a
`transformers.Trainer` whose compute_loss is that loss.

The loss is `mft train`'s own: targets from `targets.from_cache`, the student's hidden states through the fused
output-layer+loss of `StudentLoss` (the full logits never exist), normalised as `mft train` does: the sum of the
per-token losses over the number of trained tokens. MFTLoss divides by the batch's own; MFTTrainer by those of the
whole optimiser step (every micro-batch of gradient accumulation, every process), through transformers'
`num_items_in_batch`, so that accumulation and data parallelism give the gradient of one big batch.

    from mft_cache.hf import CacheDataset, MFTLoss, MFTTrainer, collate
    trainer = MFTTrainer(model=model, args=TrainingArguments(...), train_dataset=CacheDataset("caches/demo"),
                         mft_loss=MFTLoss(objective="mft", tau=0.25))
    trainer.train()
"""
from __future__ import annotations

import contextlib
import itertools
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
        loss_sum, tokens = self.summed(model, batch)
        return loss_sum / tokens.clamp(min=1)

    def summed(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss summed over the batch's trained tokens (), their number ()): what a caller that normalises over
        more than one batch (MFTTrainer: a whole optimiser step) divides itself.

        model: the student, or the student inside torch's DistributedDataParallel; the forward then runs through
        the wrapper, so that it synchronises the gradients (and skips that under its no_sync)."""
        student = _student_of(model)
        if self.vocab_size is not None and vocab_size_of(student) != self.vocab_size:
            raise ValueError(f"model: predicts a vocabulary of {vocab_size_of(student)} tokens, but MFTLoss's cache "
                             f"(vocab_size) holds targets over {self.vocab_size}; use a student with the teacher's "
                             "vocabulary")
        if self.top_k and self.top_k > batch["topk_ids"].shape[-1]:
            raise ValueError(f"MFTLoss: top_k {self.top_k} exceeds the top-k of {batch['topk_ids'].shape[-1]} that "
                             "the batch holds")
        targets = from_cache(batch, objective=self.objective, tau=self.tau, top_k=self.top_k, tail=self.tail)
        loss = StudentLoss(student, self.chunk_size, self.impl)
        if student is model:
            return student_forward(loss, batch, targets)
        with _forward_replaced(student, loss):  # DDP's hooks are armed by its own forward, which calls the student's
            return student_forward(model, batch, targets)


def _student_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself when unwrapped)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    if isinstance(model, torch.nn.DataParallel):
        raise ValueError("MFTLoss: model is wrapped in torch.nn.DataParallel (Trainer does that on several GPUs of "
                         "one process); run one process per GPU instead (torchrun or accelerate launch)")
    return model


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, by: torch.nn.Module):
    """module(...) calls by(...) inside the block; an instance-level forward (Accelerate's autocast wrapper) is put
    back after it."""
    own = module.__dict__.get("forward")
    module.forward = by.__call__  # a method, not the module: nn.Module would register a module as a child
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


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
    """transformers.Trainer with compute_loss = MFTLoss (not compute_loss_func, which receives full logits),
    normalised as `mft train` normalises: each micro-batch's summed loss over the trained tokens of the whole
    optimiser step (all gradient-accumulation micro-batches; all processes with args.average_tokens_across_devices,
    the default), transformers' `num_items_in_batch`.

    mft_loss: the MFTLoss to train with (default MFTLoss()). same_order_as_mft_train: read the rows in `mft train`'s
    order for args.seed and args.max_steps instead of Trainer's random sampler (on several processes too: each
    step's rows are then those of `mft train` with the same global batch). The batch keys are kept (the model's
    forward does not name them, so Trainer would otherwise drop them); data_collator defaults to `collate`."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's trained tokens: no further / grad-accum

    def __init__(self, *args, mft_loss: MFTLoss | None = None, same_order_as_mft_train: bool = False, **kwargs):
        if mft_loss is not None and not isinstance(mft_loss, MFTLoss):
            raise ValueError(f"mft_loss must be an MFTLoss; got {type(mft_loss).__name__}")
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        # what transformers releases without loss_is_scaled_for_ga read to leave a num_items_in_batch-normalised
        # loss undivided by gradient_accumulation_steps; compute_loss does take num_items_in_batch
        self.model_accepts_loss_kwargs = True
        self.mft_loss = mft_loss or MFTLoss()
        self.same_order_as_mft_train = same_order_as_mft_train
        self._check_caches()

    def _remove_unused_columns(self, dataset, description=None):
        """Every column of a cache's rows is the loss's (the model's forward names none of them): a
        datasets.Dataset keeps them all, whatever args.remove_unused_columns says."""
        return dataset

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

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """The micro-batches of the next optimiser step and its number of trained tokens (label_mask; Trainer's
        own count looks for `labels`): this process's, summed over the processes with
        args.average_tokens_across_devices."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches:
            return batches, None
        tokens = torch.stack([b["label_mask"].sum() for b in batches]).sum()
        tokens = tokens.to(device=device if device is not None else self.args.device, dtype=torch.int64)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            tokens = self.accelerator.reduce(tokens, "sum")
        return batches, tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The summed loss of `inputs` over num_items_in_batch (get_batch_samples: the step's trained tokens), times
        the number of processes when that count is over all of them (DDP averages the gradients over processes):
        the step's micro-batch gradients then add up to that of its summed loss over its trained tokens. Without
        num_items_in_batch, the batch's own mean."""
        loss_sum, tokens = self.mft_loss.summed(model, inputs)
        if num_items_in_batch is None:
            loss = loss_sum / tokens.clamp(min=1)
        else:
            loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
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
        if a.max_steps <= 0:
            raise ValueError("same_order_as_mft_train needs args.max_steps")
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Accelerate deals the batches out in turn (process p: batches p, p + W, ...): `mft train`'s micro-batches,
        # laid out [accum][process][batch] (data.micro_batches)
        g = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        return CacheOrderSampler(len(dataset), g, a.max_steps, a.seed)
