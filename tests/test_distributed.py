"""Both stages on 2 CPU processes (torchrun, gloo) give what one process gives.

`accelerate launch --cpu --num_processes 2` would quietly start ONE process on a machine without
MPI, so the real CLI is started with `python -m torch.distributed.run --standalone` (a free port
each time); Accelerate picks the processes up. Each launch costs a few seconds of imports and model
loading per process, so every launch here is reused: one uninterrupted 2-process cache and run,
one killed and resumed 2-process cache and run.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_texts, write_jsonl
from helpers import as_flags, cache_args, snapshot, torchrun
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.storage import open_cache
from mft_cache.trainer.config import TrainConfig
from mft_cache.trainer.train import train

SEQ = 48
CACHE_ARGS = dict(seq_len=SEQ, top_k=8, shard_mb=0.01, batch_size=2)  # ~22 shards of 5 rows
SHARD = re.compile(r"^shard-\d{5}\.zarr$")


def train_config(cache: Path, out: Path, data: dict, batch_size: int) -> dict:
    # 5 evaluation sequences, 2 per batch: process 0 evaluates 2 batches, process 1 one and a padding one
    return dict(cache=str(cache), out=str(out), steps=4, batch_size=batch_size, lr=3e-3, warmup_steps=1, save_every=2,
                eval_every=2, log_every=100, eval_specialized=str(data["spec"]), eval_general=str(data["gen"]),
                eval_max_sequences=5, eval_batch_size=2)


def _metrics(run: Path) -> list[dict]:
    keep = ("type", "step", "loss", "lr", "tokens", "ppl_specialized", "ppl_general", "S", "DG", "ppl_specialized_se",
            "ppl_general_se")
    return [{k: v for k, v in json.loads(x).items() if k in keep} for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dist-data")
    return {"train": write_jsonl(d / "train.jsonl", make_texts(20, seed=7)),
            "spec": write_jsonl(d / "spec.jsonl", make_texts(6, seed=12)),
            "gen": write_jsonl(d / "gen.jsonl", make_texts(6, seed=13, min_words=5, max_words=30))}


@pytest.fixture(scope="module")
def one_process_cache(llama, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache-1p") / "cache"
    build_cache(CacheConfig(model=str(llama), data=str(data["train"]), out=str(out), **CACHE_ARGS))
    return out


def test_two_process_cache_equals_the_one_process_cache(llama, data, one_process_cache, tmp_path):
    out = tmp_path / "cache"
    rc, err = torchrun(cache_args(llama, data["train"], out, **CACHE_ARGS), tmp_path / "run")
    assert rc == 0, err[-3000:]
    assert "2 processes:" in err and err.count("cache written to") == 1  # one log: the first process's

    one, two = snapshot(one_process_cache), snapshot(out)
    assert sorted(one) == sorted(two)
    differing = [k for k in one if k != "manifest.json" and one[k] != two[k]]
    assert not differing, f"shard files differ between 1 and 2 processes: {differing[:5]}"
    m1, m2 = (json.loads((f / "manifest.json").read_text()) for f in (one_process_cache, out))
    assert (m1["num_processes"], m2["num_processes"]) == (1, 2)
    ignore = ("num_processes", "manifest_sha256")
    assert {k: v for k, v in m1.items() if k not in ignore} == {k: v for k, v in m2.items() if k not in ignore}
    assert len(open_cache(out, verify="full").shards) == len(m1["shards"]) >= 10


@pytest.mark.slow  # about 20 s: 2 processes killed, then resumed (the 2-process cache itself is checked by default)
def test_two_process_cache_killed_then_resumed_equals_the_one_process_cache(llama, data, one_process_cache, tmp_path):
    out = tmp_path / "cache"
    rc, err = torchrun(cache_args(llama, data["train"], out, **CACHE_ARGS), tmp_path / "killed", MFT_FAULT="cache:shard-5")
    assert rc != 0  # the process that wrote shard 5 killed itself; torchrun stopped the other
    assert not (out / "manifest.json").exists()
    written = sorted(n for n in os.listdir(out) if SHARD.match(n))
    num_shards = len(json.loads((one_process_cache / "manifest.json").read_text())["shards"])
    assert "shard-00005.zarr" in written and len(written) < num_shards

    rc, err = torchrun(cache_args(llama, data["train"], out, **CACHE_ARGS), tmp_path / "resumed")
    assert rc == 0, err[-3000:]
    assert f"resuming: {len(written)} of {num_shards} shards already written" in err, err[-3000:]
    one, two = snapshot(one_process_cache), snapshot(out)
    assert sorted(one) == sorted(two)  # nothing hidden or temporary left behind
    assert all(one[k] == two[k] for k in one if k != "manifest.json")


@pytest.fixture(scope="module")
def two_process_run(one_process_cache, data, tmp_path_factory) -> Path:
    """4 steps on 2 processes x batch 2 (global batch 4), a checkpoint every 2 steps, evaluation every 2."""
    out = tmp_path_factory.mktemp("run-2p") / "run"
    rc, err = torchrun(["train", *as_flags(train_config(one_process_cache, out, data, 2))], out.parent / "run")
    assert rc == 0, err[-3000:]
    return out


def test_two_processes_train_like_one_with_the_same_global_batch(one_process_cache, data, two_process_run, tmp_path):
    train(TrainConfig(**train_config(one_process_cache, tmp_path / "run", data, 4)))  # 1 process x batch 4
    one, two = _metrics(tmp_path / "run"), _metrics(two_process_run)
    schedule = [(x["type"], x["step"], x["tokens"], x.get("lr")) for x in one]
    assert schedule == [(x["type"], x["step"], x["tokens"], x.get("lr")) for x in two]
    assert len([x for x in two if x["type"] == "train"]) == 4
    for key in ("loss", "ppl_specialized", "ppl_general", "ppl_specialized_se", "ppl_general_se"):  # 5 rows split 3 + 2
        a = torch.tensor([x[key] for x in one if key in x], dtype=torch.float64)
        b = torch.tensor([x[key] for x in two if key in x], dtype=torch.float64)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    w1, w2 = (load_file(r / "final" / "model.safetensors") for r in (tmp_path / "run", two_process_run))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    for name in ("config.json", "summary.json"):
        assert json.loads((tmp_path / "run" / name).read_text())["num_processes"] == 1
        assert json.loads((two_process_run / name).read_text())["num_processes"] == 2
        assert json.loads((two_process_run / name).read_text())["global_batch"] == 4
    assert not (two_process_run / "checkpoints").exists()


@pytest.mark.slow  # about 20 s: 2 processes killed, then resumed (the 2-process run itself is checked by default)
def test_two_process_run_killed_then_resumed_equals_the_uninterrupted_one(one_process_cache, data, two_process_run, tmp_path):
    out = tmp_path / "run"
    args = ["train", *as_flags(train_config(one_process_cache, out, data, 2))]
    rc, err = torchrun(args, tmp_path / "killed", MFT_FAULT="train:step-3")
    assert rc != 0 and not (out / "summary.json").exists()
    assert (out / "checkpoints" / "step-000002" / "trainer_state.json").exists()
    rc, err = torchrun([*args, "--resume"], tmp_path / "resumed")
    assert rc == 0, err[-3000:]
    assert err.count("resumed from") == 1 and "step-000002" in err
    assert _metrics(out) == _metrics(two_process_run)
    a, b = load_file(out / "final" / "model.safetensors"), load_file(two_process_run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
