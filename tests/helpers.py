"""Helpers the tests share (the fixtures are in conftest.py): snapshots of folders, the environment and command line of
a real `mft` process, the arguments of `mft cache` and `mft train`, caches edited and re-signed as anyone can, and
processes stopped at a fault point (mft_cache/faults.py).

conftest.py imports this module: what it takes from the library is imported where it is used, so that a library
change breaks the tests that use it, not the collection of every test."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


LOCK_FILE = ".mft-lock"  # a folder's lock and a run folder's marker: names users see, so spelled out here
MARKER = ".mft-run.json"

# The small setup of the fault suites: a cache of >= 4 shards, and a 6-step run on it that checkpoints every 2 steps.
SMALL_CACHE = dict(seq_len=32, top_k=8, shard_mb=0.004, batch_size=2)
SMALL_RUN = dict(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, save_every=2, log_every=100)  # no evaluation
# with evaluation at 3 and 6; no samples (test_samples.py covers them: generating at every evaluation of every test
# run would cost the suite more than it checks)
EVAL_RUN = dict(steps=6, batch_size=2, lr=3e-3, save_every=2, eval_every=3, log_every=100, samples=0)


# -- folders ----------------------------------------------------------------------------------------------------
def snapshot(folder: Path, *ignore: str) -> dict[str, bytes]:
    """Every file under `folder` (relative POSIX path -> bytes), but those named in `ignore` (e.g. LOCK_FILE: a stale
    lock, a killed run's, is the tool's to take over and remove)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ignore}


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files: anything hidden or named *.tmp / *.partial anywhere below (but a run folder's
    marker, .mft-run.json, which stays for good)."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != MARKER
            and any(part.startswith(".") or part.endswith((".tmp", ".partial")) for part in p.relative_to(folder).parts)]


# -- command lines and processes --------------------------------------------------------------------------------
def as_flags(options: dict) -> list[str]:
    """{"seq_len": 32, "top_k": 8} -> ["--seq-len", "32", "--top-k", "8"]."""
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def cache_args(model: Path, data: Path, out: Path, *extra: str, **options) -> list[str]:
    """The arguments of `mft cache`: --model, --data, --out, each option as its flag, then `extra` (which win)."""
    return ["cache", "--model", str(model), "--data", str(data), "--out", str(out), *as_flags(options), *extra]


def train_args(cache: Path, out: Path | str, *extra: str, **options) -> list[str]:
    """The arguments of `mft train`: --cache, --out, each option as its flag, then `extra` (which win)."""
    return ["train", "--cache", str(cache), "--out", str(out), *as_flags(options), *extra]


def cli(args: list[str]) -> list[str]:
    """The command line of a real `mft <args>` process."""
    return [sys.executable, "-m", "mft_cache.cli", *args]


def subprocess_env(**extra: str) -> dict:
    """The environment of a real `mft` process: one thread, offline, unbuffered, INFO logging, no fault unless
    `extra` names one (MFT_FAULT=...)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MFT_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    env.pop("MFT_FAULT", None)
    env.update(extra)
    return env


def run_limited(cmd: list[str], limit_bytes: int = 0, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `cmd` to the end, output captured; with `limit_bytes`, under a file size limit (RLIMIT_FSIZE: the kernel
    refuses a write past it with EFBIG, as a full disk refuses it with ENOSPC)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(**env), timeout=timeout,
                          preexec_fn=limit if limit_bytes else None)


def torchrun(args: list[str], logs: Path, timeout: float = 600, **env: str) -> tuple[int, str]:
    """`mft <args>` on 2 processes; returns (torchrun's exit code, the processes' stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mft_cache.cli", *args]
    err = logs.with_suffix(".stderr")
    with open(logs.with_suffix(".stdout"), "wb") as so, open(err, "wb") as se:  # files: never an undrained pipe
        rc = subprocess.run(cmd, stdout=so, stderr=se, env=subprocess_env(**env), timeout=timeout).returncode
    return rc, err.read_text(errors="replace")


def start_paused(args: list[str], point: str, log: Path, timeout: float = 300) -> subprocess.Popen:
    """A real `mft` process that stops at a fault point (MFT_FAULT=pause:...) and waits there to be signalled."""
    err = open(log, "w")
    proc = subprocess.Popen(cli(args), stdout=subprocess.DEVNULL, stderr=err,
                            env=subprocess_env(MFT_FAULT=f"pause:{point}"))
    err.close()
    deadline = time.monotonic() + timeout
    while f"paused at {point}" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never paused at {point} (exit {proc.poll()}): {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 300) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=timeout)


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process (a real pid) holding the folder's lock with the library's own helper until killed."""
    code = ("import sys, time; from mft_cache.folder_lock import FolderLock; "
            "FolderLock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at `path` (made if missing); False where this machine does not let the test (CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- runs -------------------------------------------------------------------------------------------------------
def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- calls that must not hang ------------------------------------------------------------------------------------
class Hung(BaseException):
    """A call that blocked (on a FIFO, or looping); a BaseException so that no `except OSError` of the command catches
    it."""


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Turn a block that runs longer than `seconds` (open() of a FIFO with no writer, a loop) into a failure, not a hung
    suite (SIGALRM: interrupts Python-level waits)."""
    def alarm(*_):
        raise Hung(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- caches edited and re-signed, as anyone can -----------------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def resign(folder: Path, edit) -> None:
    """Apply edit(manifest) and write it back with a recomputed manifest_sha256 (and shard_bytes), as anyone can."""
    from mft_cache.storage.manifest import manifest_digest

    m = read_manifest(folder)
    edit(m)
    if isinstance(m.get("shards"), list) and all(isinstance(s, dict) and isinstance(s.get("bytes"), int) for s in m["shards"]):
        m["shard_bytes"] = sum(s["bytes"] for s in m["shards"])
    m["manifest_sha256"] = manifest_digest(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def bos_of(manifest: dict) -> int | None:
    """The BOS every row starts with (packing rule "bos-per-row"), or None, from a manifest's JSON."""
    from mft_cache.masks import BOS_PER_ROW

    packing = manifest.get("packing") or {}
    return packing.get("bos_token_id") if packing.get("rule") == BOS_PER_ROW else None


def rewrite_shard(folder: Path, edit, index: int = 0) -> str:
    """Rewrite shard `index` with edit(arrays, trained) applied to its stored fields (q8: the codes and top1_logprob),
    given at every position (R, T-1, ...) with zeros where nothing is trained (trained: the (R, T-1) bool label mask,
    which the edit may change too), then stored again at the trained positions and re-signed with the manifest: only
    the values are wrong. Returns the shard's name."""
    from mft_cache.masks import label_mask
    from mft_cache.storage import open_cache, store_rows
    from mft_cache.storage.backends import BACKENDS, checksum, size_on_disk
    from mft_cache.storage.reader import expand_positions
    from mft_cache.storage.schema import stores_positions

    cache, m = open_cache(folder, verify="none"), read_manifest(folder)
    s = m["shards"][index]
    arrays = {k: np.array(v) for k, v in cache.read_rows(s["first_row"], s["first_row"] + s["rows"], raw=True).items()}
    if stores_positions(cache.schema):
        arrays = expand_positions(arrays, cache.schema)
        edit(arrays, arrays["label_mask"])
        arrays = store_rows(arrays, cache.schema)
    else:
        edit(arrays, label_mask(arrays["input_ids"], arrays["length"], bos_of(m)))
    path = folder / s["name"]
    if path.is_dir():
        shutil.rmtree(path)
    BACKENDS[cache.format].write(path, cache.schema, arrays)
    resign(folder, lambda m: m["shards"][index].update(sha256=checksum(path), bytes=size_on_disk(path)))
    return s["name"]


def write_legacy_copy(src: Path, dst: Path) -> None:
    """The cache at `src` written again as schema version 1 writes it (every position stored, no label mask, zeros
    where nothing is trained), with the same rows, values and metadata: a cache of an earlier mft-cache. float16 and
    float32 log-probs only."""
    from mft_cache.storage import CacheMetadata, CacheWriter, open_cache
    from mft_cache.storage.schema import legacy_schema

    cache, m = open_cache(src), read_manifest(src)
    schema = legacy_schema(vocab_size=m["vocab_size"], top_k=m["top_k"], seq_len=m["seq_len"],
                           logprob_dtype=cache.schema[-2].dtype)
    writer = CacheWriter(dst, fmt=m["format"], schema=schema, identity=m["config"])
    for i, shard in enumerate(m["shards"]):
        rows = cache.read_rows(shard["first_row"], shard["first_row"] + shard["rows"])
        writer.write_shard(i, {f.name: rows[f.name].astype(f.dtype) for f in schema})
    names = {f.name for f in dataclasses.fields(CacheMetadata)}
    meta = CacheMetadata(**{k: m[k] for k in names if k in m}, logprob_dtype=cache.schema[-2].dtype)
    writer.finish(dataclasses.replace(meta, data={k: v for k, v in m["data"].items() if k != "documents_file"}),
                  len(m["shards"]), np.load(src / "documents.npy"))


def rewrite_field(folder: Path, field: str, edit) -> str:
    """rewrite_shard on shard 0 with edit(array) applied to one stored field."""
    return rewrite_shard(folder, lambda arrays, trained: edit(arrays[field]))


# -- the Hub, faked ---------------------------------------------------------------------------------------------
def fake_download(monkeypatch, folder: Path, calls: list) -> None:
    """huggingface_hub.snapshot_download stands in for the Hub: every repository is `folder`; each call's (repo id,
    repo type, revision) is appended to `calls`."""
    import huggingface_hub

    def snapshot_download(repo_id, repo_type=None, revision=None, **kw):
        calls.append((repo_id, repo_type, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


# -- short runs of `mft train` on a small cache (the config-file, tracking, card and Hub tests) ------------------
def tiny_flags(cache: Path, docs: Path, out: Path) -> list[str]:
    return ["--cache", str(cache), "--out", str(out), "--steps", "3", "--batch-size", "2", "--lr", "3e-3",
            "--warmup-steps", "1", "--eval-every", "2", "--save-every", "0", "--eval-specialized", str(docs),
            "--eval-general", str(docs), "--eval-max-sequences", "2", "--tau", "0.5", "--samples", "0"]


def config_json(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


# -- what a run sent its trackers (test_tracking.py, test_trackers_offline.py) -----------------------------------
def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """What metrics.jsonl says the trackers were sent: {tag: {step: value}}."""
    want: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        prefix, keys = ("train", ("loss", "lr", "tokens_per_s")) if r["type"] == "train" else (
            "eval", ("ppl_specialized", "ppl_general", "S", "DG", "ratio"))
        for k in keys:
            if r.get(k) is not None:
                want.setdefault(f"{prefix}/{k}", {})[r["step"]] = r[k]
    return want


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files in `folder`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_same_scalars(got: dict, want: dict, rel: float = 1e-6) -> None:
    """The same tags, steps and values; `rel`: TensorBoard stores float32 (rel=0: the same float64)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for tag in want:
        assert set(got[tag]) == set(want[tag]), tag
        for step, value in want[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=rel, abs=1e-12 if rel else 0), (tag, step)


# -- documents packed whole, all at once ---------------------------------------------------------------------------
@dataclasses.dataclass
class DocRows:
    """Rows of whole documents (pack_documents); R rows of T tokens, D documents."""
    input_ids: np.ndarray  # (R, T) int64
    lengths: np.ndarray  # (R,) int32
    segment_ids: np.ndarray  # (R, T) int32
    position_ids: np.ndarray  # (R, T) int64
    label_mask: np.ndarray  # (R, T-1) bool
    doc_row: np.ndarray  # (D,) int64: the row of each document
    doc_start: np.ndarray  # (D,) int32: its first position in that row
    doc_length: np.ndarray  # (D,) int32: its tokens in the row (after truncation)
    num_truncated: int

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_predictions(self) -> int:
        return int(self.label_mask.sum())


def pack_documents(docs: Iterable[tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int = 0,
                   too_long: str = "error") -> DocRows:
    """All rows of rows.doc_packing.iter_rows stacked, with where each document went."""
    from mft_cache.rows.doc_packing import iter_rows

    rows = list(iter_rows(docs, seq_len, pad_id, too_long))
    t = seq_len
    if not rows:
        empty = np.zeros((0, t), dtype=np.int64)
        return DocRows(empty, np.zeros(0, np.int32), empty.astype(np.int32), empty, np.zeros((0, t - 1), bool),
                       np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), 0)
    doc_row = np.array([r for r, row in enumerate(rows) for _ in row.docs], dtype=np.int64)
    doc_start = np.array([s for row in rows for s in row.starts], dtype=np.int32)
    ends = [list(row.starts[1:]) + [row.length] for row in rows]
    doc_length = np.array([e - s for row, es in zip(rows, ends) for s, e in zip(row.starts, es)], dtype=np.int32)
    return DocRows(
        input_ids=np.stack([r.input_ids for r in rows]),
        lengths=np.array([r.length for r in rows], dtype=np.int32),
        segment_ids=np.stack([r.segment_ids for r in rows]),
        position_ids=np.stack([r.position_ids for r in rows]),
        label_mask=np.stack([r.label_mask for r in rows]),
        doc_row=doc_row, doc_start=doc_start, doc_length=doc_length,
        num_truncated=sum(r.truncated for r in rows),
    )
