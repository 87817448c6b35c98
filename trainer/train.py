"""`mft train`: minifinetuning from the cache with Accelerate.

`train` reads as set up -> loop -> finish; the loop reads like the accelerate examples. Loss normalisation:
each micro-batch contributes its SUM of per-token losses divided by the number of trained tokens of the whole
optimiser step (all micro-batches, all processes), so accumulation and data parallelism give the loss of one
big batch.

Several processes (torchrun, accelerate launch; DDP or FSDP): every process runs the same number of forward
passes per step and per evaluation (collectives stay matched), the first process locks the run folder, decides
its fate and writes every run file; Accelerate's save_state runs on all of them.

Ctrl-C or SIGTERM during the loop (one process) stops after the current step, with a checkpoint of it when
checkpoints are on; elsewhere it stops at once (mft_cache/interrupts.py). Either way `--resume` continues.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from mft_cache import interrupts
from mft_cache.allocator import use_lean_allocator
from mft_cache.attention import packed_forward_kwargs
from mft_cache.config import to_dict
from mft_cache.distributed import cpu_launch, decide_on_main, leave_process_group_at_exit
from mft_cache.faults import fault_active, fault_point
from mft_cache.masks import real_tokens
from mft_cache.models import DTYPES, load_model, load_tokenizer
from mft_cache.storage.hub import check_online, push_folder
from mft_cache.files import remove_member, write_json_atomic, write_text_atomic
from mft_cache.provenance import FILE as PROVENANCE_FILE

from .adapters import add_adapter
from .card import provenance_record, write_model_card
from .checkpoint import TrainState, load_checkpoint, save_checkpoint, save_pretrained
from .checks import check_cache_unchanged, check_student, check_teacher_revision
from .config import TrainConfig, resolve_mixed_precision
from .data import MixedRows, Prefetcher, micro_batches, mixed_step_rows, step_rows
from .evaluate import degeneralization, evaluate_perplexity_se, ratio, specialization
from .inputs import open_eval_sets, open_replay, open_training_rows, online_rows
from .loss_module import StudentLoss
from .optim import build_optimizer, check_optimizer
from .report import plot_s_dg
from .samples import generate, prompts, render as render_samples
from .run_folder import FINISHED, Metrics, lock_run_folder, prepare_run_folder, resolve_out, start_run_files
from .targets import TeacherTargets, from_cache, from_logits, no_teacher
from .tracking import Tracking, log_record, log_with, start_trackers, tracking_of

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the loop needs, made once by `set_up`."""

    cfg: TrainConfig
    accelerator: object
    out: Path
    resolved: dict  # config.json
    checkpoint: Path | None  # to resume from
    tokenizer: object
    module: object  # StudentLoss, prepared
    optimizer: object
    scheduler: object
    rows: object  # Rows / Rows / MixedRows
    rows_of_step: Callable[[int], list[int]]
    eval_sets: dict
    targets: Callable[[dict], TeacherTargets]
    online: bool  # the teacher is in memory
    tracking: Tracking  # --report-to's run name and logging folder
    manifest: dict | None  # the cache's (None with the online teacher), for the model cards


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:  # linear warm-up, then cosine decay to min_lr_ratio
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@torch.no_grad()
def teacher_logits(teacher, batch: dict) -> torch.Tensor:
    """(B, T-1, V) the online teacher's logits at the positions that predict a label (documents packed whole:
    each seen alone, as the student sees it)."""
    t = batch["input_ids"].shape[1]
    attention = {"attention_mask": real_tokens(batch["length"], t).long()}
    if "segment_ids" in batch:
        attention = packed_forward_kwargs(teacher, batch["segment_ids"])
    return teacher(input_ids=batch["input_ids"], **attention, use_cache=False).logits[:, :-1]


def make_targets(cfg: TrainConfig, teacher) -> Callable[[dict], TeacherTargets]:
    """micro-batch -> the TeacherTargets of the chosen objective (from the cache, or the online teacher)."""
    def targets(mb: dict) -> TeacherTargets:
        if cfg.objective == "ft":
            return no_teacher()
        if teacher is not None:
            return from_logits(teacher_logits(teacher, mb), mb["input_ids"][:, 1:], objective=cfg.objective, tau=cfg.tau)
        return from_cache(mb, objective=cfg.objective, tau=cfg.tau, top_k=cfg.top_k, tail=cfg.tail)

    return targets


def student_forward(module, mb: dict, targets: TeacherTargets):
    """(summed loss, trained tokens) of one micro-batch."""
    return module(input_ids=mb["input_ids"], length=mb["length"], label_mask=mb["label_mask"], **targets.tensors(),
                  drop_tail=targets.drop_tail, segment_ids=mb.get("segment_ids"))


# -- setting up -------------------------------------------------------------------------------------
def launch_device() -> torch.device:
    """The kind of device Accelerate will train on: the accelerator (GPU) when there is one, unless the launch is
    one of several CPU processes."""
    gpu = torch.accelerator.current_accelerator()  # None without one
    return torch.device("cpu") if gpu is None or cpu_launch(gpu.type) else torch.device(gpu.type)


def with_resolved_precision(cfg: TrainConfig) -> TrainConfig:
    """cfg with --mixed-precision auto resolved for this machine (bf16 or no), as config.json records it."""
    device = launch_device()
    precision = resolve_mixed_precision(cfg.mixed_precision, device)
    if precision != cfg.mixed_precision:
        log.info("--mixed-precision auto: %s on this %s", precision, device.type)
        cfg = dataclasses.replace(cfg, mixed_precision=precision)
    return cfg


def make_accelerator(cfg: TrainConfig, tracking: Tracking):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, parse_flag_from_env

    gpu = torch.accelerator.current_accelerator()  # None without one
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_launch(gpu.type if gpu else None),
                              log_with=log_with(cfg.report_to, tracking), project_dir=str(tracking.logging_dir))
    if accelerator.num_processes > 1:
        leave_process_group_at_exit()
    fsdp_ignored = parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP
    if fsdp_ignored and accelerator.is_main_process:
        # Accelerate shards only on GPUs (and devices like them) started by a launcher; elsewhere it ignores the
        # request and runs plain data parallelism (or one process), which trains the same but shards nothing
        log.warning("FSDP is asked for (ACCELERATE_USE_FSDP) but Accelerate runs these %d process(es) on %s as %s: "
                    "each holds the whole model and optimiser state", accelerator.num_processes,
                    accelerator.device.type, accelerator.distributed_type.value)
    return accelerator


def claim_run_folder(held: contextlib.ExitStack, out: Path, resolved: dict, cfg: TrainConfig):
    """Lock --out until `held` closes (a second run on it stops here, naming our pid), then decide its fate."""
    held.enter_context(lock_run_folder(out))
    return prepare_run_folder(out, resolved, cfg)


def set_up(cfg: TrainConfig, held: contextlib.ExitStack, tracking: Tracking | None = None,
           recorded_cache: str | None = None) -> Run | dict:
    """The run, ready for its first (or resumed) step; or the summary of a run that is already finished.
    The first process's lock on --out joins `held`. recorded_cache: see train."""
    from accelerate.utils import set_seed

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    cfg = with_resolved_precision(cfg)  # before the Accelerator, and before config.json is compared or written
    out = resolve_out(cfg.out)
    tracking = tracking or tracking_of(out, cfg.run_name)
    accelerator = make_accelerator(cfg, tracking)
    check_optimizer(cfg.optimizer, accelerator.device)  # before the run folder is touched
    if cfg.cpu_allocator == "lean" and accelerator.device.type == "cpu" and use_lean_allocator():
        log.info("--cpu-allocator lean: freed blocks above 1 MiB go back to the system")
    if not accelerator.is_main_process:  # one log, from the first process
        logging.getLogger("mft_cache").setLevel(logging.WARNING)
    training = open_training_rows(cfg)
    if recorded_cache and training.manifest is not None:
        check_cache_unchanged(training.manifest, cfg.cache, recorded_cache, cfg.allow_changed_cache)
    num_processes = accelerator.num_processes
    global_batch = cfg.batch_size * cfg.grad_accum * num_processes
    m = training.manifest
    # config.json: the options (but --push-to-hub: an action of this command, not part of the run, so `--config` of
    # it reproduces the run without pushing again) and what they resolved to
    options = {k: v for k, v in to_dict(cfg).items() if k != "push_to_hub"}
    resolved = {**options, "resolved_model": training.model_id, "seq_len": training.seq_len,
                "num_processes": num_processes, "global_batch": global_batch,
                "cache_manifest_sha256": m.manifest_sha256 if m else None, "cache_top_k": m.top_k if m else None}
    ckpt = decide_on_main(accelerator, lambda: claim_run_folder(held, out, resolved, cfg))  # may empty --out
    accelerator.wait_for_everyone()
    if ckpt == FINISHED:
        log.info("the run in %s is already finished (same configuration); --overwrite reruns it", out)
        return json.loads((out / "summary.json").read_text())
    set_seed(cfg.seed, device_specific=True)  # seed + process index: each process its own dropout masks

    tokenizer = load_tokenizer(training.model_id, cfg.trust_remote_code)
    model, teacher = load_models(cfg, training, tokenizer, accelerator.device)
    rows = training.rows if training.rows is not None else online_rows(cfg, tokenizer, training.seq_len)
    rows, rows_of_step = with_replay(cfg, rows, global_batch, training, tokenizer)
    model = prepare_student(cfg, model)
    eval_sets = open_eval_sets(cfg, tokenizer, training.seq_len, training.spec)
    module, optimizer, scheduler = make_optimizer(cfg, model, accelerator)
    return Run(cfg, accelerator, out, resolved, ckpt, tokenizer, module, optimizer, scheduler, rows, rows_of_step,
               eval_sets, make_targets(cfg, teacher), teacher is not None, tracking, m)


def load_models(cfg: TrainConfig, training, tokenizer, device):
    """(student, online teacher or None), the student checked against the cache it will learn from. Both in
    --base-dtype (float32 unless a frozen base under --peft)."""
    dtype = DTYPES[cfg.base_dtype]
    model = load_model(training.model_id, dtype, device, cfg.trust_remote_code)
    model.config.use_cache = False
    if training.manifest is not None:
        check_student(training.manifest, tokenizer, model, training.model_id)  # tokenizer and vocabulary first
        check_teacher_revision(training.manifest, training.model_id, cfg.allow_different_student)
        log.info("targets from the cache %s: the teacher is not loaded", cfg.cache)
        return model, None
    if cfg.objective == "ft":  # plain cross-entropy on raw documents (a reference checkpoint): no teacher to load
        log.info("plain finetuning on %s: no teacher is loaded", cfg.data)
        return model, None
    teacher = load_model(cfg.model, dtype, device, cfg.trust_remote_code).eval().requires_grad_(False)
    log.info("online teacher %s: a teacher forward pass every micro-batch (the paper's Algorithm 1)", cfg.model)
    return model, teacher


def enable_checkpointing(model) -> None:
    """--gradient-checkpointing: transformers' own, non-reentrant (no inputs need requires_grad, adapters and
    DDP/FSDP need nothing special). Each decoder layer keeps only its input; the backward recomputes it."""
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; gradient_... is its old name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as e:
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support it ({e})") from None
    model.config.use_cache = False  # a KV cache is never wanted in training, and conflicts with recomputation


def prepare_student(cfg: TrainConfig, model):
    """The loaded student as it trains: activation checkpointing, then the adapter (which freezes the base)."""
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.peft != "none":
        model = add_adapter(model, cfg.peft, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.peft_targets)
    return model


def with_replay(cfg: TrainConfig, rows, global_batch: int, training, tokenizer):
    """(rows, rows_of_step): the data order, replay rows mixed in with --replay."""
    if not cfg.replay:
        return rows, lambda s: step_rows(s, global_batch, len(rows), cfg.seed)
    if global_batch < 2:
        raise ValueError("--replay needs a global batch of at least 2 sequences (--batch-size x --grad-accum)")
    replay = open_replay(cfg, training.manifest, tokenizer, training.seq_len)
    num_main = len(rows)
    log.info("replay: %d sequences from %s, %.0f%% of every batch", len(replay), cfg.replay, 100 * cfg.replay_fraction)
    return MixedRows(rows, replay), lambda s: mixed_step_rows(s, global_batch, num_main, len(replay),
                                                              cfg.replay_fraction, cfg.seed)


def make_optimizer(cfg: TrainConfig, model, accelerator):
    from accelerate.utils import DistributedType

    module = StudentLoss(model, cfg.chunk_size, cfg.loss_impl)
    # FSDP's auto-wrap reads the decoder-layer classes from the prepared module: the model's own list
    module._no_split_modules = getattr(model, "_no_split_modules", None)
    # FSDP1 replaces the parameters by flat ones (unless fsdp_use_orig_params) and Accelerate does not point an
    # optimiser built before at them: it would step parameters the model no longer has. So FSDP1 wraps the model
    # first; FSDP2 (and DDP) take both at once, as Accelerate requires for FSDP2.
    fsdp1 = accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False)
    if fsdp1:
        module = accelerator.prepare(module)
    optimizer = build_optimizer(cfg.optimizer, [p for p in module.parameters() if p.requires_grad], cfg.lr,
                                cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))  # stepped once per step, any P
    if fsdp1:
        optimizer = accelerator.prepare(optimizer)
    else:
        module, optimizer = accelerator.prepare(module, optimizer)
    # The scheduler is not registered with Accelerate: it would be pickled and restored by an
    # unrestricted torch.load. Its state is a few numbers, saved in trainer_state.json.
    return module, optimizer, scheduler


def start_or_resume(run: Run) -> TrainState:
    if run.accelerator.is_main_process:
        start_run_files(run.out, run.resolved, fresh=run.checkpoint is None)
    run.accelerator.wait_for_everyone()
    start_trackers(run.accelerator, run.tracking, run.resolved)
    if not run.checkpoint:
        return TrainState()
    state = load_checkpoint(run.accelerator, run.out, run.checkpoint)
    run.scheduler.load_state_dict(state.scheduler)
    return state


# -- the loop ---------------------------------------------------------------------------------------
def train_step(run: Run, micro: list[dict], step: int, state: TrainState) -> tuple[float, int, float]:
    """Forward/backward over the micro-batches of one step, then clip and step. Returns (loss, tokens, lr).

    A non-finite loss (the same on every process: it is reduced) stops the run naming the step and its
    rows, or with --skip-nonfinite N is skipped: gradients dropped, weights and optimiser untouched."""
    accelerator, cfg, module = run.accelerator, run.cfg, run.module
    dev = accelerator.device
    micro = [{k: v.to(dev, non_blocking=True) for k, v in mb.items()} for mb in micro]
    local = sum(mb["label_mask"].sum() for mb in micro)
    n_step = accelerator.reduce(torch.as_tensor(local, device=dev, dtype=torch.float64), "sum")  # all processes
    scale = accelerator.num_processes / max(n_step.item(), 1.0)  # DDP averages gradients over processes
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(module):
            loss, _ = student_forward(module, mb, run.targets(mb))
            if fault_active(f"train:nan-loss-{step + 1}"):  # fault injection: NaN loss and NaN gradients
                loss = loss * float("nan")
            accelerator.backward(loss * scale)
        loss_sum += loss.detach().double()
    loss_value = (accelerator.reduce(loss_sum, "sum") / max(n_step.item(), 1.0)).item()
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
    if not math.isfinite(loss_value):
        run.optimizer.zero_grad(set_to_none=True)
        where = f"step {step + 1} (global batch of cache rows {run.rows_of_step(step)})"
        if len(state.skipped_steps) >= cfg.skip_nonfinite:
            raise FloatingPointError(f"non-finite loss ({loss_value}) at {where}; the weights were not updated. "
                                     "Check the cache (mft inspect --verify), lower --lr, or pass --skip-nonfinite N")
        state.skipped_steps.append(step + 1)
        log.warning("non-finite loss (%s) at %s: skipped (%d of --skip-nonfinite %d)", loss_value, where,
                    len(state.skipped_steps), cfg.skip_nonfinite)
        run.scheduler.step()  # the schedule follows the step index; the weights stay as they were
        return loss_value, int(n_step.item()), lr
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value, int(n_step.item()), lr


def evaluate(run: Run, state: TrainState) -> dict:
    """Perplexity of every evaluation set with its standard error over sequences (ppl_<set>_se; None with fewer
    than 2 sequences), and S, DG and DG/S against the first evaluation."""
    record = {"step": state.step, "tokens": state.tokens}
    for name, rows in run.eval_sets.items():
        ppl, se = evaluate_perplexity_se(run.module, rows, run.cfg.eval_batch_size, run.accelerator)
        if ppl is None:  # open_eval_sets refuses such a set: a set that holds none here is recorded as null
            log.warning("--eval-%s: no trained position was evaluated at step %d; its perplexity is recorded as "
                        "null", name, state.step)
        record[f"ppl_{name}"], record[f"ppl_{name}_se"] = ppl, se
    add_samples(run, record)
    return score(record, state)


def add_samples(run: Run, record: dict) -> None:
    """--samples: the evaluation record's greedy continuations (first process; none under FSDP)."""
    from accelerate.utils import DistributedType

    acc = run.accelerator
    if not run.cfg.samples or not acc.is_main_process or acc.distributed_type == DistributedType.FSDP:
        return
    model = acc.unwrap_model(run.module).model
    record["samples"] = generate(model, run.tokenizer, acc, prompts(run.eval_sets, run.cfg.samples),
                                 run.cfg.sample_tokens)


def write_samples(run: Run, state: TrainState) -> None:
    if run.cfg.samples and run.accelerator.is_main_process and any(e.get("samples") for e in state.evals):
        write_text_atomic(run.out / "samples.md", render_samples(state.evals, run_label(run.cfg)) + "\n")


def score(record: dict, state: TrainState) -> dict:
    """The record's S, DG and DG/S against the first evaluation (itself, when it is the first); appended to
    state.evals."""
    base = state.evals[0] if state.evals else record
    if "ppl_specialized" in record:
        record["S"] = specialization(base["ppl_specialized"], record["ppl_specialized"])
    if "ppl_general" in record:
        record["DG"] = degeneralization(base["ppl_general"], record["ppl_general"])
    record["ratio"] = ratio(record.get("DG"), record.get("S"))
    state.evals.append(record)
    return record


def emit(run: Run, metrics: Metrics, record: dict) -> None:
    """A record to metrics.jsonl and to the trackers of --report-to."""
    metrics.emit(record)
    log_record(run.accelerator, record)


def after_step(run: Run, state: TrainState, metrics: Metrics, bar) -> None:
    """Evaluate, keep the best model and save a checkpoint when their step has come."""
    cfg, main = run.cfg, run.accelerator.is_main_process
    if run.eval_sets and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
        ev = evaluate(run, state)
        emit(run, metrics, {"type": "eval", **ev})
        if main:
            bar.write(" | ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, float)))
        key = f"ppl_{cfg.best_by}"  # --best-by: the perplexity that picks best/
        if ev.get(key) is not None and (state.best is None or ev[key] < state.best[key]):
            state.best = ev
            if cfg.save_weights in ("all", "best"):
                save_pretrained(run.accelerator, run.module, run.tokenizer, run.out / "best", cfg.merge_adapter,
                                card_writer(run, ev, state))
        if main:
            plot_s_dg(state.evals, run.out / "s_dg.png", run_label(cfg))
        write_samples(run, state)
    if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
        state.metrics_bytes = metrics.tell()
        state.scheduler = run.scheduler.state_dict()  # numbers only (lr_lambdas is [None] for a function)
        save_checkpoint(run.accelerator, run.out, state)


def loop(run: Run, state: TrainState, metrics: Metrics, base_eval: dict | None = None) -> Callable[[], float]:
    """Every remaining step; returns the run's wall time so far (summed over resumed sessions), as a clock.
    base_eval: the step-0 evaluation of the same student on the same sets, made by an earlier run (a sweep's runs
    differ only in what training changes), used instead of evaluating again."""
    cfg, accelerator = run.cfg, run.accelerator
    t_run, wall_before = time.perf_counter(), state.wall_time_s
    if not state.evals and run.eval_sets:
        if base_eval is not None and all(f"ppl_{name}" in base_eval for name in run.eval_sets):
            record = {"step": 0, "tokens": 0, **{k: v for k, v in base_eval.items() if k.startswith("ppl_")}}
            add_samples(run, record)
            record = score(record, state)
            emit(run, metrics, {"type": "eval", **record, "shared": True})
            log.info("step 0: the base evaluation of an earlier run of the sweep (the same model and sets)")
        else:
            emit(run, metrics, {"type": "eval", **evaluate(run, state)})
        write_samples(run, state)
    prefetch = Prefetcher(run.rows, range(state.step, cfg.steps), lambda s: micro_batches(
        run.rows_of_step(s), cfg.batch_size, cfg.grad_accum, accelerator.process_index, accelerator.num_processes))
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"mft train ({cfg.objective})", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    run.module.train()
    for step, micro in prefetch:
        t0 = time.perf_counter()
        loss, tokens, lr = train_step(run, micro, step, state)
        dt = time.perf_counter() - t0
        state.step, state.tokens, state.train_time_s = step + 1, state.tokens + tokens, state.train_time_s + dt
        state.wall_time_s = wall_before + time.perf_counter() - t_run
        skipped = bool(state.skipped_steps) and state.skipped_steps[-1] == state.step
        emit(run, metrics, {"type": "train", "step": state.step, "loss": loss, "lr": lr, "tokens": state.tokens,
                      "step_time_s": dt, "tokens_per_s": tokens / dt, **({"skipped": True} if skipped else {})})
        fault_point(f"train:step-{state.step}")
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:,.0f}")
        bar.update(1)
        if state.step % cfg.log_every == 0 and accelerator.is_main_process:
            bar.write(f"step {state.step} | loss {loss:.4f} | {run_label(cfg)} | lr {lr:.2e} "
                      f"| {dt * 1000:.0f} ms | {tokens / dt:,.0f} tok/s")
        after_step(run, state, metrics, bar)
        if interrupts.pending() is not None:
            bar.close()
            stop_after_step(run, state, metrics)
    bar.close()
    return lambda: wall_before + time.perf_counter() - t_run


def stop_after_step(run: Run, state: TrainState, metrics: Metrics) -> None:
    """Ctrl-C or SIGTERM came during the step just done: save it (unless --save-every 0, or its checkpoint was
    just saved) so `--resume` loses nothing, then stop as the signal asks."""
    cfg = run.cfg
    if cfg.save_every and not (state.step % cfg.save_every == 0 and state.step < cfg.steps):
        state.metrics_bytes = metrics.tell()
        state.scheduler = run.scheduler.state_dict()
        save_checkpoint(run.accelerator, run.out, state)
    log.warning("stopped after step %d%s", state.step, "; its checkpoint is saved" if cfg.save_every else "")
    interrupts.raise_pending()


def card_writer(run: Run, record: dict, state: TrainState) -> Callable[[Path], None]:
    """folder -> its model card (README.md), for the checkpoint evaluated as `record`."""
    adapter = run.cfg.peft != "none" and not run.cfg.merge_adapter
    base = state.evals[0] if state.evals else {}

    def write(folder: Path) -> None:
        write_model_card(folder, run.resolved, run.manifest, record, base, adapter)
        write_json_atomic(folder / PROVENANCE_FILE, provenance_record(run.cfg, run.resolved, run.manifest, record, base, folder.name.removesuffix(".tmp")))

    return write


def check_finite_weights(run: Run, state: TrainState) -> None:
    """Refuse to write final/ from weights holding NaN or inf (every process checks its own part of them)."""
    bad = [n.removeprefix("model.") for n, p in run.module.named_parameters() if not torch.isfinite(p.detach()).all()]
    count = run.accelerator.reduce(torch.tensor(len(bad), device=run.accelerator.device), "sum").item()
    if count:
        names = f" (e.g. {bad[:3]})" if bad else ""
        raise FloatingPointError(f"the weights are not finite after step {state.step}: {count} tensors hold NaN or "
                                 f"inf{names}; final/ and summary.json were not written. Lower --lr, or check the "
                                 "cache (mft inspect --verify)")


def finish(run: Run, state: TrainState, metrics: Metrics, wall_time: Callable[[], float]) -> dict:
    """final/, summary.json; the checkpoints are removed."""
    check_finite_weights(run, state)
    last = state.evals[-1] if state.evals and state.evals[-1]["step"] == state.step else {"step": state.step}
    if run.cfg.save_weights in ("all", "final"):
        save_pretrained(run.accelerator, run.module, run.tokenizer, run.out / "final", run.cfg.merge_adapter,
                        card_writer(run, last, state))
    state.wall_time_s = wall_time()
    summary = summarize(run.cfg, state, run.resolved, run.online)
    if run.accelerator.is_main_process:
        write_json_atomic(run.out / "summary.json", summary)
        metrics.close()
        remove_member(run.out / "checkpoints")
    run.accelerator.wait_for_everyone()
    log.info("run written to %s: S %s, DG %s, DG/S %s", run.out, _fmt(summary["S"]), _fmt(summary["DG"]),
             _fmt(summary["ratio"]))
    return summary


def train(cfg: TrainConfig, tracking: Tracking | None = None, base_eval: dict | None = None,
          recorded_cache: str | None = None) -> dict:
    """One run. `tracking`: the trackers' logging folder, project and run name (default: --out/tensorboard,
    "mft-cache", --run-name or --out's folder name; `mft sweep` passes one folder for all its runs). base_eval: the
    step-0 evaluation record of an earlier run with the same student, evaluation sets and options (see loop).
    recorded_cache: the cache_manifest_sha256 of the run this one reproduces (`--config RUN/config.json`): another
    cache is refused unless --allow-changed-cache."""
    if cfg.push_to_hub:
        check_online("--push-to-hub", cfg.push_to_hub)  # before training, not after it
    with contextlib.ExitStack() as held:  # the lock on --out, until the run ends or stops
        run = set_up(cfg, held, tracking, recorded_cache)
        if isinstance(run, dict):  # already finished: --push-to-hub still pushes it (a retry of a failed upload)
            summary = run
        else:
            held.callback(run.accelerator.end_training)  # the trackers flushed and closed, before the lock goes
            state = start_or_resume(run)
            metrics = Metrics(run.out / "metrics.jsonl", run.accelerator.is_main_process)
            with interrupts.deferred(enabled=run.accelerator.num_processes == 1):
                wall_time = loop(run, state, metrics, base_eval)
            summary = finish(run, state, metrics, wall_time)
    if cfg.push_to_hub:
        push_final(cfg)
    return summary


def push_final(cfg: TrainConfig) -> None:
    """--push-to-hub: final/ (model or adapter, with its model card) to the Hub, from the first process."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        url = push_folder(resolve_out(cfg.out) / "final", cfg.push_to_hub, "model", "--push-to-hub")
        log.info("final/ pushed to %s", url)


# -- the summary ------------------------------------------------------------------------------------
def effective_tau(cfg: TrainConfig) -> float | None:
    """The tau a run actually used: ft is MFT at tau = 1; corrective-ft does not use tau."""
    return {"ft": 1.0, "corrective-ft": None}.get(cfg.objective, cfg.tau)


def run_label(cfg: TrainConfig) -> str:
    tau = effective_tau(cfg)
    return cfg.objective if cfg.objective in ("ft", "corrective-ft") else f"{cfg.objective} tau {tau:g}"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summarize(cfg: TrainConfig, state: TrainState, resolved: dict, online: bool) -> dict:
    base = state.evals[0] if state.evals else {}
    best = state.best or {}
    last = state.evals[-1] if state.evals else {}
    return {
        "objective": cfg.objective,
        "tau": effective_tau(cfg),
        "teacher": "online" if online else "none" if cfg.teacher == "online" else "cache",
        "teacher_loaded": online,
        "S": best.get("S"),
        "DG": best.get("DG"),
        "ratio": best.get("ratio"),
        "best_step": best.get("step"),
        "best_by": cfg.best_by,
        "base_ppl_specialized": base.get("ppl_specialized"),
        "base_ppl_general": base.get("ppl_general"),
        "best_ppl_specialized": best.get("ppl_specialized"),
        "best_ppl_general": best.get("ppl_general"),
        "final_ppl_specialized": last.get("ppl_specialized"),
        "final_ppl_general": last.get("ppl_general"),
        "base_ppl_specialized_se": base.get("ppl_specialized_se"),
        "base_ppl_general_se": base.get("ppl_general_se"),
        "best_ppl_specialized_se": best.get("ppl_specialized_se"),
        "best_ppl_general_se": best.get("ppl_general_se"),
        "final_ppl_specialized_se": last.get("ppl_specialized_se"),
        "final_ppl_general_se": last.get("ppl_general_se"),
        "final_S": last.get("S"),
        "final_DG": last.get("DG"),
        "final_ratio": last.get("ratio"),
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens": state.tokens,
        "peft": cfg.peft,
        "replay": cfg.replay or None,
        "replay_fraction": cfg.replay_fraction if cfg.replay else None,
        "top_k": cfg.top_k or (None if online else resolved.get("cache_top_k")),
        "tail": None if online else cfg.tail,
        "wall_time_s": state.wall_time_s,
        "train_time_s": state.train_time_s,
        "num_processes": resolved["num_processes"],
        "global_batch": resolved["global_batch"],
        "seq_len": resolved["seq_len"],
        "model": resolved["resolved_model"],
    }
