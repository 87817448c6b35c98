"""MFTTrainer normalised as `mft train` (docs/HF.md): every micro-batch's summed loss over the trained tokens of the
whole optimiser step (all accumulated micro-batches, all processes), so that gradient accumulation and several
processes give the gradient of one big batch. The rows hold documents packed whole, padded: their trained tokens
differ from row to row, so averaging the micro-batches' means would give another gradient."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import subprocess_env
from hf_trainer_worker import (LR, TAU, initial_weights, logged_losses, max_abs_diff, reset_accelerate,
                               train_with_trainer)
from mft_cache.cli import main
from mft_cache.testing import make_texts, write_jsonl

WORKER = Path(__file__).with_name("hf_trainer_worker.py")
SEQ = 64


@pytest.fixture(scope="module")
def cache(llama, tmp_path_factory) -> Path:
    """11 rows of whole documents (1-10 words each), padded: 19 to 61 trained tokens per row."""
    from mft_cache.pipeline.cache import CacheConfig, build_cache

    d = tmp_path_factory.mktemp("accum")
    data = write_jsonl(d / "docs.jsonl", make_texts(16, seed=3, min_words=1, max_words=10))
    build_cache(CacheConfig(model=str(llama), data=str(data), out=str(d / "cache"), seq_len=SEQ, top_k=8,
                            packing="document"))
    return d / "cache"


def trained_tokens(cache: Path) -> list[int]:
    from mft_cache.hf import CacheDataset

    ds = CacheDataset(cache)
    return [int(ds[i]["label_mask"].sum()) for i in range(len(ds))]


def test_accumulated_steps_give_the_weights_of_mft_train(cache, llama, tmp_path):
    """Batch 2 x 2 micro-batches, 2 steps, the same rows in the same order: the weights of `mft train --batch-size 2
    --grad-accum 2` and its losses, step by step."""
    tokens = trained_tokens(cache)
    assert max(tokens) > 2 * min(tokens)
    steps = 2
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "mft"), "--steps", str(steps),
                 "--batch-size", "2", "--grad-accum", "2", "--lr", str(LR), "--warmup-steps", "0", "--min-lr-ratio",
                 "1", "--tau", str(TAU), "--optimizer", "sgd", "--max-grad-norm", "0", "--save-every", "0",
                 "--seed", "0"]) == 0
    reset_accelerate()
    want = load_file(tmp_path / "mft" / "final" / "model.safetensors")
    want_losses = [json.loads(x)["loss"] for x in (tmp_path / "mft" / "metrics.jsonl").read_text().splitlines()]

    trainer, model = train_with_trainer(cache, llama, tmp_path / "hf", batch=2, accum=2, steps=steps)
    got = model.state_dict()
    assert max_abs_diff(got, want) <= 1e-6
    assert logged_losses(trainer) == pytest.approx(want_losses, rel=1e-6, abs=0)
    assert max_abs_diff(got, initial_weights(llama)) > 1e-3  # it did train


def test_a_steps_gradient_is_its_summed_loss_over_its_trained_tokens(cache, llama, tmp_path):
    """One step of 2 micro-batches, the two longest rows then the two shortest: the gradient Trainer steps with is
    that of the 4 rows' summed fused loss over their trained tokens (tokens weigh, not micro-batches), to 1e-6 of
    its largest element; the logged loss is that loss."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from mft_cache.hf import CacheDataset, collate
    from mft_cache.trainer.loss_module import StudentLoss
    from mft_cache.trainer.targets import from_cache

    tokens = trained_tokens(cache)
    by_length = sorted(range(len(tokens)), key=lambda i: -tokens[i])
    rows = by_length[:2] + by_length[-2:]
    assert tokens[rows[0]] + tokens[rows[1]] > 2 * (tokens[rows[2]] + tokens[rows[3]])

    model = AutoModelForCausalLM.from_pretrained(llama, dtype="float32")
    batch = collate([CacheDataset(cache)[i] for i in rows])
    targets = from_cache(batch, objective="mft", tau=TAU)
    loss_sum, n = StudentLoss(model, 1024)(batch["input_ids"], batch["length"], batch["label_mask"],
                                           **targets.tensors(), drop_tail=targets.drop_tail,
                                           segment_ids=batch["segment_ids"])
    assert n.item() == sum(tokens[i] for i in rows)
    (loss_sum / n).backward()
    want = {k: p.grad for k, p in model.named_parameters()}

    grads = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})

    trainer, _ = train_with_trainer(cache, llama, tmp_path / "hf", batch=2, accum=2, steps=1, rows=rows,
                                    callbacks=[Grab()])
    assert len(grads) == 1
    largest = max(g.abs().max().item() for g in want.values())
    assert max_abs_diff(grads[0], want) <= 1e-6 * largest
    assert logged_losses(trainer) == pytest.approx([(loss_sum / n).item()], rel=1e-6)


def test_two_processes_train_like_one_with_the_same_global_batch(cache, llama, tmp_path):
    """2 processes x batch 2 x 2 micro-batches against 1 process x batch 2 x 4 micro-batches (global batch 8, `mft
    train`'s rows), 3 steps: the same weights and losses to float tolerance."""
    out = tmp_path / "two"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(cache), str(llama), str(out), "2", "2", "3"]
    with open(tmp_path / "two.stdout", "wb") as so, open(tmp_path / "two.stderr", "wb") as se:
        rc = subprocess.run(cmd, stdout=so, stderr=se, env=subprocess_env(), timeout=300).returncode
    assert rc == 0, (tmp_path / "two.stderr").read_text(errors="replace")[-3000:]
    two = json.loads((out / "losses.json").read_text())
    assert two["processes"] == 2

    trainer, model = train_with_trainer(cache, llama, tmp_path / "one", batch=2, accum=4, steps=3)
    want = model.state_dict()
    got = load_file(out / "weights.safetensors")
    assert max_abs_diff(got, want) <= 1e-6
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert two["losses"] == pytest.approx(logged_losses(trainer), rel=1e-6, abs=0)
    assert max_abs_diff(want, initial_weights(llama)) > 1e-3


def test_mft_loss_refuses_data_parallel(cache, llama):
    """Trainer's choice for several GPUs in one process: each replica would compute the loss of the original."""
    from transformers import AutoModelForCausalLM

    from mft_cache.hf import CacheDataset, MFTLoss, collate

    model = torch.nn.DataParallel(AutoModelForCausalLM.from_pretrained(llama, dtype="float32"))
    batch = collate([CacheDataset(cache)[i] for i in range(2)])
    with pytest.raises(ValueError, match="DataParallel"):
        MFTLoss().summed(model, batch)
