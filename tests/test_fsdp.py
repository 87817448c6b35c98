"""`mft train` under FSDP (Accelerate's FSDP2 and FSDP1) on 2 CPU processes trains like one process with the same
global batch, writes best/, final/ and summary.json once, and a killed run resumed from its sharded checkpoint ends
where the uninterrupted one does.

Accelerate (1.16) never gives FSDP to CPU processes: asked for it, it runs DDP (the last test checks that this is
reported). torch itself shards on CPU with gloo, so tests/fsdp_cpu_worker.py lets Accelerate's state say FSDP and
runs the real CLI; everything after that decision is Accelerate's and torch's own code. Each launch costs a few
seconds of imports and model loading per process: FSDP2 runs three (uninterrupted, killed, resumed), FSDP1 two.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_texts, write_jsonl
from helpers import as_flags, leftovers, subprocess_env
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.trainer.config import TrainConfig
from mft_cache.trainer.train import train

WORKER = Path(__file__).with_name("fsdp_cpu_worker.py")
CACHE_ARGS = dict(seq_len=48, top_k=8, shard_mb=0.01, batch_size=2)
# the configuration docs/SCALE.md shows, as `accelerate launch --config_file` passes it to every process
FSDP_ENV = dict(ACCELERATE_USE_FSDP="true", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT", FSDP_RESHARD_AFTER_FORWARD="true",
                FSDP_CPU_RAM_EFFICIENT_LOADING="false")


def train_config(cache: Path, out: Path, data: dict, batch_size: int) -> dict:
    """4 steps (global batch 4), a checkpoint every 2, evaluation every 2 of 5 sequences (split 3 + 2)."""
    return dict(cache=str(cache), out=str(out), steps=4, batch_size=batch_size, lr=3e-3, warmup_steps=1, save_every=2,
                eval_every=2, log_every=100, eval_specialized=str(data["spec"]), eval_general=str(data["gen"]),
                eval_max_sequences=5, eval_batch_size=2)


def fsdp_train(version: int, options: dict, logs: Path, *extra: str, **env: str) -> tuple[int, str]:
    """`mft train` on 2 processes under FSDP `version`; returns (torchrun's exit code, the processes' stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "train", *as_flags(options), *extra]
    err = logs.with_suffix(".stderr")
    with open(logs.with_suffix(".stdout"), "wb") as so, open(err, "wb") as se:  # files: never an undrained pipe
        rc = subprocess.run(cmd, stdout=so, stderr=se, timeout=600,
                            env=subprocess_env(**FSDP_ENV, FSDP_VERSION=str(version), **env)).returncode
    return rc, err.read_text(errors="replace")


def metrics(run: Path) -> list[dict]:
    keep = ("type", "step", "loss", "lr", "tokens", "ppl_specialized", "ppl_general", "ppl_specialized_se",
            "ppl_general_se")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k in keep} for x in lines]


def weights(run: Path, folder: str = "final") -> dict:
    return load_file(run / folder / "model.safetensors")


def assert_trains_like(run: Path, reference: Path) -> None:
    """run's schedule, losses, perplexities and best/ and final/ weights are reference's, at float32 tolerance."""
    one, two = metrics(reference), metrics(run)
    assert [(x["type"], x["step"], x["tokens"], x.get("lr")) for x in one] == \
        [(x["type"], x["step"], x["tokens"], x.get("lr")) for x in two]
    for key in ("loss", "ppl_specialized", "ppl_general", "ppl_specialized_se", "ppl_general_se"):
        a = torch.tensor([x[key] for x in one if key in x], dtype=torch.float64)
        b = torch.tensor([x[key] for x in two if key in x], dtype=torch.float64)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    for folder in ("best", "final"):
        w1, w2 = weights(reference, folder), weights(run, folder)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("fsdp-data")
    return {"train": write_jsonl(d / "train.jsonl", make_texts(20, seed=7)),
            "spec": write_jsonl(d / "spec.jsonl", make_texts(6, seed=12)),
            "gen": write_jsonl(d / "gen.jsonl", make_texts(6, seed=13, min_words=5, max_words=30))}


@pytest.fixture(scope="module")
def cache(llama, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-cache") / "cache"
    build_cache(CacheConfig(model=str(llama), data=str(data["train"]), out=str(out), **CACHE_ARGS))
    return out


@pytest.fixture(scope="module")
def one_process_run(cache, data, tmp_path_factory) -> Path:
    """1 process x batch 4, in this process."""
    out = tmp_path_factory.mktemp("fsdp-1p") / "run"
    train(TrainConfig(**train_config(cache, out, data, 4)))
    return out


@pytest.fixture(scope="module")
def fsdp2_run(cache, data, tmp_path_factory) -> tuple[Path, str]:
    """2 processes x batch 2 under FSDP2, uninterrupted: (run folder, stderr)."""
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    rc, err = fsdp_train(2, train_config(cache, out, data, 2), out.parent / "run")
    assert rc == 0, err[-3000:]
    return out, err


def test_fsdp2_trains_like_one_process_with_the_same_global_batch(one_process_run, fsdp2_run):
    run, err = fsdp2_run
    assert_trains_like(run, one_process_run)
    assert err.count("run written to") == 1 and "FSDP is asked for" not in err  # one log; FSDP did run
    for name in ("config.json", "summary.json"):
        recorded = json.loads((run / name).read_text())
        assert (recorded["num_processes"], recorded["global_batch"]) == (2, 4)
    assert (run / "best" / "config.json").exists() and (run / "final" / "config.json").exists()
    assert not (run / "checkpoints").exists() and not leftovers(run)


def killed_then_resumed(version: int, cache: Path, data: dict, out: Path) -> None:
    """A run under FSDP `version` killed in step 3, after its step-2 checkpoint, then resumed to the end."""
    options = train_config(cache, out, data, 2)
    rc, err = fsdp_train(version, options, out.parent / "killed", MFT_FAULT="train:step-3")
    assert rc != 0 and not (out / "summary.json").exists()
    ckpt = out / "checkpoints" / "step-000002"
    assert (ckpt / "trainer_state.json").exists()
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # sharded: one file per process, not one gathered file
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    rc, err = fsdp_train(version, options, out.parent / "resumed", "--resume")
    assert rc == 0, err[-3000:]
    assert err.count("resumed from") == 1 and "step-000002" in err
    assert err.count("run written to") == 1 and not (out / "checkpoints").exists() and not leftovers(out)


@pytest.mark.slow  # about 20 s: 2 processes killed, then resumed
def test_fsdp2_run_killed_then_resumed_equals_the_uninterrupted_one(cache, data, fsdp2_run, tmp_path):
    out = tmp_path / "run"
    killed_then_resumed(2, cache, data, out)
    uninterrupted = fsdp2_run[0]
    assert metrics(out) == metrics(uninterrupted)
    for folder in ("best", "final"):
        a, b = weights(out, folder), weights(uninterrupted, folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # about 20 s: 2 processes killed, then resumed
def test_fsdp1_run_killed_then_resumed_trains_like_one_process(cache, data, one_process_run, tmp_path):
    """FSDP1 flattens the parameters: an optimiser built before wrapping would train nothing, and Accelerate's
    sharded load fills only optimiser state that already exists (the resumed AdamW would start from zero moments).
    Either shows here as weights away from the one-process run's by about as much as training moves them."""
    out = tmp_path / "run"
    killed_then_resumed(1, cache, data, out)
    assert_trains_like(out, one_process_run)


def test_fsdp_that_accelerate_does_not_run_is_reported(cache, data, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)  # Accelerate's plugin sets it: gone after
    with caplog.at_level(logging.WARNING, logger="mft_cache"):
        train(TrainConfig(cache=str(cache), out=str(tmp_path / "run"), steps=1, batch_size=4, save_every=0))
    assert "FSDP is asked for (ACCELERATE_USE_FSDP) but Accelerate runs these 1 process(es) on cpu as NO" in caplog.text
