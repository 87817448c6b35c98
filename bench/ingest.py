"""The `ingest` section of bench/run.py: `mft cache` on a tiny model over a synthetic corpus of about 1M tokens
and 10x and 100x of it, each build a fresh process (one thread) whose peak RSS (os.wait4's ru_maxrss) and wall time are taken;
beside it, the same builds by an earlier commit of the code (its own worktree), where it can hold the corpus.

The corpus: `make_texts` documents written once as JSON Lines (1x); 10x and 100x are that file repeated (the
documents repeat; the reader, the tokenizer and the teacher do the same work per token).

SECTION: the section as bench/run.py runs it, with its flags, table and verdicts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ROOT, fmt, ints, say, verdict  # noqa: E402

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


def section_ingest(args, inputs: benchlib.Inputs) -> dict:
    work = inputs.work
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
            "top_k": args.ingest_top_k, "batch_size": args.ingest_batch_size, "shard_mb": args.ingest_shard_mb,
            "tokens_1x": args.ingest_tokens, "baseline": args.ingest_baseline, "rows": rows}


def flags(group) -> None:
    group.add_argument("--ingest-scales", default="", help="ingest: multiples of the corpus (default 1,10,100; quick 1,2)")
    group.add_argument("--ingest-tokens", type=int, default=0, help="ingest: tokens of the 1x corpus (default 1,000,000)")
    group.add_argument("--ingest-seq-len", type=int, default=64, help="ingest: --seq-len of the builds")
    group.add_argument("--ingest-top-k", type=int, default=4, help="ingest: --top-k of the builds")
    group.add_argument("--ingest-batch-size", type=int, default=256, help="ingest: --batch-size of the builds (large: the "
                       "tiny teacher's forward would otherwise be all overhead)")
    group.add_argument("--ingest-shard-mb", type=float, default=8.0, help="ingest: --shard-mb of the builds (8: even the "
                       "1x corpus fills several shards, so what is compared is the corpus size, not a shard's)")
    group.add_argument("--ingest-baseline", default="", help="ingest: a git revision whose code builds the same caches "
                       "beside (e.g. the commit before streaming ingestion)")
    group.add_argument("--ingest-baseline-max-scale", type=int, default=10, help="ingest: the largest scale the baseline "
                       "runs at (it holds the corpus in memory)")


def resolve(args, error) -> None:
    args.ingest_scales = ints(args.ingest_scales or ("1,2" if args.quick else "1,10,100"))
    args.ingest_tokens = args.ingest_tokens or (20_000 if args.quick else 1_000_000)


def growth(rows: list[dict], code: str) -> str:
    """What the measured scales of `code` say of its peak memory per corpus token (for a row not run)."""
    run = sorted((r for r in rows if r["code"] == code and "wall_s" in r), key=lambda r: r["scale"])
    if len(run) < 2:
        return ""
    a, b = run[0], run[-1]
    per_token = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (b["input_tokens"] - a["input_tokens"])
    return (f"; from {a['scale']}x to {b['scale']}x its peak grew by {per_token:.0f} bytes per corpus token, "
            f"{a['peak_rss_mb'] + per_token * (rows[-1]['scale'] - a['scale']) * a['input_tokens'] / 2**20:,.0f} MB at "
            f"{rows[-1]['scale']}x if it went on so")


def table(g: dict, results: dict) -> list[str]:
    out = [f"### Ingestion (`mft cache` on a {g['model']}, --seq-len {g['seq_len']} --top-k {g['top_k']}; a "
           f"--batch-size {g.get('batch_size')} --shard-mb {g.get('shard_mb')}; a synthetic corpus of {g['tokens_1x']:,} "
           f"tokens at 1x; each build a fresh process, one thread (OMP_NUM_THREADS=1); streamed: this "
           f"commit; previous: commit {str(g['baseline'])[:10]}, which read the whole corpus into memory)\n",
           "| corpus | code | input tokens | wall s | tokens/s | x 1x | peak RSS MB | x 1x | same bytes as the "
           "other code |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        if "skipped" in r:
            out.append(f"| {r['scale']}x | {r['code']} | | | | | | | not run (only up to "
                       f"--ingest-baseline-max-scale){growth(g['rows'], r['code'])} |")
            continue
        same = {True: "yes", False: "**no**", None: ""}[r.get("identical_to_other_code")]
        out.append(f"| {r['scale']}x | {r['code']} | {r['input_tokens']:,} | {fmt(r['wall_s'], 1)} | "
                   f"{fmt(r['tokens_per_s'], 0)} | {fmt(r.get('tokens_per_s_ratio_to_1x'))} | {fmt(r['peak_rss_mb'], 0)} | "
                   f"{fmt(r.get('rss_ratio_to_1x'))} | {same} |")
    return out + [""]


def verdicts(g: dict) -> list[dict]:
    rows = [r for r in g["rows"] if r["code"] == "streamed" and "wall_s" in r]
    top = max(rows, key=lambda r: r["scale"])
    v = [verdict(f"streamed ingestion: peak RSS at {top['scale']}x within 1.2 x of 1x", top["rss_ratio_to_1x"],
                 top["rss_ratio_to_1x"] <= 1.2, f"{top['peak_rss_mb']:.0f} vs {rows[0]['peak_rss_mb']:.0f} MB "
                 f"({top['rss_ratio_to_1x']:.3f} x)"),
         verdict(f"streamed ingestion: tokens/s at {top['scale']}x do not drop (>= 0.95 x of 1x)",
                 top["tokens_per_s_ratio_to_1x"], top["tokens_per_s_ratio_to_1x"] >= 0.95,
                 f"{top['tokens_per_s']:,.0f} vs {rows[0]['tokens_per_s']:,.0f} tokens/s")]
    same = [r.get("identical_to_other_code") for r in g["rows"] if "identical_to_other_code" in r]
    if same:
        v.append(verdict("streamed and previous code write the same bytes", all(same), all(same),
                         f"{sum(same)} of {len(same)} builds identical (every shard and documents.npy)"))
    return v


SECTION = benchlib.Section("ingest", section_ingest, table, verdicts, flags=flags, resolve=resolve, default=False)
