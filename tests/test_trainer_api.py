"""The cache in a user's own transformers.Trainer (docs/HF.md, mft_cache/hf.py): the collator gives the batches
`mft train` uses, MFTTrainer gives its losses, MFTLoss is its fused loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_cache.cli import main


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


# -- the cache in your own transformers.Trainer -------------------------------------------------------------
def test_the_collator_gives_the_batches_mft_train_uses(cache):
    import torch

    from mft_cache.hf import CacheDataset, collate
    from mft_cache.trainer.data import Rows

    ds = CacheDataset(cache)
    rows = [5, 0, 17]
    want = Rows(ds.cache).batch(rows)
    got = collate([ds[i] for i in rows])
    assert set(got) == {"input_ids", "length", "label_mask", "topk_ids", "topk_logprobs", "label_logprob"} == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_mft_trainer_matches_mft_train_losses(cache, llama, tmp_path):
    """Same cache, student, seed, batch and row order (same_order_as_mft_train), constant lr without warm-up
    (--warmup-steps 0 --min-lr-ratio 1 against lr_scheduler_type constant), AdamW without weight decay, clipping
    at 1.0: the losses of every step agree."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from mft_cache.hf import CacheDataset, MFTLoss, MFTTrainer

    steps, batch, lr, tau = 4, 2, 1e-3, 0.5
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "mft"), "--steps", str(steps),
                 "--batch-size", str(batch), "--lr", str(lr), "--warmup-steps", "0", "--min-lr-ratio", "1",
                 "--tau", str(tau), "--save-every", "0", "--seed", "0"]) == 0
    want = [json.loads(x)["loss"] for x in (tmp_path / "mft" / "metrics.jsonl").read_text().splitlines()]

    got = []

    class Recording(MFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            got.append(loss.item())
            return loss

    model = AutoModelForCausalLM.from_pretrained(llama, dtype="float32")
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch", seed=0, report_to="none", save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    Recording(model=model, args=args, train_dataset=CacheDataset(cache), mft_loss=MFTLoss("mft", tau),
              same_order_as_mft_train=True).train()
    assert len(got) == len(want) == steps
    assert got == pytest.approx(want, abs=1e-5, rel=0)
    assert got[-1] < got[0]


def test_mft_loss_is_the_fused_loss_normalised_per_trained_token(cache, llama):
    import torch
    from transformers import AutoModelForCausalLM

    from mft_cache.hf import CacheDataset, MFTLoss, collate
    from mft_cache.trainer.loss_module import StudentLoss
    from mft_cache.trainer.targets import from_cache

    model = AutoModelForCausalLM.from_pretrained(llama, dtype="float32")
    batch = collate([CacheDataset(cache)[i] for i in range(3)])
    for tail in ("bucket", "drop"):
        t = from_cache(batch, objective="mft", tau=0.25, top_k=8, tail=tail)
        s, n = StudentLoss(model, 16)(batch["input_ids"], batch["length"], batch["label_mask"], **t.tensors(),
                                      drop_tail=t.drop_tail)
        got = MFTLoss("mft", 0.25, top_k=8, tail=tail, chunk_size=16)(model, batch)
        torch.testing.assert_close(got, s / n)
    with pytest.raises(ValueError, match="top_k 99 exceeds the top-k of 16"):
        MFTLoss(top_k=99)(model, batch)
