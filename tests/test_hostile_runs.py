"""A careless user, or an attacker, against the folders the tool writes: `--overwrite` on folders that are not
(provably) ours, `--out .`, two processes on one folder, stale locks, damaged checkpoints and metrics, paths
spelled two ways, non-finite options and weights, and SIGTERM. Every case records its row of RELIABILITY.md.

Real processes where the OS is part of the case (a lock held by another pid, a signal, a SIGKILL); the rest runs
in-process on a tiny llama, 6 steps of seq_len 32."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_texts, write_jsonl
from mft_cache.cli import main
from mft_cache.pipeline.cache import CacheConfig, build_cache

SEQ = 32
TIMEOUT = 300
MARKER = ".mft-run.json"  # the run folder's marker and the lock file: names users see, so spelled out here
LOCK_FILE = ".mft-lock"


# -- helpers ----------------------------------------------------------------------------------------
def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def cache_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["cache", "--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", str(SEQ),
            "--top-k", "8", "--shard-mb", "0.004", "--batch-size", "2", *extra]


def train_args(cache: Path, out: Path | str, *extra: str) -> list[str]:
    return ["train", "--cache", str(cache), "--out", str(out), "--steps", "6", "--batch-size", "2", "--lr", "3e-3",
            "--warmup-steps", "1", "--save-every", "2", "--log-every", "100", *extra]


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "mft_cache.cli", *args]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock file's: a stale one (a killed run's) is the tool's to take over and remove."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def start_paused(args: list[str], point: str, log: Path) -> subprocess.Popen:
    """A real `mft` process that stops at a fault point (MFT_FAULT=pause:...) and waits there to be signalled."""
    err = open(log, "w")
    proc = subprocess.Popen(cli(args), stdout=subprocess.DEVNULL, stderr=err, env=_env(MFT_FAULT=f"pause:{point}"))
    err.close()
    deadline = time.monotonic() + TIMEOUT
    while f"paused at {point}" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never paused at {point} (exit {proc.poll()}): {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=TIMEOUT)


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process (a real pid) holding the folder's lock with the library's own helper until killed."""
    code = ("import sys, time; from mft_cache.folder_lock import FolderLock; "
            "FolderLock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hostile-data") / "train.jsonl", make_texts(12, seed=51))


@pytest.fixture(scope="module")
def cache(llama, docs, tmp_path_factory) -> Path:
    """Built in-process with the arguments of `cache_args`: the reference a stopped and rerun build must equal."""
    out = tmp_path_factory.mktemp("hostile-cache") / "cache"
    build_cache(CacheConfig(model=str(llama), data=str(docs), out=str(out), seq_len=SEQ, top_k=8, shard_mb=0.004,
                            batch_size=2))
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) >= 4
    return out


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile-run") / "run"
    assert main(train_args(cache, out)) == 0
    return out


@pytest.fixture(scope="module")
def killed(cache, tmp_path_factory) -> Path:
    """A run SIGKILLed after step 5: complete checkpoints at steps 2 and 4. Tests damage copies of it."""
    out = tmp_path_factory.mktemp("hostile-killed") / "run"
    res = subprocess.run(cli(train_args(cache, out)), capture_output=True, text=True, env=_env(MFT_FAULT="train:step-5"),
                         timeout=TIMEOUT)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    return out


@pytest.fixture
def stopped(killed, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    return out


# -- run folders and --overwrite --------------------------------------------------------------------
def test_overwrite_refuses_a_run_folder_with_foreign_files(cache, uninterrupted, tmp_path, capsys, reliability):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "thesis.tex").write_text("precious")
    before = tree(out)
    assert main(train_args(cache, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "thesis.tex" in err and "nothing was removed" in err and "Traceback" not in err
    assert tree(out) == before
    reliability("hostile input", "`mft train --overwrite` on a run folder that also holds a file of the user's",
                "refused (exit 2) naming the file; nothing removed")


def test_overwrite_of_the_working_folder_is_refused(cache, tmp_path, monkeypatch, capsys, reliability):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.py").write_text("print('mine')\n")
    (work / "config.json").write_text('{"my": "project"}\n')  # what made `--out . --overwrite` wipe it
    before = tree(work)
    monkeypatch.chdir(work)
    assert main(train_args(cache, ".", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "nothing was removed" in err and "Traceback" not in err
    assert tree(work) == before and sorted(p.name for p in work.iterdir()) == ["config.json", "src"]
    reliability("hostile input", "`mft train --out . --overwrite` in a project folder holding a config.json",
                "refused (exit 2): no run marker; nothing removed, the folder kept")


def test_overwrite_of_a_marked_run_replaces_it(cache, uninterrupted, tmp_path, reliability):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    assert json.loads((out / MARKER).read_text())["kind"] == "train-run"
    (out / "final" / "stale.bin").write_bytes(b"from the old run")  # inside a folder of ours: goes with it
    assert main(train_args(cache, out, "--overwrite", "--steps", "2", "--save-every", "0")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not (out / "final" / "stale.bin").exists() and (out / MARKER).exists() and not (out / LOCK_FILE).exists()
    reliability("hostile input", "`mft train --overwrite` on a marked run folder holding only what a run writes",
                "replaced: the old run's files removed, the folder and its marker kept, the lock released")


def test_unmarked_old_run_is_refused_for_overwrite_but_resumes(cache, stopped, uninterrupted, capsys, reliability):
    (stopped / MARKER).unlink()  # a run folder written before markers existed
    before = tree(stopped)
    assert main(train_args(cache, stopped, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "Remove the folder by hand" in err and "--resume" in err and tree(stopped) == before
    assert main(train_args(cache, stopped, "--resume")) == 0
    assert (stopped / MARKER).exists() and same_weights(stopped, uninterrupted)
    reliability("hostile input", "`--overwrite` on a run folder made before run markers (config.json, no marker)",
                "refused (exit 2) telling to remove it by hand; `--resume` still finishes it and marks it")


def test_cache_overwrite_refuses_folders_not_shown_to_be_caches(llama, docs, cache, tmp_path, capsys, reliability):
    mixed = tmp_path / "mixed"
    shutil.copytree(cache, mixed)
    (mixed / "notes.txt").write_text("mine")
    lookalike = tmp_path / "lookalike"  # names a cache writer uses, but no manifest or progress file
    (lookalike / "shard-00000.zarr").mkdir(parents=True)
    (lookalike / "shard-00000.zarr" / "results.csv").write_text("a,b\n1,2\n")
    np_bytes = b"\x93NUMPY my own array"
    (lookalike / "documents.npy").write_bytes(np_bytes)
    for folder, named in ((mixed, "notes.txt"), (lookalike, "documents.npy")):
        before = tree(folder)
        for extra in ((), ("--overwrite",)):
            assert main(cache_args(llama, docs, folder, *extra)) == 2
            err = capsys.readouterr().err
            assert named in err and "nothing was removed" in err and "Traceback" not in err
            assert tree(folder) == before
    reliability("hostile input", "`mft cache [--overwrite]` on a cache plus a user's file, and on a folder of "
                "cache-like names without a manifest or progress file", "refused (exit 2) naming the files; nothing "
                "removed")


# -- one writer per folder --------------------------------------------------------------------------
def test_second_train_on_a_running_folder_is_refused_naming_the_pid(cache, stopped, tmp_path, capsys, reliability):
    first = start_paused(train_args(cache, stopped, "--resume"), "train:step-5", tmp_path / "first.log")
    try:
        before = (stopped / "metrics.jsonl").read_bytes()
        assert main(train_args(cache, stopped, "--resume")) == 2
        err = capsys.readouterr().err
        assert f"pid {first.pid}" in err and "in use" in err and "Traceback" not in err
        assert (stopped / "metrics.jsonl").read_bytes() == before
    finally:
        stop(first)
    reliability("hostile input", "two `mft train --resume` on one run folder at once",
                "the second exits 2 at once naming the first's pid; the first's files untouched")


def test_second_cache_on_a_locked_folder_is_refused_naming_the_pid(llama, docs, tmp_path, capsys, reliability):
    out = tmp_path / "cache"
    holder = hold_lock(out)
    try:
        assert main(cache_args(llama, docs, out)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        stop(holder)
    reliability("hostile input", "`mft cache` on a folder another process holds",
                "exit 2 at once naming the holder's pid; nothing written")


def test_stale_lock_of_a_dead_process_is_taken_over(llama, docs, cache, tmp_path, reliability):
    runs, caches = tmp_path / "run", tmp_path / "cache"
    for folder in (runs, caches):
        folder.mkdir()
        (folder / LOCK_FILE).write_text(f"{dead_pid()}\n")  # left by a run SIGKILLed right after locking
    assert main(train_args(cache, runs, "--steps", "2", "--save-every", "0")) == 0
    assert main(cache_args(llama, docs, caches)) == 0
    assert not (runs / LOCK_FILE).exists() and (runs / "summary.json").exists()
    assert tree(caches) == tree(cache)
    reliability("crash", "a lock file left by a dead process in `--out` (train and cache)",
                "taken over: both finish (the cache byte-identical), no lock file left")


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
def test_damaged_latest_checkpoint_falls_back_to_the_previous(case, damage, cache, stopped, uninterrupted, caplog,
                                                              reliability):
    damage(stopped / "checkpoints" / "step-000004")
    with caplog.at_level("WARNING"):
        assert main(train_args(cache, stopped, "--resume")) == 0
    assert "step-000004 is damaged" in caplog.text and "earlier checkpoint" in caplog.text
    assert "step-000002" in caplog.text
    assert same_weights(stopped, uninterrupted)
    reliability("corruption", f"{case} of the latest checkpoint", "`--resume` says so, resumes from the previous "
                "checkpoint and ends with the weights of an uninterrupted run")


def test_no_usable_checkpoint_is_a_clean_error(cache, stopped, capsys, reliability):
    _flip_weights(stopped / "checkpoints" / "step-000004")
    _flip_optimizer(stopped / "checkpoints" / "step-000002")
    assert main(train_args(cache, stopped, "--resume")) == 2
    err = capsys.readouterr().err
    assert "step-000004 cannot be loaded safely" in err and "step-000002" in err and "Traceback" not in err
    assert not (stopped / "summary.json").exists()
    reliability("corruption", "every checkpoint damaged", "`--resume` exits 2 naming them; nothing trained")


def test_checkpoints_without_recorded_hashes_still_resume(cache, stopped, uninterrupted, reliability):
    for state in (stopped / "checkpoints").glob("*/trainer_state.json"):  # as written before hashes were recorded
        raw = json.loads(state.read_text())
        raw.pop("files", None)
        state.write_text(json.dumps(raw))
    assert main(train_args(cache, stopped, "--resume")) == 0
    assert same_weights(stopped, uninterrupted)
    reliability("corruption", "checkpoints written before sizes and hashes were recorded",
                "`--resume` loads them unchecked and ends as an uninterrupted run")


@pytest.mark.parametrize("case", ["truncated", "deleted"])
def test_shortened_metrics_are_refused(case, cache, stopped, capsys, reliability):
    metrics = stopped / "metrics.jsonl"
    if case == "deleted":
        metrics.unlink()
    else:
        metrics.write_bytes(metrics.read_bytes()[:40])
    assert main(train_args(cache, stopped, "--resume")) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "truncated or removed" in err and "Traceback" not in err
    assert case == "deleted" and not metrics.exists() or b"\0" not in metrics.read_bytes()  # never padded
    reliability("corruption", f"metrics.jsonl {case} below the length the checkpoint recorded",
                "`--resume` refuses (exit 2) naming it; never padded with NUL bytes")


# -- paths ------------------------------------------------------------------------------------------
def test_a_moved_run_resumes_under_any_spelling_of_its_path(cache, killed, uninterrupted, tmp_path, monkeypatch,
                                                            reliability):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(killed, tmp_path / "x")  # started as an absolute path elsewhere; now ./x
    assert main(train_args(cache, "./x", "--resume")) == 0
    assert same_weights(tmp_path / "x", uninterrupted)
    assert main(train_args(cache, "x", "--resume")) == 0  # finished: the same run under another spelling
    reliability("mismatch", "`--resume` of a moved run folder, named `./x` and `x`",
                "the same run: resumes and finishes identically; `out` is not part of the comparison")


# -- values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, flag, value", [
    ("train", "--lr", "inf"), ("train", "--lr", "nan"), ("train", "--max-grad-norm", "-1"),
    ("train", "--max-grad-norm", "inf"), ("train", "--weight-decay", "-0.1"), ("train", "--lora-alpha", "inf"),
    ("cache", "--shard-mb", "inf"),
])
def test_non_finite_or_out_of_range_options_are_refused(stage, flag, value, llama, docs, cache, tmp_path, capsys,
                                                        reliability):
    out = tmp_path / "out"
    args = train_args(cache, out) if stage == "train" else cache_args(llama, docs, out)
    assert main([*args, flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and not out.exists()
    reliability("hostile input", f"`mft {stage} {flag} {value}`", f"refused (exit 2) naming `{flag}`; nothing written")


def test_non_finite_final_weights_fail_the_run(cache, tmp_path, monkeypatch, capsys, reliability):
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
    assert main(train_args(cache, out, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert "not finite after step 2" in err and "Traceback" not in err
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    reliability("numerics", "an inf in the weights after the last step", "exit 2; final/ and summary.json not written")


# -- signals ----------------------------------------------------------------------------------------
def test_sigterm_stops_training_at_a_step_and_resume_finishes_it(cache, uninterrupted, tmp_path, reliability):
    out = tmp_path / "run"
    proc = start_paused(train_args(cache, out), "train:step-3", tmp_path / "train.log")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 143
    finally:
        stop(proc)
    err = (tmp_path / "train.log").read_text()
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step-000003" / "trainer_state.json").exists()  # saved at the step it stopped
    assert not (out / LOCK_FILE).exists()
    assert main(train_args(cache, out, "--resume")) == 0
    assert same_weights(out, uninterrupted)
    reliability("crash", "SIGTERM to `mft train` mid-run", "stops after the step with a checkpoint of it, exit 143 "
                "with the resume hint; `--resume` ends with the weights of an uninterrupted run")


def test_sigterm_stops_a_cache_build_and_the_rerun_completes_it(llama, docs, cache, tmp_path, reliability):
    out = tmp_path / "cache"
    args = cache_args(llama, docs, out)
    proc = start_paused(args, "cache:shard-1", tmp_path / "cache.log")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 143
    finally:
        stop(proc)
    err = (tmp_path / "cache.log").read_text()
    assert "terminated (SIGTERM)" in err and "run the same command again to resume" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists() and not (out / LOCK_FILE).exists()
    assert main(args) == 0
    assert tree(out) == tree(cache)
    reliability("crash", "SIGTERM to `mft cache` mid-build", "exit 143 with the resume hint, no manifest; the same "
                "command completes a byte-identical cache")
