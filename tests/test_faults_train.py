"""`mft train` stopped, then resumed: SIGKILL at named points (after a step, inside a checkpoint save), SIGTERM, a
full disk; and numerics that go wrong: a NaN loss, an inf in the weights. A resumed run ends with the metrics and
weights of an uninterrupted one and leaves no checkpoint or temporary file; a failed one exits 2 without a summary.

Real processes where the OS is part of the case (SIGKILL, SIGTERM, a file size limit), tests/helpers.py."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (EVAL_RUN, LOCK_FILE, SMALL_RUN, cli, leftovers, run_limited, same_weights, start_paused, stop,
                     train_args)
from mft_cache.cli import main

TIMEOUT = 300


@pytest.fixture(scope="module")
def uninterrupted_run(fault_cache, tmp_path_factory, fault_docs) -> Path:
    out = tmp_path_factory.mktemp("rel-train") / "run"
    done = run_limited(cli(train_args(fault_cache, out, "--eval-specialized", str(fault_docs["spec"]), **EVAL_RUN)))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _metrics(run_dir: Path) -> list[dict]:
    keep = ("type", "step", "loss", "lr", "tokens", "ppl_specialized", "S")
    return [{k: v for k, v in json.loads(x).items() if k in keep} for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- SIGKILL at named points -----------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["train:step-1", "train:checkpoint-2", "train:step-3", "train:step-6"])
def test_train_killed_anywhere_resumes_identical(fault, fault_cache, uninterrupted_run, fault_docs, tmp_path,
                                                  reliability):
    out, evals = tmp_path / "run", ("--eval-specialized", str(fault_docs["spec"]))
    killed = run_limited(cli(train_args(fault_cache, out, *evals, **EVAL_RUN)), MFT_FAULT=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    done = run_limited(cli(train_args(fault_cache, out, *evals, "--resume", **EVAL_RUN)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _metrics(out) == _metrics(uninterrupted_run)
    a, b = load_file(out / "final" / "model.safetensors"), load_file(uninterrupted_run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert not (out / "checkpoints").exists() and not leftovers(out)
    reliability("crash", f"SIGKILL `mft train` at `{fault}`", "`--resume` finishes with metrics and weights identical "
                "to an uninterrupted run; no checkpoints or temporary files left")


# -- SIGTERM --------------------------------------------------------------------------------------------
def test_sigterm_stops_training_at_a_step_and_resume_finishes_it(run_cache, finished_run, tmp_path, reliability):
    out = tmp_path / "run"
    proc = start_paused(train_args(run_cache, out, **SMALL_RUN), "train:step-3", tmp_path / "train.log")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 143
    finally:
        stop(proc)
    err = (tmp_path / "train.log").read_text()
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step-000003" / "trainer_state.json").exists()  # saved at the step it stopped
    assert not (out / LOCK_FILE).exists()
    assert main(train_args(run_cache, out, "--resume", **SMALL_RUN)) == 0
    assert same_weights(out, finished_run)
    reliability("crash", "SIGTERM to `mft train` mid-run", "stops after the step with a checkpoint of it, exit 143 "
                "with the resume hint; `--resume` ends with the weights of an uninterrupted run")


# -- disk full ------------------------------------------------------------------------------------------
def test_train_on_a_full_disk_fails_clearly_then_resumes(fault_cache, uninterrupted_run, fault_docs, tmp_path,
                                                         reliability):
    out, evals = tmp_path / "run", ("--eval-specialized", str(fault_docs["spec"]))
    size = (uninterrupted_run / "final" / "model.safetensors").stat().st_size
    full = run_limited(cli(train_args(fault_cache, out, *evals, **EVAL_RUN)),
                       limit_bytes=size // 2)  # fails writing the first weights
    assert full.returncode == 2, full.stderr[-2000:]
    assert "File too large" in full.stderr and "Traceback" not in full.stderr
    assert not (out / "summary.json").exists() and not list(out.glob("checkpoints/step-??????"))
    done = run_limited(cli(train_args(fault_cache, out, *evals, "--resume", **EVAL_RUN)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _metrics(out) == _metrics(uninterrupted_run)
    reliability("disk", "`mft train` cannot write its weights (file size limit)",
                "exit 2, no traceback, no complete checkpoint or summary; `--resume` then finishes identically")


# -- numerics -------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_or_is_skipped_and_counted(fault_cache, tmp_path, reliability):
    stop = run_limited(cli(train_args(fault_cache, tmp_path / "stop", **EVAL_RUN)), MFT_FAULT="train:nan-loss-3")
    assert stop.returncode == 2 and "non-finite loss (nan) at step 3 (global batch of cache rows [" in stop.stderr
    assert "the weights were not updated" in stop.stderr and "Traceback" not in stop.stderr
    skip = run_limited(cli(train_args(fault_cache, tmp_path / "skip", "--skip-nonfinite", "1", **EVAL_RUN)),
                       MFT_FAULT="train:nan-loss-3")
    assert skip.returncode == 0, skip.stderr[-2000:]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] == [3]
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped", False) for x in lines if x["type"] == "train"] == [False, False, True, False, False, False]
    weights = load_file(tmp_path / "skip" / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    reliability("numerics", "a NaN loss (and NaN gradients) at step 3", "stops with exit 2 naming the step and its rows, "
                "weights not updated; with `--skip-nonfinite 1` the step is skipped, counted in summary.json, "
                "and the weights stay finite")


def test_non_finite_final_weights_fail_the_run(run_cache, tmp_path, monkeypatch, capsys, reliability):
    import mft_cache.trainer.train as train_module

    real = train_module.train_step

    def poisoned(run, micro, step, state):  # the last step leaves an inf in the weights
        result = real(run, micro, step, state)
        if step + 1 == run.cfg.steps:
            with torch.no_grad():
                next(run.module.parameters()).view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(train_module, "train_step", poisoned)
    out = tmp_path / "run"
    assert main(train_args(run_cache, out, "--steps", "2", **SMALL_RUN)) == 2
    err = capsys.readouterr().err
    assert "not finite after step 2" in err and "Traceback" not in err
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    reliability("numerics", "an inf in the weights after the last step", "exit 2; final/ and summary.json not written")
