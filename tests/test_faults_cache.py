"""`mft cache` stopped mid-build, then run again with the same command: SIGKILL at named points (mft_cache/faults.py:
in a shard write, after a shard, while ingesting the documents), SIGKILL or Ctrl-C (SIGINT) at a random moment,
SIGTERM, a full disk. The rerun gives the same cache, byte for byte, as an uninterrupted build, computes only what is
missing, and leaves no temporary file; the stopped folder never looks finished.

Each build runs the real CLI in a subprocess (tests/helpers.py: cli, subprocess_env)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import make_texts, write_jsonl
from helpers import (LOCK_FILE, SMALL_CACHE, cache_args, cli, leftovers, mount_tmpfs, run_limited, snapshot,
                     start_paused, stop, subprocess_env)
from mft_cache.cli import main
from mft_cache.storage import ManifestError, open_cache

TIMEOUT = 300


# -- SIGKILL at named points -----------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["cache:shard-0", "cache:shard-write", "cache:shard-3"])
def test_cache_killed_anywhere_resumes_byte_identical(fault, llama, fault_docs, fault_cache, tmp_path, reliability):
    out = tmp_path / "cache"
    cmd = cli(cache_args(llama, fault_docs["train"], out, **SMALL_CACHE, format="zarr"))
    killed = run_limited(cmd, MFT_FAULT=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    done = run_limited(cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert snapshot(out) == snapshot(fault_cache) and not leftovers(out)
    reliability("crash", f"SIGKILL `mft cache` at `{fault}`", "no manifest; the same command resumes; cache byte-identical "
                "to an uninterrupted build; no temporary files left")


# -- SIGKILL while ingesting the documents, or in the teacher's pass after it ----------------------
INGEST_CACHE = dict(seq_len=48, top_k=4, shard_mb=0.01, batch_size=2)


@pytest.fixture(scope="module")
def killable(tmp_path_factory, llama):
    """A corpus whose ingestion writes several pieces of rows (so it can be killed in the middle), and the cache an
    uninterrupted build makes of it."""
    root = tmp_path_factory.mktemp("killed")
    data = write_jsonl(root / "docs.jsonl", make_texts(600, seed=9, min_words=4, max_words=12))  # 3 batches of 256
    r = run_limited(cli(cache_args(llama, data, root / "reference", **INGEST_CACHE)))
    assert r.returncode == 0, r.stderr[-2000:]
    return data, snapshot(root / "reference")


def test_a_build_killed_while_ingesting_resumes_to_the_same_cache(killable, llama, tmp_path, reliability):
    data, reference = killable
    out = tmp_path / "cache"
    r = run_limited(cli(cache_args(llama, data, out, **INGEST_CACHE)), MFT_FAULT="cache:ingest")
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    assert json.loads((out / ".ingest.json").read_text())["complete"] is False
    r = run_limited(cli(cache_args(llama, data, out, **INGEST_CACHE)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing the ingested rows" not in r.stderr  # an unfinished ingestion starts again from the start
    assert snapshot(out) == reference
    reliability("crash", "SIGKILL to `mft cache` while it ingests (reads, tokenizes, packs) the documents, then rerun",
                "the rerun ingests again and writes the cache byte-identical to an uninterrupted build")


def test_a_build_killed_in_the_teachers_pass_reuses_its_ingested_rows(killable, llama, tmp_path, reliability):
    data, reference = killable
    out = tmp_path / "cache"
    r = run_limited(cli(cache_args(llama, data, out, **INGEST_CACHE)), MFT_FAULT="cache:shard-1")
    assert r.returncode == -9, r.stderr[-2000:]
    assert json.loads((out / ".ingest.json").read_text())["complete"] is True
    r = run_limited(cli(cache_args(llama, data, out, **INGEST_CACHE)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing the ingested rows" in r.stderr and "resuming" in r.stderr
    assert snapshot(out) == reference
    reliability("crash", "SIGKILL to `mft cache` in the teacher's pass, then rerun",
                "the rerun reuses the ingested rows once the source, read again (not tokenized), gives their recorded "
                "fingerprint, and finishes the identical cache")


def test_a_source_changed_before_the_rerun_is_read_again_and_refused(llama, tmp_path, reliability):
    data = write_jsonl(tmp_path / "docs.jsonl", make_texts(100, seed=10))
    out = tmp_path / "cache"
    r = run_limited(cli(cache_args(llama, data, out, **INGEST_CACHE)), MFT_FAULT="cache:shard-1")
    assert r.returncode == -9, r.stderr[-2000:]
    with open(data, "a") as f:
        f.write(json.dumps({"text": "One more document."}) + "\n")
    r = run_limited(cli(cache_args(llama, data, out, **INGEST_CACHE)))
    assert r.returncode == 2 and "reusing the ingested rows" not in r.stderr
    assert "unfinished cache built with another configuration" in r.stderr and "data_fingerprint" in r.stderr
    assert not (out / "manifest.json").exists()
    reliability("mismatch", "the documents edited between a killed `mft cache` and its rerun",
                "read again (their size changed), the new fingerprint refused with exit 2 naming data_fingerprint")


def test_a_source_rewritten_with_the_same_size_and_time_is_not_trusted(llama, tmp_path, reliability):
    """Sizes and modification times are only a hint: other text of the same size, its time set back, is caught by the
    content fingerprint, so the rerun never finishes a cache of the old text."""
    data = write_jsonl(tmp_path / "docs.jsonl", make_texts(100, seed=10))
    out = tmp_path / "cache"
    r = run_limited(cli(cache_args(llama, data, out, **INGEST_CACHE)), MFT_FAULT="cache:shard-1")
    assert r.returncode == -9, r.stderr[-2000:]
    before, stat = data.read_bytes(), data.stat()
    after = before.replace(b"a", b"e")  # other words, the same bytes count
    assert after != before and len(after) == len(before)
    data.write_bytes(after)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    r = run_limited(cli(cache_args(llama, data, out, **INGEST_CACHE)))
    assert "reusing the ingested rows" not in r.stderr and "the source changed" in r.stderr
    assert r.returncode == 2 and "data_fingerprint" in r.stderr and not (out / "manifest.json").exists()
    reliability("mismatch", "the documents replaced by other text of the same size and modification time between a "
                "killed `mft cache` and its rerun", "the rerun reads the source again, finds another content "
                "fingerprint, does not reuse the ingested rows and refuses the unfinished cache naming data_fingerprint")


# -- SIGKILL or SIGINT at a random moment -------------------------------------------------------------
NUM_DOCS = 40  # ~220 sequences of 48 tokens -> ~45 shards of 5 rows at --shard-mb 0.01; a few seconds on CPU
BIG_CACHE = dict(seq_len=48, top_k=8, shard_mb=0.01, batch_size=2)
MIN_SHARDS_BEFORE_SIGNAL = 2
SHARD = re.compile(r"^shard-\d{5}\.(zarr|arrow)$")
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "docs.jsonl", make_texts(NUM_DOCS, seed=7))


def _run(cmd: list[str], logs: Path) -> tuple[int, str]:
    """Run to completion; stderr (logging and tqdm) goes to a file, never to an undrained pipe."""
    err = logs.with_suffix(".stderr")
    with open(logs.with_suffix(".stdout"), "wb") as so, open(err, "wb") as se:
        rc = subprocess.run(cmd, stdout=so, stderr=se, env=subprocess_env(), timeout=RUN_TIMEOUT_S).returncode
    return rc, err.read_text(errors="replace")


def _shards(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if SHARD.match(n)) if folder.is_dir() else []


def _stamps(folder: Path, name: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of the shard `name` and of every file inside it (a Zarr shard is a folder)."""
    root = folder / name
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


@pytest.fixture(scope="module")
def reference_builds(llama, big_jsonl, tmp_path_factory):
    """An uninterrupted run per format, built once for the module. Both start at once in the background
    (one thread each), so they overlap with the interrupted runs of the first test."""
    procs: dict[str, tuple[subprocess.Popen, Path, Path, list]] = {}
    for fmt in ("zarr", "arrow"):
        out = tmp_path_factory.mktemp(f"reference-{fmt}") / "cache"
        so, se = open(out.parent / "run.stdout", "wb"), open(out.parent / "run.stderr", "wb")
        cmd = cli(cache_args(llama, big_jsonl, out, **BIG_CACHE, format=fmt))
        procs[fmt] = (subprocess.Popen(cmd, stdout=so, stderr=se, env=subprocess_env()),
                      out, out.parent / "run.stderr", [so, se])

    def get(fmt: str) -> Path:
        proc, out, err_path, _ = procs[fmt]
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
        err = err_path.read_text(errors="replace")
        assert rc == 0, err[-3000:]
        assert (out / "manifest.json").is_file() and "resuming" not in err
        return out

    yield get
    for proc, _, _, handles in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for h in handles:
            h.close()


def _start_and_interrupt(cmd: list[str], out: Path, sig: int, logs: Path, num_shards: int) -> tuple[int, str, set[str]]:
    """Start the build, send `sig` once >= 2 shards are complete and before the manifest exists.
    Returns (exit code, stderr, the folder's names when the signal was sent)."""
    err_path = logs.with_suffix(".stderr")
    with open(logs.with_suffix(".stdout"), "wb") as so, open(err_path, "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=subprocess_env())
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the build exited (rc {proc.returncode}) before it could be interrupted; "
                                f"make the data bigger\n{err_path.read_text(errors='replace')[-3000:]}")
                assert time.monotonic() < deadline, "no shard written in time"
                names = set(os.listdir(out)) if out.is_dir() else set()
                if sum(bool(SHARD.match(n)) for n in names) >= MIN_SHARDS_BEFORE_SIGNAL:
                    proc.send_signal(sig)
                    break
                time.sleep(0.003)
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # the signal really came mid-run: no manifest yet, and shards still to be written
    assert "manifest.json" not in names, "the run had finished when the signal was sent; make the data bigger"
    assert sum(bool(SHARD.match(n)) for n in names) < num_shards
    return rc, err_path.read_text(errors="replace"), names


# Each case costs two CLI start-ups (~4 s each on CPU, mostly imports and model loading), so the
# format is varied on Ctrl-C only; the writer's code path is the same for both formats.
@pytest.mark.parametrize("sig, fmt", [
    pytest.param(signal.SIGKILL, "zarr", id="sigkill-zarr", marks=pytest.mark.slow),  # ~20 s; killed anywhere covers SIGKILL
    pytest.param(signal.SIGINT, "zarr", id="sigint-zarr"),
    pytest.param(signal.SIGINT, "arrow", id="sigint-arrow"),
])
def test_interrupted_build_resumes_to_identical_cache(sig, fmt, llama, big_jsonl, reference_builds, tmp_path,
                                                      reliability):
    ref = reference_builds(fmt)
    ref_files = snapshot(ref)
    num_shards = len(_shards(ref))
    assert num_shards >= 20, "too few shards for a meaningful interruption"
    assert not leftovers(ref), f"the uninterrupted run left hidden files: {leftovers(ref)[:5]}"

    out = tmp_path / "cache"
    cmd = cli(cache_args(llama, big_jsonl, out, **BIG_CACHE, format=fmt))
    rc, err, _ = _start_and_interrupt(cmd, out, sig, tmp_path / "interrupted", num_shards)

    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL, err[-3000:]
    else:
        assert rc == 130, err[-3000:]
        assert "interrupted; run the same command again to resume" in err
        assert "Traceback" not in err, err[-3000:]

    # the interrupted folder does not look like a finished cache
    assert not (out / "manifest.json").exists()
    with pytest.raises(ManifestError):
        open_cache(out)
    written = _shards(out)
    assert MIN_SHARDS_BEFORE_SIGNAL <= len(written) < num_shards
    assert set(written) <= set(_shards(ref))
    stamps_before = {k: v for n in written for k, v in _stamps(out, n).items()}

    # the same command again: resumes, computes only the missing shards
    t_resume = time.time_ns()
    rc, err = _run(cmd, tmp_path / "resumed")
    assert rc == 0, err[-3000:]
    assert f"resuming: {len(written)} of {num_shards} shards already written" in err, err[-3000:]
    stamps_after = {k: v for n in written for k, v in _stamps(out, n).items()}
    assert stamps_after == stamps_before, "shards written before the interruption were rewritten"
    margin_ns = 50_000_000  # coarse kernel file timestamps may trail time.time_ns() by a tick
    for n in _shards(out):
        if n not in written:
            assert (out / n).stat().st_mtime_ns >= t_resume - margin_ns, f"{n} was not written by the resumed run"

    # byte for byte the uninterrupted cache, and nothing hidden or temporary left behind
    assert not leftovers(out), f"temporary/hidden files left: {leftovers(out)[:5]}"
    got = snapshot(out)
    assert sorted(got) == sorted(ref_files)
    differing = [k for k in ref_files if got[k] != ref_files[k]]
    assert not differing, f"files differ from the uninterrupted run: {differing[:5]}"
    cache = open_cache(out, verify="full")
    assert len(cache.shards) == num_shards
    reliability("crash", f"{signal.Signals(sig).name} to `mft cache` ({fmt}) at a random moment mid-build",
                "no manifest (not openable); the rerun computes only the missing shards and ends byte-identical"
                + (", exit 130 with a resume hint" if sig == signal.SIGINT else ""))


# -- SIGTERM --------------------------------------------------------------------------------------------
def test_sigterm_stops_a_cache_build_and_the_rerun_completes_it(llama, run_docs, run_cache, tmp_path, reliability):
    out = tmp_path / "cache"
    args = cache_args(llama, run_docs, out, **SMALL_CACHE)
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
    assert snapshot(out, LOCK_FILE) == snapshot(run_cache, LOCK_FILE)
    reliability("crash", "SIGTERM to `mft cache` mid-build", "exit 143 with the resume hint, no manifest; the same "
                "command completes a byte-identical cache")


# -- disk full ------------------------------------------------------------------------------------------
def test_cache_on_a_full_disk_fails_clearly_then_resumes(llama, fault_docs, fault_cache, tmp_path, reliability):
    out = tmp_path / "cache"
    cmd = cli(cache_args(llama, fault_docs["train"], out, **SMALL_CACHE, format="zarr"))
    full = run_limited(cmd, limit_bytes=6_000)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "File too large" in full.stderr and "run the same command again to resume" in full.stderr
    assert "Traceback" not in full.stderr and not (out / "manifest.json").exists()
    done = run_limited(cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert snapshot(out) == snapshot(fault_cache) and not leftovers(out)
    reliability("disk", "`mft cache` hits a file size limit mid-build (EFBIG from the kernel, as ENOSPC)",
                "exit 2 naming the error, no traceback, no manifest; rerun resumes to a byte-identical cache")


def test_cache_on_a_really_full_tmpfs(llama, fault_docs, tmp_path, reliability):
    mnt = tmp_path / "small"
    if not mount_tmpfs(mnt, "size=48k"):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN); the file-size-limit test covers the path")
    try:
        full = run_limited(cli(cache_args(llama, fault_docs["train"], mnt / "cache", **SMALL_CACHE, format="zarr")))
        assert full.returncode == 2, full.stderr[-2000:]
        assert "No space left on device" in full.stderr and "Traceback" not in full.stderr
        assert not (mnt / "cache" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    reliability("disk", "`mft cache` on a really full disk (48 KiB tmpfs, ENOSPC)", "exit 2, no traceback, no manifest")
