"""Saving and restoring a run: resumable checkpoints (`checkpoints/step-NNNNNN/`) and loadable model folders
(`best/`, `final/`). Each is written under a temporary name and renamed once complete; a checkpoint is complete
once its `trainer_state.json` (written last) exists."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mft_cache.faults import fault_point
from mft_cache.storage.manifest import write_json_atomic

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


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / STATE_FILE).exists())
    return done[-1] if done else None


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
        write_json_atomic(tmp / STATE_FILE, state.__dict__)  # last: marks the checkpoint complete
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
    state = TrainState(**json.loads((ckpt / STATE_FILE).read_text()))
    if accelerator.is_main_process:  # forget metrics written after the checkpoint: they will be written again
        with open(out / "metrics.jsonl", "r+b") as f:
            f.truncate(state.metrics_bytes)
    log.info("resumed from %s (step %d)", ckpt, state.step)
    return state


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
