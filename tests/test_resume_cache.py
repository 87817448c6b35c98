"""`mft cache` killed (SIGKILL) or interrupted (Ctrl-C, SIGINT) mid-run, then run again, gives the same
cache, byte for byte, as an uninterrupted run; the interrupted folder never looks finished.

Each build runs the real CLI in a subprocess. The folder is polled every few milliseconds and the
signal is sent once at least two shards are complete and the manifest does not exist yet."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_texts, write_jsonl
from mft_cache.storage import ManifestError, open_cache

NUM_DOCS = 40  # ~220 sequences of 48 tokens -> ~45 shards of 5 rows at --shard-mb 0.01; a few seconds on CPU
MIN_SHARDS_BEFORE_SIGNAL = 2
SHARD = re.compile(r"^shard-\d{5}\.(zarr|arrow)$")
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "docs.jsonl", make_texts(NUM_DOCS, seed=7))


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MFT_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    return env


def _cmd(model: Path, data: Path, out: Path, fmt: str) -> list[str]:
    return [sys.executable, "-m", "mft_cache.cli", "cache", "--model", str(model), "--data", str(data),
            "--out", str(out), "--seq-len", "48", "--top-k", "8", "--shard-mb", "0.01", "--batch-size", "2",
            "--format", fmt]


def _run(cmd: list[str], logs: Path) -> tuple[int, str]:
    """Run to completion; stderr (logging and tqdm) goes to a file, never to an undrained pipe."""
    err = logs.with_suffix(".stderr")
    with open(logs.with_suffix(".stdout"), "wb") as so, open(err, "wb") as se:
        rc = subprocess.run(cmd, stdout=so, stderr=se, env=_env(), timeout=RUN_TIMEOUT_S).returncode
    return rc, err.read_text(errors="replace")


def _shards(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if SHARD.match(n)) if folder.is_dir() else []


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative POSIX path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if any(part.startswith(".") for part in p.relative_to(folder).parts)]


def _stamps(folder: Path, name: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of the shard `name` and of every file inside it (a Zarr shard is a folder)."""
    root = folder / name
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


@pytest.fixture(scope="module")
def reference(llama, big_jsonl, tmp_path_factory):
    """An uninterrupted run per format, built once for the module. Both start at once in the background
    (one thread each), so they overlap with the interrupted runs of the first test."""
    procs: dict[str, tuple[subprocess.Popen, Path, Path, list]] = {}
    for fmt in ("zarr", "arrow"):
        out = tmp_path_factory.mktemp(f"reference-{fmt}") / "cache"
        so, se = open(out.parent / "run.stdout", "wb"), open(out.parent / "run.stderr", "wb")
        procs[fmt] = (subprocess.Popen(_cmd(llama, big_jsonl, out, fmt), stdout=so, stderr=se, env=_env()),
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
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=_env())
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
    pytest.param(signal.SIGKILL, "zarr", id="sigkill-zarr"),
    pytest.param(signal.SIGINT, "zarr", id="sigint-zarr"),
    pytest.param(signal.SIGINT, "arrow", id="sigint-arrow"),
])
def test_interrupted_build_resumes_to_identical_cache(sig, fmt, llama, big_jsonl, reference, tmp_path, reliability):
    ref = reference(fmt)
    ref_files = _files(ref)
    num_shards = len(_shards(ref))
    assert num_shards >= 20, "too few shards for a meaningful interruption"
    assert not _hidden(ref), f"the uninterrupted run left hidden files: {_hidden(ref)[:5]}"

    out = tmp_path / "cache"
    cmd = _cmd(llama, big_jsonl, out, fmt)
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
    assert not _hidden(out), f"temporary/hidden files left: {_hidden(out)[:5]}"
    got = _files(out)
    assert sorted(got) == sorted(ref_files)
    differing = [k for k in ref_files if got[k] != ref_files[k]]
    assert not differing, f"files differ from the uninterrupted run: {differing[:5]}"
    cache = open_cache(out, verify="full")
    assert len(cache.shards) == num_shards
    reliability("crash", f"{signal.Signals(sig).name} to `mft cache` ({fmt}) at a random moment mid-build",
                "no manifest (not openable); the rerun computes only the missing shards and ends byte-identical"
                + (", exit 130 with a resume hint" if sig == signal.SIGINT else ""))

