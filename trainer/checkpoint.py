"""Saving and restoring a run: resumable checkpoints (`checkpoints/step-NNNNNN/`) and loadable model folders
(`best/`, `final/`). Each is written under a temporary name and renamed once complete; a checkpoint is complete
once its `trainer_state.json` (written last) exists. It records the size and sha256 of every other file of the
checkpoint, so `--resume` can tell a damaged checkpoint (a flipped bit, a truncated or replaced file) before loading
it, and fall back to the one before; checkpoints written before hashes were recorded are loaded unchecked."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mft_cache.faults import fault_point
from mft_cache.files import open_owned, remove_member, write_json_atomic

from .adapters import is_adapted, save_adapted

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


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


# trainer_state.json: each TrainState field's JSON types (a bool is not an int; an int is a float)
_STATE_TYPES = {"step": (int,), "tokens": (int,), "wall_time_s": (float,), "train_time_s": (float,),
                "metrics_bytes": (int,), "skipped_steps": (list,), "evals": (list,), "best": (dict, type(None)),
                "scheduler": (dict, type(None))}
FILES_KEY = "files"  # trainer_state.json: {relative path: {"bytes": n, "sha256": hex}} of the checkpoint's files


def _type_ok(value, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (isinstance(value, int) and float in types)


def read_state(path: Path) -> tuple[TrainState, dict | None]:
    """(TrainState, recorded files or None) from a trainer_state.json; ValueError saying what is wrong with it."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name} is not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    files = raw.pop(FILES_KEY, None)
    unknown = sorted(k for k in raw if k not in _STATE_TYPES)
    wrong = sorted(k for k, v in raw.items() if k in _STATE_TYPES and not _type_ok(v, _STATE_TYPES[k]))
    if unknown or wrong or "step" not in raw:
        raise ValueError(f"{path.name} is not a training state (unknown keys {unknown}, wrong types {wrong}"
                         f"{', no step' if 'step' not in raw else ''})")
    state = TrainState(**raw)
    negative = [k for k in ("step", "tokens", "metrics_bytes") if getattr(state, k) < 0]
    if negative or not all(isinstance(s, int) and not isinstance(s, bool) for s in state.skipped_steps) \
            or not all(isinstance(e, dict) for e in state.evals):
        raise ValueError(f"{path.name} holds impossible values (negative {negative}, or skipped_steps/evals of "
                         "the wrong types)")
    sched = state.scheduler
    if sched is not None and not (isinstance(sched.get("last_epoch"), int) and all(
            isinstance(sched.get(k), list) and all(_type_ok(x, (float,)) for x in sched[k])
            for k in ("base_lrs", "_last_lr"))):
        raise ValueError(f"{path.name}: its scheduler state is not a LambdaLR's (last_epoch, base_lrs, _last_lr)")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            for r in files.values())):
        raise ValueError(f"{path.name}: its record of the checkpoint's files is damaged")
    return state, files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_files(folder: Path) -> dict:
    """Size and sha256 of every file under a checkpoint folder (but trainer_state.json, which holds them)."""
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with a complete checkpoint (its state, or a file's size or sha256), or None if nothing is."""
    try:
        state, files = read_state(ckpt / STATE_FILE)
    except ValueError as e:
        return str(e)
    if ckpt.name != f"step-{state.step:06d}":
        return f"{STATE_FILE} says step {state.step}, not the folder's"
    for rel, record in (files or {}).items():  # None: saved before sizes and hashes were recorded
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{rel} holds {path.stat().st_size} bytes, not the {record['bytes']} it was saved with"
        if _sha256(path) != record["sha256"]:
            return f"{rel}: its sha256 differs from the one recorded when it was saved"
    return None


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoints marked complete (trainer_state.json written), oldest first."""
    return sorted(p for p in (out / "checkpoints").glob("step-??????") if (p / STATE_FILE).exists())


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def usable_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that passes its checks; a damaged one is reported and the one before it tried.
    None if there is no checkpoint at all; ValueError naming them if none is usable."""
    rejected = []
    for ckpt in reversed(complete_checkpoints(out)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if rejected:
                log.warning("--resume: resuming from the earlier checkpoint %s instead", ckpt)
            return ckpt
        log.warning("--resume: the checkpoint %s is damaged (%s); trying the one before it", ckpt, problem)
        rejected.append((ckpt, problem))
    if not rejected:
        return None
    (ckpt, problem), rest = rejected[0], [str(c) for c, _ in rejected[1:]]
    raise ValueError(f"--resume: the checkpoint {ckpt} cannot be loaded safely ({problem})"
                     f"{'; nor can ' + ', '.join(rest) if rest else ''}; no earlier checkpoint is usable. "
                     "Restore it, or pass --overwrite to start the run again")


def save_checkpoint(accelerator, out: Path, state: TrainState, keep: int = 2) -> None:
    final = out / "checkpoints" / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        remove_member(tmp)
    accelerator.wait_for_everyone()
    with writing(tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's files are written before they are hashed
    fault_point(f"train:checkpoint-{state.step}")
    if accelerator.is_main_process:  # last: marks the checkpoint complete, and records what complete means
        write_json_atomic(tmp / STATE_FILE, {**state.__dict__, FILES_KEY: record_files(tmp)})
        remove_member(final)
        os.replace(tmp, final)
        for old in sorted((out / "checkpoints").glob("step-??????"))[:-keep]:
            remove_member(old)
    accelerator.wait_for_everyone()


def create_optimizer_state(optimizer) -> None:
    """Give a fresh optimiser its state (moments at zero), the weights untouched: one step at a rate of 0 over zero
    gradients. Accelerate loads an FSDP1 sharded optimiser checkpoint into the state the optimiser already has, so
    into nothing at all before the first step."""
    import torch

    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    rates = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, rates):
        g["lr"] = lr
    for p in params:
        p.grad = None


def load_checkpoint(accelerator, out: Path, ckpt: Path) -> TrainState:
    import pickle

    from accelerate.utils import DistributedType
    from safetensors import SafetensorError

    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        for optimizer in accelerator._optimizers:  # else the resumed run's AdamW moments would start again at zero
            create_optimizer_state(optimizer.optimizer)
    try:  # accelerate loads every file with torch.load(weights_only=True): a pickle that runs code is refused
        accelerator.load_state(str(ckpt))
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, SafetensorError) as e:
        raise ValueError(f"--resume: the checkpoint {ckpt} cannot be loaded safely ({str(e).splitlines()[0][:200]}); "
                         "remove it to resume from an earlier one, or pass --overwrite to start again") from None
    try:
        state, _ = read_state(ckpt / STATE_FILE)
    except ValueError as e:
        raise ValueError(f"--resume: the checkpoint {ckpt} cannot be loaded safely ({e})") from None
    if accelerator.is_main_process:  # forget metrics written after the checkpoint: they will be written again
        with open_owned(out, "metrics.jsonl", "r+b") as f:
            if f.seek(0, os.SEEK_END) < state.metrics_bytes:  # truncate() would pad it with NUL bytes
                raise ValueError(f"--resume: {out / 'metrics.jsonl'} is shorter than when {ckpt.name} was saved; "
                                 "restore it, or pass --overwrite to start the run again")
            f.truncate(state.metrics_bytes)
    log.info("resumed from %s (step %d)", ckpt, state.step)
    return state


def save_pretrained(accelerator, module, tokenizer, path: Path, merged: bool = False, card=None) -> None:
    """A folder that AutoModelForCausalLM.from_pretrained loads (or peft's PeftModel.from_pretrained with an
    adapter), written under a temporary name; `card(folder)` adds its model card before it takes its name."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    state_dict = None  # the model's own
    if accelerator.distributed_type == DistributedType.FSDP:
        # sharded weights: every process takes part in gathering them; StudentLoss keeps the model as .model
        full = accelerator.get_state_dict(module)
        state_dict = {k.removeprefix("model."): v for k, v in full.items()} if accelerator.is_main_process else None
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        remove_member(tmp)
        model = accelerator.unwrap_model(module).model
        with writing(tmp):
            if is_adapted(model):
                save_adapted(model, tmp, merged, state_dict)
            else:
                model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if card is not None:
                card(tmp)
        remove_member(path)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
