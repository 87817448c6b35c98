"""The worker of tests/test_trainer_accum.py's 2-process test, and the MFTTrainer run both sides of it share.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_trainer_worker.py \
        CACHE MODEL OUT BATCH ACCUM STEPS

trains MFTTrainer on every process; the first writes OUT/weights.safetensors and OUT/losses.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TAU, LR = 0.25, 0.5  # SGD: the update is the gradient itself, nothing normalises a wrong scale away


def train_with_trainer(cache: Path, model_dir: Path, out: Path, batch: int, accum: int, steps: int, rows=None,
                       callbacks=()):
    """MFTTrainer on `cache` with SGD (momentum 0.9, as `mft train --optimizer sgd`), a constant rate, no clipping,
    float32: `mft train`'s rows in its order (`rows`: these rows in this order instead). Returns (trainer, model)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from mft_cache.hf import CacheDataset, MFTLoss, MFTTrainer

    class Trainer(MFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return rows if rows is not None else super()._get_train_sampler(train_dataset)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
                             seed=0, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=CacheDataset(cache), mft_loss=MFTLoss("mft", TAU),
                      optimizers=(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), None),
                      same_order_as_mft_train=rows is None, callbacks=list(callbacks))
    trainer.train()
    return trainer, model


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def reset_accelerate() -> None:
    """A fresh Accelerate state for the next in-process run (Accelerate keeps one per process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def initial_weights(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").state_dict()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


if __name__ == "__main__":
    cache, model_dir, out = map(Path, sys.argv[1:4])
    batch, accum, steps = map(int, sys.argv[4:7])
    trainer, model = train_with_trainer(cache, model_dir, out, batch, accum, steps)
    if trainer.accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
        (out / "losses.json").write_text(json.dumps({"losses": logged_losses(trainer),
                                                     "processes": trainer.accelerator.num_processes}))
