"""`mft train --resume` on a run folder whose resume state was damaged or replaced: a checkpoint with a flipped bit,
a broken header or a bad trainer_state.json (the previous checkpoint is used), every checkpoint damaged, files
written before hashes were recorded, metrics shortened, a pickle that would run a command, the folder moved.

Each case damages a copy of one run killed after step 5 (killed_run, conftest.py: checkpoints at steps 2 and 4)
and compares with an uninterrupted one (finished_run)."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from helpers import EVAL_RUN, SMALL_RUN, cli, run_limited, same_weights, train_args
from mft_cache.cli import main


# -- damaged checkpoints and metrics ----------------------------------------------------------------
def _flip(path: Path, where: int) -> None:
    b = bytearray(path.read_bytes())
    b[where] ^= 0x01
    path.write_bytes(bytes(b))


def _flip_weights(ckpt: Path) -> None:
    _flip(ckpt / "model.safetensors", -64)  # tensor data, not the header


def _flip_optimizer(ckpt: Path) -> None:
    f = ckpt / "optimizer.bin"
    _flip(f, f.stat().st_size // 2)


def _break_header(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes((2**40).to_bytes(8, "little") + f.read_bytes()[8:])  # header length beyond the file


def _not_json(ckpt: Path) -> None:
    (ckpt / "trainer_state.json").write_text("{\"step\": 4, ")


def _ill_typed(ckpt: Path) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["step"] = "4"
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("case, damage", [
    ("a flipped bit in the weights", _flip_weights),
    ("a flipped bit in the optimizer state", _flip_optimizer),
    ("a damaged safetensors header", _break_header),
    ("trainer_state.json that is not JSON", _not_json),
    ("trainer_state.json with a value of the wrong type", _ill_typed),
])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(case, damage, run_cache, stopped_run, finished_run,
                                                              caplog, reliability):
    damage(stopped_run / "checkpoints" / "step-000004")
    with caplog.at_level("WARNING"):
        assert main(train_args(run_cache, stopped_run, "--resume", **SMALL_RUN)) == 0
    assert "step-000004 is damaged" in caplog.text and "earlier checkpoint" in caplog.text
    assert "step-000002" in caplog.text
    assert same_weights(stopped_run, finished_run)
    reliability("corruption", f"{case} of the latest checkpoint", "`--resume` says so, resumes from the previous "
                "checkpoint and ends with the weights of an uninterrupted run")


def test_no_usable_checkpoint_is_a_clean_error(run_cache, stopped_run, capsys, reliability):
    _flip_weights(stopped_run / "checkpoints" / "step-000004")
    _flip_optimizer(stopped_run / "checkpoints" / "step-000002")
    assert main(train_args(run_cache, stopped_run, "--resume", **SMALL_RUN)) == 2
    err = capsys.readouterr().err
    assert "step-000004 cannot be loaded safely" in err and "step-000002" in err and "Traceback" not in err
    assert not (stopped_run / "summary.json").exists()
    reliability("corruption", "every checkpoint damaged", "`--resume` exits 2 naming them; nothing trained")


def test_checkpoints_without_recorded_hashes_still_resume(run_cache, stopped_run, finished_run, reliability):
    for state in (stopped_run / "checkpoints").glob("*/trainer_state.json"):  # as written before hashes were recorded
        raw = json.loads(state.read_text())
        raw.pop("files", None)
        state.write_text(json.dumps(raw))
    assert main(train_args(run_cache, stopped_run, "--resume", **SMALL_RUN)) == 0
    assert same_weights(stopped_run, finished_run)
    reliability("corruption", "checkpoints written before sizes and hashes were recorded",
                "`--resume` loads them unchecked and ends as an uninterrupted run")


@pytest.mark.parametrize("case", ["truncated", "deleted"])
def test_shortened_metrics_are_refused(case, run_cache, stopped_run, capsys, reliability):
    metrics = stopped_run / "metrics.jsonl"
    if case == "deleted":
        metrics.unlink()
    else:
        metrics.write_bytes(metrics.read_bytes()[:40])
    assert main(train_args(run_cache, stopped_run, "--resume", **SMALL_RUN)) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "truncated or removed" in err and "Traceback" not in err
    assert case == "deleted" and not metrics.exists() or b"\0" not in metrics.read_bytes()  # never padded
    reliability("corruption", f"metrics.jsonl {case} below the length the checkpoint recorded",
                "`--resume` refuses (exit 2) naming it; never padded with NUL bytes")


# -- code in a checkpoint ------------------------------------------------------------------------------
def test_malicious_pickle_in_a_checkpoint_never_runs(fault_cache, tmp_path, reliability):
    out = tmp_path / "run"
    killed = run_limited(cli(train_args(fault_cache, out, **EVAL_RUN)), MFT_FAULT="train:step-3")
    assert killed.returncode == -signal.SIGKILL
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    target = out / "checkpoints" / "step-000002" / "optimizer.bin"
    assert target.exists()
    target.write_bytes(pickle.dumps(Evil()))
    res = run_limited(cli(train_args(fault_cache, out, "--resume", **EVAL_RUN)))
    assert res.returncode == 2 and "cannot be loaded safely" in res.stderr, res.stderr[-2000:]
    assert not marker.exists()
    reliability("security", "a checkpoint file replaced by a pickle that runs a shell command",
                "refused by torch.load(weights_only=True): exit 2, the command never runs")


# -- paths ------------------------------------------------------------------------------------------
def test_a_moved_run_resumes_under_any_spelling_of_its_path(run_cache, killed_run, finished_run, tmp_path, monkeypatch,
                                                            reliability):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(killed_run, tmp_path / "x")  # started as an absolute path elsewhere; now ./x
    assert main(train_args(run_cache, "./x", "--resume", **SMALL_RUN)) == 0
    assert same_weights(tmp_path / "x", finished_run)
    assert main(train_args(run_cache, "x", "--resume", **SMALL_RUN)) == 0  # finished: the same run under another spelling
    reliability("mismatch", "`--resume` of a moved run folder, named `./x` and `x`",
                "the same run: resumes and finishes identically; `out` is not part of the comparison")
