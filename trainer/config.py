"""The configuration of `mft train` (and of each run of `mft sweep`), and what `mft sweep` varies."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mft_cache.allocator import ALLOCATORS
from mft_cache.config import MAX_LIST_ITEMS, check_finite, opt
from mft_cache.names import check_repo_id, check_run_name
from mft_cache.rows.chat import TRAIN_ON
from mft_cache.rows.documents import DATA_FORMATS
from mft_cache.rows.long_rows import DEFAULT_LONG_ROWS, LONG_ROWS
from mft_cache.rows.spec import PACKINGS

from .adapters import PEFT_METHODS
from .loss import LOSS_IMPLS
from .optim import OPTIMIZERS
from .targets import OBJECTIVES, TAIL_MODES
from .tracking import REPORT_TO

# the largest value each size option takes: far beyond any real run, and small enough that the step's row list and
# a micro-batch are made in a moment (a larger value would spend minutes before a MemoryError)
MAX_SIZES = {"batch_size": 65_536, "eval_batch_size": 65_536, "grad_accum": 65_536, "chunk_size": 1 << 24,
             "lora_rank": 65_536, "seq_len": 1 << 20}
MAX_GLOBAL_BATCH = 1 << 20  # sequences per optimiser step of one process: --batch-size x --grad-accum
MAX_SEED = (1 << 32) - 1  # numpy's seeds end there
MAX_ROWS = 1 << 40  # --train-rows: more rows than any cache holds
MAX_SAMPLES, MAX_SAMPLE_TOKENS = 8, 512  # --samples per evaluation set, --sample-tokens each


# the keys config.json holds besides TrainConfig's own: what the run resolved (written, never read back as options;
# `--config` of a run's config.json skips them)
BASE_DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("no", "bf16", "fp16", "auto")
BEST_BY = ("specialized", "general")  # the validation perplexity that picks best/
SAVE_WEIGHTS = ("all", "best", "final", "none")  # which of best/ and final/ a run writes
RESOLVED_KEYS = ("resolved_model", "num_processes", "global_batch", "cache_manifest_sha256", "cache_top_k")


@dataclass(frozen=True)
class TrainConfig:
    # Flat (config.json and the keyword API are flat); its fields in the order of their `--help` groups.
    # -- data: the cache or the documents, how rows are made of them, replay
    cache: str = opt("caches/demo", "cache folder written by `mft cache` (ignored with --teacher online)",
                     group="data")
    data: str = opt("", "the finetuning documents: required with --teacher online; with a cache, optional and "
                    "checked against the documents the cache was made from", group="data")
    allow_changed_cache: bool = opt(False, "reproducing a run (`--config RUN/config.json`): train on a --cache whose "
                                    "manifest sha256 differs from the cache_manifest_sha256 that run recorded (a "
                                    "cache rebuilt or replaced since), with a warning, instead of refusing it",
                                    group="data")
    text_field: str = opt("text", "field holding the text in --data / --eval-* files", group="data")
    data_format: str = opt("auto", "rows of --data with --teacher online: text, chat or prompt-completion (auto: from "
                           "the first row's fields; --eval-* and --replay files are always read so); with a cache, "
                           "the cache's", choices=DATA_FORMATS, group="data")
    prompt_field: str = opt("prompt", "field holding the prompt of prompt-completion rows", group="data")
    completion_field: str = opt("completion", "field holding the completion of prompt-completion rows", group="data")
    train_on: str = opt("auto", "chat and prompt-completion rows: train and evaluate on the completions only, or on "
                        "every token; auto: the cache's choice (another is refused), else completion",
                        choices=("auto", *TRAIN_ON), group="data")
    packing: str = opt("auto", "rows made from raw data: document (whole documents, each attending only to itself; a "
                       "text document longer than a row in row-sized windows) "
                       "or concat; auto: the cache's, else document for chat and prompt-completion rows",
                       choices=PACKINGS, group="data")
    long_rows: str = opt(DEFAULT_LONG_ROWS, "rows made from raw data (--teacher online's --data, --replay documents, "
                         "the --eval-* sets), documents packed whole: one longer than a row is dropped (counted and "
                         "named in a warning), truncated (a conversation to its longest prefix of whole turns that "
                         "fits and ends after an answer; other rows are dropped) or refused (mft cache takes the same "
                         "flag); text documents are cut into windows instead; docs/CHAT.md", choices=LONG_ROWS,
                         group="data")
    seq_len: int = opt(0, "tokens per packed sequence with --teacher online (0: 256); with a cache, 0 or the "
                       "cache's own", group="data")
    train_rows: int = opt(0, "train on the first N rows only (of the cache, or of --data's rows): a data budget of N "
                          "x seq-len tokens, repeated over as many epochs as --steps takes (0: every row)", group="data")
    replay: str = opt("", "general-domain replay data mixed into every batch: documents (objective ft), or a cache "
                      "of them made by `mft cache` with the same teacher (any objective)", group="data")
    replay_fraction: float = opt(0.5, "fraction of every batch taken from --replay (the paper uses 0.5)", group="data")
    # -- model and adapters: the student, and an adapter trained instead of all of its weights
    model: str = opt("", "student to start from (default: the teacher recorded in the cache's manifest)",
                     group="model and adapters")
    allow_different_student: bool = opt(False, "train a --model whose weights differ from the cache's teacher "
                                        "(same tokenizer and vocabulary required)", group="model and adapters")
    trust_remote_code: bool = opt(False, "allow the model's own code from the hub to run", group="model and adapters")
    peft: str = opt("none", "train an adapter instead of all weights (peft library); the base stays frozen",
                    choices=PEFT_METHODS, group="model and adapters")
    lora_rank: int = opt(8, "LoRA/DoRA rank", group="model and adapters")
    lora_alpha: float = opt(16.0, "LoRA/DoRA scaling alpha", group="model and adapters")
    lora_dropout: float = opt(0.0, "LoRA/DoRA dropout", group="model and adapters")
    peft_targets: str = opt("", "comma-separated module names to adapt (default: every attention and MLP projection)",
                            group="model and adapters", items=str)
    merge_adapter: bool = opt(False, "with --peft: best/ and final/ hold the merged full model instead of the adapter",
                              group="model and adapters")
    base_dtype: str = opt("float32", "with --peft: the dtype the frozen base weights (and an online teacher) are loaded "
                          "in; the adapter and its optimiser state stay float32", choices=BASE_DTYPES,
                          group="model and adapters")
    # -- objective: where the targets come from and what the loss makes of them
    teacher: str = opt("cache", "where the teacher's targets come from: the cache, or an online teacher "
                       "(the paper's Algorithm 1: teacher in memory, full distribution every step)",
                       choices=("cache", "online"), group="objective")
    objective: str = opt("mft", "mft (corrected distillation), ft (plain cross-entropy), or the paper's ablations",
                         choices=OBJECTIVES, group="objective")
    tau: float = opt(0.25, "MFT target margin in [0, 1]; 1 is plain finetuning", group="objective")
    top_k: int = opt(0, "use only the first K of the cache's top-k log-probs (0: all of them); the rest joins the tail",
                     group="objective")
    tail: str = opt("bucket", "teacher mass outside top-k and the label: one tail bucket (exact), renormalize the "
                    "kept log-probs to sum to 1, or drop it (the ablations other distillation tools make)",
                    choices=TAIL_MODES, group="objective")
    # -- optimisation: steps, batches, learning rate, optimiser
    steps: int = opt(60, "optimiser steps", group="optimisation")
    batch_size: int = opt(4, "sequences per micro-batch (per process)", group="optimisation")
    grad_accum: int = opt(1, "micro-batches per optimiser step", group="optimisation")
    lr: float = opt(1e-4, "peak learning rate (with adafactor: the largest relative step; sgd wants a far larger one)",
                    group="optimisation")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)", group="optimisation")
    warmup_steps: int = opt(5, "linear warm-up steps", group="optimisation")
    weight_decay: float = opt(0.0, "weight decay (decoupled for adamw and adafactor, L2 for sgd)", group="optimisation")
    optimizer: str = opt("adamw", "adamw, adafactor (factored second moment, no first: a far smaller state), sgd "
                         "(momentum 0.9), or adamw8bit (bitsandbytes, the `8bit` extra, CUDA only)", choices=OPTIMIZERS,
                         group="optimisation")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: off)", group="optimisation")
    seed: int = opt(0, "seed for data order and initialisation of anything random", group="optimisation")
    skip_nonfinite: int = opt(0, "skip up to N steps whose loss is NaN/inf (counted in summary.json) instead of "
                              "stopping at the first; the weights are never updated from such a step",
                              group="optimisation")
    # -- evaluation: the validation sets, and when they are read
    eval_specialized: str = opt("", "specialized-domain validation documents (perplexity -> S)", group="evaluation")
    eval_general: str = opt("", "general-domain validation documents (perplexity -> DG)", group="evaluation")
    eval_every: int = opt(20, "evaluate every N steps (also at the start and the end)", group="evaluation")
    eval_batch_size: int = opt(8, "sequences per evaluation batch", group="evaluation")
    eval_max_sequences: int = opt(0, "evaluate on the first N sequences of each set (0: all)", group="evaluation")
    samples: int = opt(1, "greedy continuations of prompts from each evaluation set at every evaluation, the base "
                       "model's beside each checkpoint's, in samples.md and the model card (0: none)", group="evaluation")
    sample_tokens: int = opt(32, "new tokens of each sample", group="evaluation")
    best_by: str = opt("specialized", "which validation perplexity picks best/: specialized (the least --eval-specialized "
                       "perplexity, as the paper reports) or general (the least --eval-general perplexity: a reference "
                       "checkpoint tuned on general text)", choices=BEST_BY, group="evaluation")
    # -- output: the run folder, checkpoints and logs, trackers, the Hub
    out: str = opt("runs/demo", "run folder: config.json, metrics.jsonl, summary.json, best/, final/, checkpoints/",
                   group="output")
    overwrite: bool = opt(False, "replace an existing run in --out", group="output")
    resume: bool = opt(False, "continue from the last saved state in --out (starts fresh if there is none)",
                       group="output")
    save_weights: str = opt("all", "which weights the run writes: all (best/ and final/), best, final, or none (the "
                            "metrics and summary.json only: sweeps and studies that compare numbers, not models)",
                            choices=SAVE_WEIGHTS, group="output")
    save_every: int = opt(20, "save the training state every N steps (0: never) for --resume", group="output")
    log_every: int = opt(10, "write a step line to the log every N steps (metrics.jsonl gets every step)",
                         group="output")
    report_to: str = opt("none", "also send the step and evaluation metrics to these trackers (through Accelerate; "
                         "TensorBoard under --out/tensorboard; all: those installed)", choices=REPORT_TO,
                         group="output")
    run_name: str = opt("", "the run's name in the trackers (default: --out's folder name)", group="output")
    push_to_hub: str = opt("", "then upload final/ (the model or adapter, with its model card) to this Hub model "
                           "repository (OWNER/NAME); --cache also takes hf://OWNER/NAME[@REVISION], a cache on the Hub",
                           group="output")
    # -- performance: memory and speed
    mixed_precision: str = opt("no", "autocast dtype of the student's forward (the loss math stays float32); auto: "
                               "bf16 where the device computes it natively (a CUDA GPU that supports it, a CPU with "
                               "AMX-BF16 or AVX512-BF16, Apple M2 and later; MFT_CPU_BF16=1 or 0 overrides the CPU's "
                               "detection), else no; config.json records what auto chose", choices=MIXED_PRECISIONS,
                               group="performance")
    chunk_size: int = opt(1024, "positions per chunk of the output layer in the loss", group="performance")
    loss_impl: str = opt("fused", "how the output layer and loss run: fused (logits and their gradients in one pass, "
                         "chunk by chunk), checkpointed (the head's own forward per chunk, recomputed in the backward), "
                         "or transformers (the model's own loss over full logits; --objective ft only)",
                         choices=LOSS_IMPLS, group="performance")
    gradient_checkpointing: bool = opt(False, "keep only each decoder layer's input in the forward and recompute "
                                       "the layer in the backward: far less activation memory for a second forward "
                                       "pass of compute (`mft plan` shows both)", group="performance")
    cpu_allocator: str = opt("default", "on a CPU: lean makes glibc give every freed block above 1 MiB back to the "
                             "system, so the process holds about what its tensors need (what `mft plan` estimates), "
                             "for more time per step (docs/MEMORY.md); default keeps glibc's own policy. No effect "
                             "on a GPU", choices=ALLOCATORS, group="performance")

    def __post_init__(self):
        if not 0.0 <= self.tau <= 1.0:  # also refuses NaN
            raise ValueError(f"--tau must be in [0, 1]; got {self.tau}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "log_every", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_max_sequences", "seq_len", "top_k", "skip_nonfinite"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        for name, most in MAX_SIZES.items():
            if getattr(self, name) > most:
                raise ValueError(f"--{name.replace('_', '-')} must be at most {most:,}; got {getattr(self, name):,}")
        if self.batch_size * self.grad_accum > MAX_GLOBAL_BATCH:
            raise ValueError(f"--batch-size {self.batch_size:,} x --grad-accum {self.grad_accum:,} is "
                             f"{self.batch_size * self.grad_accum:,} sequences per step; at most {MAX_GLOBAL_BATCH:,}")
        if self.long_rows not in LONG_ROWS:
            raise ValueError(f"--long-rows must be one of {', '.join(LONG_ROWS)}; got {self.long_rows!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be in [0, {MAX_SEED}]; got {self.seed}")
        self._check_names()
        if not 0 <= self.samples <= MAX_SAMPLES or not 1 <= self.sample_tokens <= MAX_SAMPLE_TOKENS:
            raise ValueError(f"--samples must be in [0, {MAX_SAMPLES}] and --sample-tokens in [1, {MAX_SAMPLE_TOKENS}]; "
                             f"got {self.samples} and {self.sample_tokens}")
        if not 0 <= self.train_rows <= MAX_ROWS:
            raise ValueError(f"--train-rows must be in [0, {MAX_ROWS}] (0: every row); got {self.train_rows}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive; got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0; got {self.weight_decay}")
        if self.max_grad_norm < 0:  # a negative bound flips every gradient: gradient ascent
            raise ValueError(f"--max-grad-norm must be >= 0 (0: no clipping); got {self.max_grad_norm}")
        if self.teacher == "online" and not (self.data and self.model):
            raise ValueError("--teacher online needs --model (the teacher, also the student's start) and --data")
        if not 0.0 < self.replay_fraction < 1.0:
            raise ValueError(f"--replay-fraction must be in (0, 1); got {self.replay_fraction}")
        if self.lora_rank < 1 or not self.lora_alpha > 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("--lora-rank must be >= 1, --lora-alpha > 0 and --lora-dropout in [0, 1)")
        if self.merge_adapter and self.peft == "none":
            raise ValueError("--merge-adapter needs --peft")
        if self.base_dtype != "float32" and self.peft == "none":
            raise ValueError(f"--base-dtype {self.base_dtype} needs --peft: only a frozen base may be held in "
                             "reduced precision (the weights a full finetune trains stay float32)")
        if self.loss_impl == "transformers" and self.objective != "ft":
            raise ValueError("--loss-impl transformers computes plain cross-entropy only: it needs --objective ft")
        if self.push_to_hub and self.save_weights not in ("all", "final"):
            raise ValueError(f"--push-to-hub uploads final/, which --save-weights {self.save_weights} does not write")
        if self.best_by == "general" and not self.eval_general:
            raise ValueError("--best-by general picks best/ by the --eval-general perplexity: give --eval-general")
        if self.teacher == "online" and (self.top_k or self.tail != "bucket"):
            raise ValueError("--top-k and --tail choose how a cache is read; --teacher online uses the full distribution")
        check_finite(self)  # last: the range checks above say more, where they apply

    def _check_names(self) -> None:
        """The strings passed on as names (a tracker's run name, Hub repositories and revisions), refused naming
        the flag before any work."""
        from mft_cache.storage.hub import is_hub_ref, parse_hub_ref

        if self.run_name:
            check_run_name(self.run_name)
        if self.push_to_hub:
            check_repo_id(self.push_to_hub, "--push-to-hub")
        for flag, value in (("--cache", self.cache), ("--replay", self.replay)):
            if is_hub_ref(value):
                parse_hub_ref(value, flag)


def resolve_mixed_precision(name: str, device) -> str:
    """--mixed-precision as the run uses it on `device` (a torch.device): auto becomes bf16 where the device computes
    bf16 natively (mft_cache.models.native_bf16_on), else no; any other value stays as it is."""
    if name != "auto":
        return name
    from mft_cache.models import native_bf16_on

    return "bf16" if native_bf16_on(device) else "no"


def _parse_list(flag: str, text: str, kind) -> list:
    """A comma-separated list of numbers, refused naming the flag (a bad, repeated or non-finite value, or more
    than MAX_LIST_ITEMS of them)."""
    items = [x for x in (x.strip() for x in text.split(",")) if x]
    if len(items) > MAX_LIST_ITEMS:
        raise ValueError(f"{flag}: {len(items):,} values; at most {MAX_LIST_ITEMS}")
    values, seen = [], set()
    for item in items:
        try:
            value = kind(item)
        except ValueError:
            raise ValueError(f"{flag}: {item!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{flag}: {item!r} is not a finite number")
        if value in seen:
            raise ValueError(f"{flag}: {item!r} is given twice")
        seen.add(value)
        values.append(value)
    return values


# --mft-lrs: MFT at every rate of --lrs (as plain finetuning), or at --lr alone (the grid before the option)
MFT_LRS = ("all", "lr")


@dataclass(frozen=True)
class SweepConfig:
    """What `mft sweep` varies; every run takes the other options from TrainConfig. A config file may give each
    list as a YAML/JSON list instead of the comma-separated string."""

    taus: str = opt("0.1,0.25,0.5,1.0", "comma-separated tau values: one MFT run each, at every rate of --lrs "
                    "(or at --lr alone: --mft-lrs lr)", group="sweep", items=float)
    no_ft: bool = opt(False, "skip the plain finetuning runs", group="sweep")
    seeds: str = opt("", "comma-separated seeds (they set the data order): every configuration runs once per seed, "
                     "into <run>/seed<k>/ when there are several; empty: --seed alone, into <run>/", group="sweep",
                     items=int)
    lrs: str = opt("", "comma-separated learning rates: FT runs once at each, and so does MFT at each tau "
                   "(--mft-lrs all), so that each method is compared at its best rate; --lr is added to them when "
                   "missing; empty: --lr alone", group="sweep", items=float)
    mft_lrs: str = opt("all", "the learning rates of the MFT runs: all (every rate of --lrs, as FT) or lr (--lr "
                       "alone, the grid before this option: FT's rate tuned over --lrs, MFT's not)", choices=MFT_LRS,
                       group="sweep")

    def __post_init__(self):
        taus, lrs = self.tau_values(), self.lr_values()
        if not taus and self.no_ft:
            raise ValueError("--taus is empty and --no-ft skips plain finetuning: the sweep has no runs")
        for tau in taus:
            if not 0.0 <= tau <= 1.0:
                raise ValueError(f"--taus: {tau} is outside [0, 1]")
        for lr in lrs:
            if not lr > 0:
                raise ValueError(f"--lrs: {lr} is not a positive learning rate")
        if self.mft_lrs not in MFT_LRS:
            raise ValueError(f"--mft-lrs: {self.mft_lrs!r} is not one of {', '.join(MFT_LRS)}")
        if lrs and self.no_ft and self.mft_lrs == "lr":
            raise ValueError("--lrs with --mft-lrs lr sets the learning rates of plain finetuning only, which --no-ft "
                             "skips: drop one of them, or give --mft-lrs all (MFT at every rate)")
        if any(s < 0 for s in self.seed_values()):
            raise ValueError(f"--seeds must be >= 0; got {self.seeds}")

    def tau_values(self) -> list[float]:
        return _parse_list("--taus", self.taus, float)

    def seed_values(self) -> list[int]:
        return _parse_list("--seeds", self.seeds, int)

    def lr_values(self) -> list[float]:
        return _parse_list("--lrs", self.lrs, float)
