"""--out, the folder each command writes: `--overwrite` removes only what is provably ours (not a folder of the user's,
not the working folder, not a folder that only looks like a cache), one writer per folder (a lock naming the holder's
pid), a stale lock of a dead process taken over, and a read-only folder. Nothing of the user's is ever removed.

Real processes where the OS is part of the case (a lock held by another pid); the rest runs in-process on a tiny
llama, 6 steps of seq_len 32 (SMALL_RUN on run_cache, conftest.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import (EVAL_RUN, LOCK_FILE, MARKER, SMALL_CACHE, SMALL_RUN, cache_args, cli, dead_pid, hold_lock,
                     mount_tmpfs, run_limited, same_weights, snapshot, start_paused, stop, train_args)
from mft_cache.cli import main


# -- --overwrite -------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_run_folder_with_foreign_files(run_cache, finished_run, tmp_path, capsys, reliability):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "thesis.tex").write_text("precious")
    before = snapshot(out, LOCK_FILE)
    assert main(train_args(run_cache, out, "--overwrite", **SMALL_RUN)) == 2
    err = capsys.readouterr().err
    assert "thesis.tex" in err and "nothing was removed" in err and "Traceback" not in err
    assert snapshot(out, LOCK_FILE) == before
    reliability("hostile input", "`mft train --overwrite` on a run folder that also holds a file of the user's",
                "refused (exit 2) naming the file; nothing removed")


def test_overwrite_of_the_working_folder_is_refused(run_cache, tmp_path, monkeypatch, capsys, reliability):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.py").write_text("print('mine')\n")
    (work / "config.json").write_text('{"my": "project"}\n')  # what made `--out . --overwrite` wipe it
    before = snapshot(work, LOCK_FILE)
    monkeypatch.chdir(work)
    assert main(train_args(run_cache, ".", "--overwrite", **SMALL_RUN)) == 2
    err = capsys.readouterr().err
    assert "nothing was removed" in err and "Traceback" not in err
    assert snapshot(work, LOCK_FILE) == before and sorted(p.name for p in work.iterdir()) == ["config.json", "src"]
    reliability("hostile input", "`mft train --out . --overwrite` in a project folder holding a config.json",
                "refused (exit 2): no run marker; nothing removed, the folder kept")


def test_overwrite_of_a_marked_run_replaces_it(run_cache, finished_run, tmp_path, reliability):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert json.loads((out / MARKER).read_text())["kind"] == "train-run"
    (out / "final" / "stale.bin").write_bytes(b"from the old run")  # inside a folder of ours: goes with it
    assert main(train_args(run_cache, out, "--overwrite", "--steps", "2", "--save-every", "0", **SMALL_RUN)) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not (out / "final" / "stale.bin").exists() and (out / MARKER).exists() and not (out / LOCK_FILE).exists()
    reliability("hostile input", "`mft train --overwrite` on a marked run folder holding only what a run writes",
                "replaced: the old run's files removed, the folder and its marker kept, the lock released")


def test_unmarked_old_run_is_refused_for_overwrite_but_resumes(run_cache, stopped_run, finished_run, capsys,
                                                               reliability):
    (stopped_run / MARKER).unlink()  # a run folder written before markers existed
    before = snapshot(stopped_run, LOCK_FILE)
    assert main(train_args(run_cache, stopped_run, "--overwrite", **SMALL_RUN)) == 2
    err = capsys.readouterr().err
    assert "Remove the folder by hand" in err and "--resume" in err and snapshot(stopped_run, LOCK_FILE) == before
    assert main(train_args(run_cache, stopped_run, "--resume", **SMALL_RUN)) == 0
    assert (stopped_run / MARKER).exists() and same_weights(stopped_run, finished_run)
    reliability("hostile input", "`--overwrite` on a run folder made before run markers (config.json, no marker)",
                "refused (exit 2) telling to remove it by hand; `--resume` still finishes it and marks it")


def test_cache_overwrite_refuses_folders_not_shown_to_be_caches(llama, run_docs, run_cache, tmp_path, capsys,
                                                                reliability):
    mixed = tmp_path / "mixed"
    shutil.copytree(run_cache, mixed)
    (mixed / "notes.txt").write_text("mine")
    lookalike = tmp_path / "lookalike"  # names a cache writer uses, but no manifest or progress file
    (lookalike / "shard-00000.zarr").mkdir(parents=True)
    (lookalike / "shard-00000.zarr" / "results.csv").write_text("a,b\n1,2\n")
    np_bytes = b"\x93NUMPY my own array"
    (lookalike / "documents.npy").write_bytes(np_bytes)
    for folder, named in ((mixed, "notes.txt"), (lookalike, "documents.npy")):
        before = snapshot(folder, LOCK_FILE)
        for extra in ((), ("--overwrite",)):
            assert main(cache_args(llama, run_docs, folder, *extra, **SMALL_CACHE)) == 2
            err = capsys.readouterr().err
            assert named in err and "nothing was removed" in err and "Traceback" not in err
            assert snapshot(folder, LOCK_FILE) == before
    reliability("hostile input", "`mft cache [--overwrite]` on a cache plus a user's file, and on a folder of "
                "cache-like names without a manifest or progress file", "refused (exit 2) naming the files; nothing "
                "removed")


def test_out_folder_with_foreign_files_is_refused(llama, docs_jsonl, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        code = main(["cache", "--model", str(llama), "--data", str(docs_jsonl), "--out", str(tmp_path / "out"), *extra])
        assert code == 2
        assert "not part of an mft-cache" in capsys.readouterr().err
        assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["thesis.tex"]


# -- one writer per folder --------------------------------------------------------------------------------
def test_second_train_on_a_running_folder_is_refused_naming_the_pid(run_cache, stopped_run, tmp_path, capsys,
                                                                    reliability):
    first = start_paused(train_args(run_cache, stopped_run, "--resume", **SMALL_RUN), "train:step-5",
                         tmp_path / "first.log")
    try:
        before = (stopped_run / "metrics.jsonl").read_bytes()
        assert main(train_args(run_cache, stopped_run, "--resume", **SMALL_RUN)) == 2
        err = capsys.readouterr().err
        assert f"pid {first.pid}" in err and "in use" in err and "Traceback" not in err
        assert (stopped_run / "metrics.jsonl").read_bytes() == before
    finally:
        stop(first)
    reliability("hostile input", "two `mft train --resume` on one run folder at once",
                "the second exits 2 at once naming the first's pid; the first's files untouched")


def test_second_cache_on_a_locked_folder_is_refused_naming_the_pid(llama, run_docs, tmp_path, capsys, reliability):
    out = tmp_path / "cache"
    holder = hold_lock(out)
    try:
        assert main(cache_args(llama, run_docs, out, **SMALL_CACHE)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        stop(holder)
    reliability("hostile input", "`mft cache` on a folder another process holds",
                "exit 2 at once naming the holder's pid; nothing written")


def test_stale_lock_of_a_dead_process_is_taken_over(llama, run_docs, run_cache, tmp_path, reliability):
    runs, caches = tmp_path / "run", tmp_path / "cache"
    for folder in (runs, caches):
        folder.mkdir()
        (folder / LOCK_FILE).write_text(f"{dead_pid()}\n")  # left by a run SIGKILLed right after locking
    assert main(train_args(run_cache, runs, "--steps", "2", "--save-every", "0", **SMALL_RUN)) == 0
    assert main(cache_args(llama, run_docs, caches, **SMALL_CACHE)) == 0
    assert not (runs / LOCK_FILE).exists() and (runs / "summary.json").exists()
    assert snapshot(caches, LOCK_FILE) == snapshot(run_cache, LOCK_FILE)
    reliability("crash", "a lock file left by a dead process in `--out` (train and cache)",
                "taken over: both finish (the cache byte-identical), no lock file left")


# -- read-only ------------------------------------------------------------------------------------------------
def test_read_only_folder_fails_clearly(llama, fault_docs, fault_cache, tmp_path, reliability):
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
    elif not mount_tmpfs(ro, "size=1m,ro"):
        pytest.skip("root without CAP_SYS_ADMIN: no read-only folder can be made here")
    try:
        for cmd in (cli(cache_args(llama, fault_docs["train"], ro / "cache", **SMALL_CACHE, format="zarr")),
                    cli(train_args(fault_cache, ro / "run", **EVAL_RUN))):
            res = run_limited(cmd)
            assert res.returncode == 2, res.stderr[-2000:]
            assert ("Read-only file system" in res.stderr or "Permission denied" in res.stderr), res.stderr[-1000:]
            assert "Traceback" not in res.stderr and not list(ro.iterdir())
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
    reliability("disk", "`--out` in a read-only folder (cache and train)", "exit 2 naming the path; nothing written")


# -- mft sweep's --out -------------------------------------------------------------------------------------------
def _sweep(cache, out) -> list[str]:
    return ["sweep", "--cache", str(cache), "--out", str(out), "--taus", "0.25", "--steps", "1", "--batch-size", "2"]


@pytest.mark.parametrize("files", [{"notes.txt": "mine"}, {"sweep.md": "my own table", "sweep.csv": "a,b\n"}],
                         ids=["foreign-files", "files-named-like-a-sweeps"])
def test_sweep_refuses_a_folder_it_did_not_write(run_cache, tmp_path, capsys, files, reliability):
    out = tmp_path / "sweep"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    before = snapshot(out)
    assert main(_sweep(run_cache, out)) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "nothing was written" in err and "Traceback" not in err
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(files)  # no run, no marker
    reliability("hostile input", f"`mft sweep --out` on a folder holding {', '.join(files)} it did not write",
                "refused (exit 2) before any run; the files untouched, nothing added")


def test_sweep_in_the_working_folder_is_refused(run_cache, tmp_path, monkeypatch, capsys, reliability):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.py").write_text("print('mine')\n")
    before = snapshot(work)
    monkeypatch.chdir(work)
    assert main(_sweep(run_cache, ".")) == 2
    assert "src" in capsys.readouterr().err and snapshot(work) == before
    reliability("hostile input", "`mft sweep --out .` in a project folder", "refused (exit 2); nothing written")


def test_sweep_refuses_a_folder_another_process_holds(run_cache, tmp_path, capsys, reliability):
    out = tmp_path / "sweep"
    holder = hold_lock(out)
    try:
        assert main(_sweep(run_cache, out)) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        stop(holder)
    reliability("concurrency", "a second `mft sweep` on a folder another process holds",
                "refused (exit 2) naming the holder's pid; nothing written")


def test_a_sweeps_own_folder_is_claimed_again_and_an_older_sweep_is_marked(tmp_path):
    from mft_cache.files import claim_folder, marker_name
    from mft_cache.trainer.sweep import is_sweep_name, written_by_a_sweep

    old = tmp_path / "old"  # a sweep written before sweeps were marked: its sweep.json and a run folder
    (old / "mft-tau0.25" / "seed0").mkdir(parents=True)
    (old / "sweep.json").write_text(json.dumps({"runs": [], "configs": []}))
    claim_folder(old, "sweep", is_sweep_name, written_by_a_sweep).release()
    assert (old / marker_name("sweep")).is_file()
    claim_folder(old, "sweep", is_sweep_name, written_by_a_sweep).release()  # marked: claimed again
    (old / marker_name("sweep")).write_text('{"tool": "mft-cache", "kind": "train-run"}')
    with pytest.raises(ValueError, match="not the marker mft sweep writes"):
        claim_folder(old, "sweep", is_sweep_name, written_by_a_sweep)
    forged = tmp_path / "forged"  # a sweep.json that is no sweep's
    forged.mkdir()
    (forged / "sweep.json").write_text('"not a sweep"')
    with pytest.raises(ValueError, match="nothing that shows it wrote them"):
        claim_folder(forged, "sweep", is_sweep_name, written_by_a_sweep)
    assert sorted(p.name for p in forged.iterdir()) == ["sweep.json"] and not (tmp_path / "new").exists()
    claim_folder(tmp_path / "new", "sweep", is_sweep_name, written_by_a_sweep).release()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [marker_name("sweep")]


def test_study_refuses_a_folder_it_did_not_write(tmp_path, capsys, reliability):
    out = tmp_path / "study"
    (out / "runs").mkdir(parents=True)
    (out / "results.xlsx").write_bytes(b"mine")
    before = snapshot(out)
    assert main(["study", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"),
                 "--out", str(out), "--steps", "1"]) == 2  # refused before the teacher or the data are touched
    err = capsys.readouterr().err
    assert "results.xlsx" in err and "nothing was written" in err and "Traceback" not in err
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["results.xlsx", "runs"]
    from mft_cache.files import claim_folder, marker_name
    from mft_cache.study import is_study_name, written_by_a_study

    (out / "results.xlsx").unlink()  # only a study's names now, but nothing shows a study wrote them
    with pytest.raises(ValueError, match="nothing that shows it wrote them"):
        claim_folder(out, "study", is_study_name, written_by_a_study)
    (out / "study.json").write_text(json.dumps({"runs": {}, "parts": {}}))  # what an older version's study leaves
    claim_folder(out, "study", is_study_name, written_by_a_study).release()
    assert (out / marker_name("study")).is_file()
    reliability("hostile input", "`mft study --out` on a folder holding a file it did not write",
                "refused (exit 2) before the teacher pass; nothing written")
