"""The `ingest` section of bench/run.py: `mft cache` on a tiny model over a synthetic corpus of about 1M tokens
and 10x and 100x of it, each build a fresh process (one thread) whose peak RSS (os.wait4's ru_maxrss) and wall time are taken;
beside it, the same builds by an earlier commit of the code (its own worktree), where it can hold the corpus.

The corpus: `make_texts` documents written once as JSON Lines (1x); 10x and 100x are that file repeated (the
documents repeat; the reader, the tokenizer and the teacher do the same work per token)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import benchlib
from benchlib import ROOT

PACKAGES = ("pipeline", "storage", "trainer")  # mapped into mft_cache by pyproject; a bare worktree needs links


def corpus(work: Path, tokens: int, scales: list[int]) -> dict[int, Path]:
    """{scale: a JSON Lines file of about scale x `tokens` tokens of the tiny tokenizer}."""
    from mft_cache.testing import make_texts

    base = work / "ingest-data" / "x1.jsonl"
    if not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        docs = make_texts(tokens // 74, seed=11)  # about 70 words, 74 tokens of the tiny tokenizer, a document
        base.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = {1: base}
    for s in scales:
        if s == 1:
            continue
        path = base.with_name(f"x{s}.jsonl")
        if not path.exists():
            with open(path.with_suffix(".tmp"), "wb") as f:
                for _ in range(s):
                    f.write(base.read_bytes())
            os.replace(path.with_suffix(".tmp"), path)
        out[s] = path
    return out


def worktree(rev: str, work: Path) -> Path:
    """A checkout of `rev` that runs as the package (its package links made)."""
    path = work / f"code-{rev[:10]}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
    if not (path / "mft_cache").exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                       capture_output=True)
    for name in PACKAGES:
        link = path / "mft_cache" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)
    return path


def measure(code: Path, model: Path, data: Path, out: Path, args, log: Path) -> dict:
    """One `mft cache` build in a fresh process: wall time, peak RSS, and what its manifest says."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # one thread: a tiny model's ops on two would wait on each other (and on a busy core)
    cmd = [sys.executable, "-m", "mft_cache.cli", "cache", "--model", str(model), "--data", str(data), "--out", str(out),
           "--seq-len", str(args.ingest_seq_len), "--top-k", str(args.ingest_top_k), "--device", "cpu",
           "--batch-size", str(args.ingest_batch_size), "--shard-mb", str(args.ingest_shard_mb)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=code)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"mft cache failed ({os.waitstatus_to_exitcode(status)}); log {log}:\n{log.read_text()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["num_input_tokens"]
    # documents.npy: each document's start in the packed stream, then the stream's length (only that is read)
    stream = int(np.load(out / manifest["data"]["documents_file"]["name"], mmap_mode="r")[-1])
    result = {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "input_tokens": tokens, "stream_tokens": stream,
              "documents": manifest["data"]["num_documents"],
              "tokens_per_s": tokens / wall, "bytes_per_token": manifest["bytes_per_token"],
              "sha256": [s["sha256"] for s in manifest["shards"]] + [manifest["data"]["documents_file"]["sha256"]]}
    shutil.rmtree(out, ignore_errors=True)  # 100x is gigabytes
    return result


def section_ingest(args, work: Path, say) -> dict:
    model = benchlib.make_tiny_model(work / "models" / "tiny-ingest", vocab_size=512, hidden=32, layers=2)
    scales = args.ingest_scales
    files = corpus(work, args.ingest_tokens, scales)
    codes = {"streamed": ROOT}
    if args.ingest_baseline:
        codes["previous"] = worktree(args.ingest_baseline, work)
    measure(ROOT, model, files[scales[0]], work / "ingest-warm-up", args, work / "logs" / "ingest-warm-up.log")
    rows = []  # (after one untimed build: the first process to import everything pays for the disk cache)
    for s in scales:
        for name, code in codes.items():
            if name == "previous" and s > args.ingest_baseline_max_scale:
                rows.append({"scale": s, "code": name, "skipped": f"--ingest-baseline-max-scale "
                             f"{args.ingest_baseline_max_scale}"})
                continue
            r = measure(code, model, files[s], work / f"ingest-cache-{name}-{s}", args,
                        work / "logs" / f"ingest-{name}-{s}.log")
            rows.append({"scale": s, "code": name, **r})
            say(f"  ingest {name:9s} {s:4d}x  {r['input_tokens'] / 1e6:7.1f} M tokens  {r['wall_s']:7.1f} s  "
                f"{r['tokens_per_s'] / 1e3:7.1f} k tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB")
    if "previous" in codes:  # the checkout was for this section only: no worktree left registered in the repository
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(codes["previous"])],
                       capture_output=True)
    for r in rows:  # the same bytes (every shard and documents.npy), whichever code made them
        twin = next((o for o in rows if o["scale"] == r["scale"] and o is not r and "sha256" in o), None)
        if "sha256" in r and twin is not None:
            r["identical_to_other_code"] = r["sha256"] == twin["sha256"]
    for r in rows:
        r.pop("sha256", None)
    first = {r["code"]: r for r in rows if r["scale"] == scales[0] and "wall_s" in r}
    for r in rows:
        if "wall_s" in r and r["code"] in first:
            r["rss_ratio_to_1x"] = r["peak_rss_mb"] / first[r["code"]]["peak_rss_mb"]
            r["tokens_per_s_ratio_to_1x"] = r["tokens_per_s"] / first[r["code"]]["tokens_per_s"]
    return {"model": "tiny Llama from config (vocab 512, hidden 32, 2 layers)", "seq_len": args.ingest_seq_len,
            "top_k": args.ingest_top_k, "batch_size": args.ingest_batch_size, "shard_mb": args.ingest_shard_mb, "tokens_1x": args.ingest_tokens, "baseline": args.ingest_baseline,
            "rows": rows}
