"""`mft train`: minifinetuning from the cache with Accelerate.

The loop reads like the accelerate examples; setting up, evaluating, saving and resuming live in
functions of their own. Loss normalisation: each micro-batch contributes its SUM of per-token
losses divided by the number of label tokens of the whole optimiser step (all micro-batches, all
processes), so accumulation and data parallelism give the loss of one big batch.

Several processes (torchrun, accelerate launch; DDP or FSDP): every process runs the same number of
forward passes per step and per evaluation (collectives stay matched), the first process decides
the run folder's fate and writes every run file; Accelerate's save_state runs on all of them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mft_cache.config import to_dict
from mft_cache.distributed import cpu_launch, decide_on_main, leave_process_group_at_exit
from mft_cache.faults import fault_active, fault_point
from mft_cache.models import load_model, load_tokenizer, weights_fingerprint
from mft_cache.storage import build_sequences, open_cache, read_documents
from mft_cache.storage.manifest import write_json_atomic

from .config import TrainConfig
from .adapters import add_adapter, is_adapted, save_adapted
from .data import CacheRows, MixedRows, PackedRows, Prefetcher, micro_batches, mixed_step_rows, step_rows
from .evaluate import degeneralization, perplexity, ratio, specialization
from .report import plot_s_dg
from .student import StudentLoss, cache_weight, check_student, online_targets
from .targets import sparse_teacher

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 256
_IGNORED_ON_RESUME = ("resume", "overwrite", "log_every")


@dataclass
class TrainState:
    """What a checkpoint remembers besides weights, optimiser, scheduler and RNG."""

    step: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0  # the whole run: steps, evaluations, saving (summed over resumed sessions)
    train_time_s: float = 0.0  # optimiser steps only
    metrics_bytes: int = 0  # length of metrics.jsonl when saved: a resumed run truncates to it
    skipped_steps: list = field(default_factory=list)  # steps whose loss was not finite (--skip-nonfinite)
    evals: list = field(default_factory=list)
    best: dict | None = None
    scheduler: dict | None = None  # LambdaLR state (numbers): kept here, in JSON, not in a pickle


# -- setting up -------------------------------------------------------------------------------------
def prepare_run_folder(out: Path, resolved: dict, cfg: TrainConfig) -> Path | str | None:
    """Check --out; return the checkpoint to resume from, None (fresh start), or "finished"."""
    config_path = out / "config.json"
    if out.exists() and any(out.iterdir()):
        if not config_path.exists():
            raise ValueError(f"--out {out} holds files that are not an mft run; choose an empty or new folder")
        if cfg.overwrite:
            shutil.rmtree(out)
        elif not cfg.resume:
            raise ValueError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        else:
            old = json.loads(config_path.read_text())
            keys = [k for k in set(old) | set(resolved) if k not in _IGNORED_ON_RESUME and old.get(k) != resolved.get(k)]
            if keys:
                raise ValueError(f"--resume: the run in {out} was started with another configuration (differs in {sorted(keys)})")
            if (out / "summary.json").exists():
                return "finished"
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                log.info("--resume: no complete checkpoint in %s; starting from step 0", out)
            return ckpt
    return None


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:  # linear warm-up, then cosine decay to min_lr_ratio
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def open_training_rows(cfg: TrainConfig):
    """(rows, manifest or None, student model id, seq_len)."""
    if cfg.teacher == "online":
        return None, None, cfg.model, cfg.seq_len or DEFAULT_SEQ_LEN
    cache = open_cache(cfg.cache)  # validated; shards checksummed on first read
    m = cache.manifest
    model_id = cfg.model or (m["model"]["path"] if m["model"].get("path") and Path(m["model"]["path"]).is_dir()
                             else m["model"]["id"])
    if cfg.seq_len and cfg.seq_len != cache.seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} differs from the cache's {cache.seq_len}; leave it unset with a cache")
    if cfg.top_k > cache.top_k:
        raise ValueError(f"--top-k {cfg.top_k} exceeds the cache's top-k of {cache.top_k} ({cfg.cache})")
    if cfg.data:  # the cache holds the sequences; --data only names what the user believes they are
        fp = read_documents(cfg.data, text_field=cfg.text_field, split=m["data"]["split"]).fingerprint
        if fp != m["data"]["fingerprint"]:
            raise ValueError(f"--data {cfg.data} is not the data the cache {cfg.cache} was made from "
                             f"({m['data']['source']}); rebuild the cache with `mft cache --data {cfg.data}`")
    return CacheRows(cache, cfg.top_k), m, model_id, cache.seq_len


def check_teacher_revision(cfg: TrainConfig, manifest: dict, model_id: str) -> None:
    """The student is the cache's teacher unless --allow-different-student says otherwise (same tokenizer and
    vocabulary are checked once the student is loaded). The weight files are compared, so another
    revision of the same model, or a teacher folder changed since caching, is caught."""
    cached = manifest["model"].get("weights_fingerprint")
    current = weights_fingerprint(model_id)
    if cached is None or current is None:
        log.warning("cannot compare the weights of %s with the cache's teacher %s (no local weight files)",
                    model_id, manifest["model"]["id"])
        return
    if current == cached:
        return
    if not cfg.allow_different_student:
        raise ValueError(f"--model {model_id}: its weights differ from those of the teacher the cache was made with "
                         f"({manifest['model']['id']}, weights sha256 {cached[:12]}); another revision or another model. "
                         "Rebuild the cache with this model, or pass --allow-different-student to train it against "
                         "the cached teacher's targets")
    log.warning("--allow-different-student: the student %s is not the cache's teacher %s; it is trained against the "
                "teacher's cached targets (same tokenizer and vocabulary)", model_id, manifest["model"]["id"])


def open_replay(cfg: TrainConfig, manifest: dict | None, tokenizer, seq_len: int, top_k: int):
    """--replay: a cache of general-domain rows made by the same teacher, or raw documents (ft, online)."""
    source = Path(cfg.replay)
    if (source / "manifest.json").exists():
        replay = open_cache(source)
        rm = replay.manifest
        if manifest is not None:
            for key, what in ((("tokenizer", "fingerprint"), "tokenizer"), (("vocab_size",), "vocabulary"),
                              (("model", "weights_fingerprint"), "teacher weights"), (("seq_len",), "seq len")):
                a, b = manifest, rm
                for k in key:
                    a, b = a[k], b[k]
                if a != b:
                    raise ValueError(f"--replay {cfg.replay}: made with another {what} than --cache {cfg.cache} "
                                     f"({b} vs {a}); build the replay cache with the same teacher and --seq-len")
            if replay.top_k < top_k:
                raise ValueError(f"--replay {cfg.replay}: its top-k {replay.top_k} is below the {top_k} used from "
                                 f"--cache; pass --top-k {replay.top_k} or rebuild it")
        elif replay.seq_len != seq_len:
            raise ValueError(f"--replay {cfg.replay}: seq len {replay.seq_len}, not {seq_len}")
        return CacheRows(replay, top_k or replay.top_k)
    if cfg.teacher == "cache" and cfg.objective != "ft":
        raise ValueError(f"--replay {cfg.replay}: with --objective {cfg.objective}, replay rows need the teacher's "
                         f"targets too; cache them first (`mft cache --data {cfg.replay} --out REPLAY_CACHE "
                         f"--seq-len {seq_len}` with the same teacher) and pass --replay REPLAY_CACHE")
    return PackedRows(build_sequences(cfg.replay, tokenizer, seq_len, cfg.text_field)[0])


# -- evaluating and saving --------------------------------------------------------------------------
@contextlib.contextmanager
def writing(path: Path):
    """Disk errors while saving come out as OSError naming the folder (safetensors has its own error type)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        num = int(code.group(1)) if code else errno.EIO
        raise OSError(num, f"{os.strerror(num)} while writing weights", str(path)) from None


def evaluate(module, eval_sets: dict, cfg: TrainConfig, accelerator, state: TrainState) -> dict:
    record = {"step": state.step, "tokens": state.tokens}
    for name, rows in eval_sets.items():
        record[f"ppl_{name}"] = perplexity(module, rows, cfg.eval_batch_size, accelerator)
    base = state.evals[0] if state.evals else record
    if "ppl_specialized" in record:
        record["S"] = specialization(base["ppl_specialized"], record["ppl_specialized"])
    if "ppl_general" in record:
        record["DG"] = degeneralization(base["ppl_general"], record["ppl_general"])
    record["ratio"] = ratio(record.get("DG"), record.get("S"))
    state.evals.append(record)
    return record


def save_pretrained(accelerator, module, tokenizer, path: Path, merged: bool = False) -> None:
    """A folder that AutoModelForCausalLM.from_pretrained loads (or peft's PeftModel.from_pretrained with an
    adapter), written under a temporary name."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    state_dict = None  # the model's own
    if accelerator.distributed_type == DistributedType.FSDP:
        # sharded weights: every process takes part in gathering them; StudentLoss keeps the model as .model
        full = accelerator.get_state_dict(module)
        state_dict = {k.removeprefix("model."): v for k, v in full.items()} if accelerator.is_main_process else None
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = accelerator.unwrap_model(module).model
        with writing(tmp):
            if is_adapted(model):
                save_adapted(model, tmp, merged, state_dict)
            else:
                model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, out: Path, state: TrainState, keep: int = 2) -> None:
    final = out / "checkpoints" / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(tmp):
        accelerator.save_state(str(tmp))
    fault_point(f"train:checkpoint-{state.step}")
    if accelerator.is_main_process:
        write_json_atomic(tmp / "trainer_state.json", state.__dict__)  # last: marks the checkpoint complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted((out / "checkpoints").glob("step-??????"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, out: Path, ckpt: Path) -> TrainState:
    import pickle

    try:  # accelerate loads every file with torch.load(weights_only=True): a pickle that runs code is refused
        accelerator.load_state(str(ckpt))
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as e:
        raise ValueError(f"--resume: the checkpoint {ckpt} cannot be loaded safely ({str(e).splitlines()[0][:200]}); "
                         "remove it to resume from an earlier one, or pass --overwrite to start again") from None
    state = TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))
    if accelerator.is_main_process:  # forget metrics written after the checkpoint: they will be written again
        with open(out / "metrics.jsonl", "r+b") as f:
            f.truncate(state.metrics_bytes)
    log.info("resumed from %s (step %d)", ckpt, state.step)
    return state


# -- one optimiser step -----------------------------------------------------------------------------
def train_step(module, optimizer, scheduler, micro: list[dict], targets, accelerator, cfg: TrainConfig, step: int,
               state: TrainState, rows_of_step):
    """Forward/backward over the micro-batches of one step, then clip and step. Returns (loss, tokens, lr).

    A non-finite loss (the same on every process: it is reduced) stops the run naming the step and its
    rows, or with --skip-nonfinite N is skipped: gradients dropped, weights and optimiser untouched."""
    dev = accelerator.device
    micro = [{k: v.to(dev, non_blocking=True) for k, v in mb.items()} for mb in micro]
    local = sum(mb["mask"].sum() for mb in micro)
    n_step = accelerator.reduce(torch.as_tensor(local, device=dev, dtype=torch.float64), "sum")  # all processes
    scale = accelerator.num_processes / max(n_step.item(), 1.0)  # DDP averages gradients over processes
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(module):
            loss, _ = module(**targets(mb))
            if fault_active(f"train:nan-loss-{step + 1}"):  # fault injection: NaN loss and NaN gradients
                loss = loss * float("nan")
            accelerator.backward(loss * scale)
        loss_sum += loss.detach().double()
    loss_value = (accelerator.reduce(loss_sum, "sum") / max(n_step.item(), 1.0)).item()
    lr = scheduler.get_last_lr()[0]  # the rate this step uses
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        where = f"step {step + 1} (global batch of cache rows {rows_of_step(step)})"
        if len(state.skipped_steps) >= cfg.skip_nonfinite:
            raise FloatingPointError(f"non-finite loss ({loss_value}) at {where}; the weights were not updated. "
                                     "Check the cache (mft inspect --verify), lower --lr, or pass --skip-nonfinite N")
        state.skipped_steps.append(step + 1)
        log.warning("non-finite loss (%s) at %s: skipped (%d of --skip-nonfinite %d)", loss_value, where,
                    len(state.skipped_steps), cfg.skip_nonfinite)
        scheduler.step()  # the schedule follows the step index; the weights stay as they were
        return loss_value, int(n_step.item()), lr
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, int(n_step.item()), lr


def make_targets(cfg: TrainConfig, teacher):
    """micro-batch -> the keyword arguments of StudentLoss.forward for the chosen objective."""
    def targets(mb: dict) -> dict:
        inputs = {"input_ids": mb["input_ids"], "length": mb["length"], "mask": mb["mask"]}
        if cfg.objective == "ft":
            return inputs
        if teacher is not None:
            return {**inputs, **online_targets(teacher, mb, cfg.objective, cfg.tau)}
        ids, lp, label_lp = sparse_teacher(mb["topk_ids"], mb["topk_logprobs"], mb["label_logprob"],
                                           mb["input_ids"][:, 1:], top_k=cfg.top_k, tail=cfg.tail)
        # the weight from the exact cached p_max and p_label, whatever happens to the distribution
        return {**inputs, "weight": cache_weight(mb, cfg.objective, cfg.tau), "topk_ids": ids,
                "topk_logprobs": lp, "label_logprob": label_lp, **({"drop_tail": True} if cfg.tail == "drop" else {})}

    return targets


# -- the run ----------------------------------------------------------------------------------------
def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    gpu = torch.accelerator.current_accelerator()  # None without one
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_launch(gpu.type if gpu else None))
    if accelerator.num_processes > 1:
        leave_process_group_at_exit()
    return accelerator


def train(cfg: TrainConfig) -> dict:
    from accelerate.utils import set_seed

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    accelerator = make_accelerator(cfg)
    if not accelerator.is_main_process:  # one log, from the first process
        logging.getLogger("mft_cache").setLevel(logging.WARNING)
    out = Path(cfg.out)
    rows, manifest, model_id, seq_len = open_training_rows(cfg)
    P, G = accelerator.num_processes, cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    resolved = {**to_dict(cfg), "resolved_model": model_id, "seq_len": seq_len, "num_processes": P,
                "global_batch": G, "cache_manifest_sha256": manifest["manifest_sha256"] if manifest else None,
                "cache_top_k": manifest["top_k"] if manifest else None}
    ckpt = decide_on_main(accelerator, lambda: prepare_run_folder(out, resolved, cfg))  # may wipe --out
    accelerator.wait_for_everyone()
    if ckpt == "finished":
        log.info("the run in %s is already finished (same configuration); --overwrite reruns it", out)
        return json.loads((out / "summary.json").read_text())
    set_seed(cfg.seed, device_specific=True)  # seed + process index: each process its own dropout masks

    tokenizer = load_tokenizer(model_id, cfg.trust_remote_code)
    model = load_model(model_id, torch.float32, accelerator.device, cfg.trust_remote_code)
    model.config.use_cache = False
    teacher = None
    if manifest is not None:
        check_student(manifest, tokenizer, model, model_id)  # tokenizer and vocabulary first: their errors say more
        check_teacher_revision(cfg, manifest, model_id)
        log.info("targets from the cache %s: the teacher is not loaded", cfg.cache)
    else:
        teacher = load_model(cfg.model, torch.float32, accelerator.device, cfg.trust_remote_code).eval().requires_grad_(False)
        rows = PackedRows(build_sequences(cfg.data, tokenizer, seq_len, cfg.text_field)[0])
        log.info("online teacher %s: a teacher forward pass every micro-batch (the paper's Algorithm 1)", cfg.model)
    rows_of_step = lambda s: step_rows(s, G, len(rows), cfg.seed)
    if cfg.replay:
        if G < 2:
            raise ValueError("--replay needs a global batch of at least 2 sequences (--batch-size x --grad-accum)")
        num_main, replay = len(rows), open_replay(cfg, manifest, tokenizer, seq_len, cfg.top_k or (manifest or {}).get("top_k", 0))
        rows = MixedRows(rows, replay)
        rows_of_step = lambda s: mixed_step_rows(s, G, num_main, len(replay), cfg.replay_fraction, cfg.seed)
        log.info("replay: %d sequences from %s, %.0f%% of every batch", len(replay), cfg.replay, 100 * cfg.replay_fraction)
    if cfg.peft != "none":
        model = add_adapter(model, cfg.peft, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.peft_targets)
    eval_sets = {}
    for name, path in (("specialized", cfg.eval_specialized), ("general", cfg.eval_general)):
        if path:
            packed = build_sequences(path, tokenizer, seq_len, cfg.text_field)[0]
            n = cfg.eval_max_sequences or packed.num_sequences
            packed.truncate(n)
            eval_sets[name] = PackedRows(packed)

    module = StudentLoss(model, cfg.chunk_size)
    # FSDP's auto-wrap reads the decoder-layer classes from the prepared module: the model's own list
    module._no_split_modules = getattr(model, "_no_split_modules", None)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))  # stepped once per step, any P
    module, optimizer = accelerator.prepare(module, optimizer)
    # The scheduler is not registered with Accelerate: it would be pickled and restored by an
    # unrestricted torch.load. Its state is a few numbers, saved in trainer_state.json.

    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", resolved)
        (out / "metrics.jsonl").touch()
    if ckpt:
        state = load_checkpoint(accelerator, out, ckpt)
        scheduler.load_state_dict(state.scheduler)
    else:
        state = TrainState()
        if accelerator.is_main_process:  # a fresh start forgets what an interrupted one wrote
            (out / "metrics.jsonl").write_text("")
            for stale in ("best", "final", "summary.json"):
                shutil.rmtree(out / stale, ignore_errors=True) if (out / stale).is_dir() else (out / stale).unlink(missing_ok=True)
    t_run, wall_before = time.perf_counter(), state.wall_time_s
    metrics = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None

    def emit(record: dict) -> None:
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    if not state.evals and eval_sets:
        emit({"type": "eval", **evaluate(module, eval_sets, cfg, accelerator, state)})
    targets = make_targets(cfg, teacher)
    prefetch = Prefetcher(rows, range(state.step, cfg.steps), lambda s: micro_batches(
        rows_of_step(s), cfg.batch_size, cfg.grad_accum, accelerator.process_index, P))
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"mft train ({cfg.objective})", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    module.train()
    for step, micro in prefetch:
        t0 = time.perf_counter()
        loss, tokens, lr = train_step(module, optimizer, scheduler, micro, targets, accelerator, cfg, step, state,
                                      rows_of_step)
        dt = time.perf_counter() - t0
        state.step, state.tokens, state.train_time_s = step + 1, state.tokens + tokens, state.train_time_s + dt
        state.wall_time_s = wall_before + time.perf_counter() - t_run
        record = {"type": "train", "step": state.step, "loss": loss, "lr": lr,
                  "tokens": state.tokens, "step_time_s": dt, "tokens_per_s": tokens / dt,
                  **({"skipped": True} if state.skipped_steps and state.skipped_steps[-1] == state.step else {})}
        emit(record)
        fault_point(f"train:step-{state.step}")
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:,.0f}")
        bar.update(1)
        if state.step % cfg.log_every == 0 and accelerator.is_main_process:
            bar.write(f"step {state.step} | loss {loss:.4f} | {run_label(cfg)} | lr {record['lr']:.2e} "
                      f"| {dt * 1000:.0f} ms | {tokens / dt:,.0f} tok/s")
        if eval_sets and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
            ev = evaluate(module, eval_sets, cfg, accelerator, state)
            emit({"type": "eval", **ev})
            if accelerator.is_main_process:
                bar.write(" | ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, float)))
            if "ppl_specialized" in ev and (state.best is None or ev["ppl_specialized"] < state.best["ppl_specialized"]):
                state.best = ev
                save_pretrained(accelerator, module, tokenizer, out / "best", cfg.merge_adapter)
            if accelerator.is_main_process:
                plot_s_dg(state.evals, out / "s_dg.png", run_label(cfg))
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
            if metrics:
                state.metrics_bytes = metrics.tell()
            state.scheduler = scheduler.state_dict()  # numbers only (lr_lambdas is [None] for a function)
            save_checkpoint(accelerator, out, state)
    bar.close()
    save_pretrained(accelerator, module, tokenizer, out / "final", cfg.merge_adapter)
    state.wall_time_s = wall_before + time.perf_counter() - t_run
    summary = summarize(cfg, state, resolved, teacher is not None)
    if accelerator.is_main_process:
        write_json_atomic(out / "summary.json", summary)
        metrics.close()
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: resume state no longer needed
    accelerator.wait_for_everyone()
    log.info("run written to %s: S %s, DG %s, DG/S %s", out, _fmt(summary["S"]), _fmt(summary["DG"]), _fmt(summary["ratio"]))
    return summary


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
        "teacher": "online" if online else "cache",
        "teacher_loaded": online,
        "S": best.get("S"),
        "DG": best.get("DG"),
        "ratio": best.get("ratio"),
        "best_step": best.get("step"),
        "base_ppl_specialized": base.get("ppl_specialized"),
        "base_ppl_general": base.get("ppl_general"),
        "best_ppl_specialized": best.get("ppl_specialized"),
        "best_ppl_general": best.get("ppl_general"),
        "final_ppl_specialized": last.get("ppl_specialized"),
        "final_ppl_general": last.get("ppl_general"),
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
