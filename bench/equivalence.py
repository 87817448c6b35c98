"""Behaviour-equivalence golden for restructurings: builds tiny random models (from config, offline) and small data
files, writes text (BOS / no-BOS x zarr / arrow x float16 / q8 / float32), chat and prompt-completion caches through
the CLI, dumps every value `open_cache(folder)[i]` decodes (by field name, and name-independently per row) with the
manifest less its volatile fields, and the per-step metrics of a few 3-step `mft train` runs, to DIR/equivalence.json.

    python bench/equivalence.py --out DIR [--work TMPDIR]     # write DIR/equivalence.json
    python bench/equivalence.py --compare A.json B.json       # table of (case, what, status); exit 1 on a difference
    python bench/equivalence.py --out DIR --caches-from WORK  # the caches another version built, read and trained here

Run it on the commit before a restructuring and on the commit after, then --compare: every decoded value and every
loss must be identical; with --caches-from, caches written before are read and trained from by the code after.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
       "CUDA_VISIBLE_DEVICES": "", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
os.environ.update(ENV)  # before torch is imported here, and inherited by every child

# the fixtures are spelled out here rather than imported from mft_cache.testing, which the restructuring may move
WORDS = ("licence software copyright permission warranty liability notice redistribution source binary the a of to "
         "and in is that for with as without any distribute modify use copy merge publish grant holder contributor "
         "condition disclaimer implied fitness particular purpose damages contract tort").split()
LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct's, verbatim
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# volatile keys (found by diffing builds in two folders): library versions, the digest of a manifest that holds an
# absolute path, and timings (step_time_s, tokens_per_s, train_time_s, wall_time_s, ...)
VOLATILE = re.compile(r"^(created_by|manifest_sha256)$|(^|_)(time|date|duration|elapsed|seconds|host)(_|$)|_s$")
CACHE_ARGS = ["--top-k", "8", "--device", "cpu", "--dtype", "float32", "--batch-size", "4"]
TRAIN_ARGS = ["--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "100",
              "--save-every", "0", "--log-every", "1", "--seed", "0"]
TOL = 1e-6


def make_texts(n: int, seed: int, lo: int = 20, hi: int = 100) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "." for _ in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_data(work: Path) -> None:
    """docs/eval/general text, chat conversations (some with a system turn, some of two exchanges, one ending on a
    user turn) and prompt-completion rows, all deterministic."""
    write_rows(work / "docs.jsonl", [{"text": t} for t in make_texts(10, seed=1)])
    write_rows(work / "eval.jsonl", [{"text": t} for t in make_texts(4, seed=2)])
    write_rows(work / "general.jsonl", [{"text": t} for t in make_texts(4, seed=3, lo=5, hi=30)])
    rng = random.Random(4)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    chats = []
    for i in range(10):
        messages = [{"role": "system", "content": say(1, 2)}] if i % 2 == 0 else []
        for _ in range(1 + (i % 3 == 1)):
            messages += [{"role": "user", "content": say(1, 3)}, {"role": "assistant", "content": say(2, 5)}]
        if i == 3:
            messages.append({"role": "user", "content": say(1, 2)})
        chats.append({"messages": messages})
    write_rows(work / "chat.jsonl", chats)
    write_rows(work / "pc.jsonl", [{"prompt": say(2, 6), "completion": " " + say(2, 8)} for _ in range(10)])


def make_model(folder: Path, kind: str, bos: bool, chat: bool = False) -> Path:
    """A tiny random Llama or GPT-2 with a byte-level BPE tokenizer trained on the spot (the way
    mft_cache/testing.py makes them); `bos`: the tokenizer adds <s>; `chat`: it carries Llama 3's template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(make_texts(200, seed=123), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        fast.add_special_tokens({"additional_special_tokens": specials})
        fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(folder)
    ids = dict(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    vocab = 320 if chat else 300
    config = (LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False, **ids) if kind == "llama" else
              GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # a peaky teacher, so top-k means something
    model.save_pretrained(folder)
    return folder


def run_mft(work: Path, args: list[str]) -> None:
    """`mft ARGS` in a child (the entry point beside sys.executable, else -m mft_cache.cli), cwd the work folder so
    that no checkout on the path shadows the installed package."""
    entry = Path(sys.executable).parent / "mft"
    cmd = [str(entry)] if entry.exists() else [sys.executable, "-m", "mft_cache.cli"]
    env = {**os.environ, **ENV, "HF_HOME": str(work / "hf_home")}
    p = subprocess.run(cmd + args, cwd=work, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"`mft {' '.join(args)}` failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def cache_cases() -> dict[str, list[str]]:
    """Case name -> `mft cache` arguments (without --out)."""
    cases = {}
    for bos, model in (("bos", "llama-bos"), ("nobos", "gpt2-nobos")):
        for fmt in ("zarr", "arrow"):
            for dtype in ("float16", "q8") + (("float32",) if (bos, fmt) == ("bos", "zarr") else ()):
                cases[f"text-{bos}-{fmt}-{dtype}"] = ["--model", model, "--data", "docs.jsonl", "--seq-len", "64",
                                                      "--format", fmt, "--logprob-dtype", dtype, "--shard-mb", "0.02"]
    cases["chat-zarr-float16"] = ["--model", "llama-chat", "--data", "chat.jsonl", "--seq-len", "96"]
    cases["pc-zarr-float16"] = ["--model", "llama-bos", "--data", "pc.jsonl", "--seq-len", "96"]
    return cases


def train_cases() -> dict[str, list[str]]:
    """Case name -> `mft train` arguments (without --out); --cache names a cache case."""
    evals = ["--eval-specialized", "eval.jsonl", "--eval-general", "general.jsonl", "--eval-max-sequences", "2"]
    return {
        "train-text-cache-mft": ["--cache", "text-bos-zarr-float16", "--objective", "mft", *evals],
        "train-text-cache-ft": ["--cache", "text-bos-zarr-float16", "--objective", "ft"],
        "train-text-online-mft": ["--teacher", "online", "--model", "llama-bos", "--data", "docs.jsonl",
                                  "--seq-len", "64", "--objective", "mft"],
        "train-text-nobos-q8-cache-mft": ["--cache", "text-nobos-arrow-q8", "--objective", "mft"],
        "train-chat-cache-mft": ["--cache", "chat-zarr-float16", "--objective", "mft"],
        "train-chat-cache-ft": ["--cache", "chat-zarr-float16", "--objective", "ft"],
        "train-chat-online-mft": ["--teacher", "online", "--model", "llama-chat", "--data", "chat.jsonl",
                                  "--seq-len", "96", "--objective", "mft"],
        "train-pc-cache-mft": ["--cache", "pc-zarr-float16", "--objective", "mft"],
    }


def is_volatile(key: str) -> bool:
    return bool(VOLATILE.search(key.lower()))


def scrub(value, roots: tuple[Path, ...]):
    """A manifest or summary less its volatile keys, the work folder's path (`roots`: this run's, and the one its
    caches were copied from) spelled <work> in every string."""
    if isinstance(value, dict):
        return {k: scrub(v, roots) for k, v in value.items() if not is_volatile(k)}
    if isinstance(value, list):
        return [scrub(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(str(root.resolve()), "<work>").replace(str(root), "<work>")
        return value
    return value


def describe_tensor(t) -> dict:
    """dtype, shape, sha256 of the bytes, the first values and the sum (for a reader of the JSON)."""
    import torch

    t = torch.as_tensor(t).detach().cpu().contiguous()
    flat = t.reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    head = flat[:4].to(torch.float64 if flat.dtype.is_floating_point else torch.int64).tolist()
    total = float(flat.to(torch.float64).sum()) if flat.numel() else 0.0
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(), "head": head, "sum": total}


def dump_cache(folder: Path, roots: tuple[Path, ...]) -> dict:
    """Every row open_cache decodes: each field by name, and the name-free sorted (dtype, shape, sha256) list."""
    from mft_cache.storage import open_cache

    cache = open_cache(folder)
    rows = []
    for i in range(len(cache)):
        fields = {name: describe_tensor(t) for name, t in cache[i].items()}
        prints = sorted([f["dtype"], f["shape"], f["sha256"]] for f in fields.values())
        rows.append({"fields": fields, "fingerprint": prints})
    # the manifest as a dict: a typed Manifest gives its JSON, an older version's reader the dict itself
    manifest = cache.manifest.to_json() if hasattr(cache.manifest, "to_json") else cache.manifest
    return {"num_rows": len(cache), "manifest": scrub(manifest, roots), "rows": rows}


def read_run(folder: Path, roots: tuple[Path, ...]) -> dict:
    """A run's metrics.jsonl as numbers (train steps and evaluations, times left out) and its summary's numbers."""
    steps, evals = [], []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        nums = {k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and not is_volatile(k)}
        (steps if rec.get("type") == "train" else evals).append({"type": rec.get("type"), **nums})
    summary = json.loads((folder / "summary.json").read_text())
    return {"steps": steps, "evals": evals, "summary": scrub(summary, roots)}


def package_info() -> dict:
    import importlib.metadata as md
    import importlib.util

    origin = Path(importlib.util.find_spec("mft_cache").origin).parent
    git = lambda *a: subprocess.run(["git", "-C", str(origin), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    versions = {p: md.version(p) for p in ("torch", "transformers", "tokenizers", "zarr", "pyarrow", "numpy",
                                           "accelerate", "datasets")}
    return {"package": str(origin), "commit": git("rev-parse", "HEAD"), "dirty_files": len(git("status",
            "--porcelain").splitlines()), "python": sys.version.split()[0], "versions": versions}


def produce(out: Path, work: Path, caches_from: Path | None = None) -> None:
    """Build the data, models and caches in `work` (or copy them from `caches_from`, the work folder of an earlier
    run, possibly of another version: its caches are then read and trained from as they are), read every cache, run
    every training case."""
    start, result = time.time(), {"meta": package_info(), "caches": {}, "trains": {}, "seconds": {}}
    shutil.rmtree(work, ignore_errors=True)
    roots = (work,) if caches_from is None else (work, caches_from)
    if caches_from is not None:
        shutil.copytree(caches_from, work, ignore=shutil.ignore_patterns(*train_cases()))
    else:
        work.mkdir(parents=True)
        write_data(work)
        make_model(work / "llama-bos", "llama", bos=True)
        make_model(work / "gpt2-nobos", "gpt2", bos=False)
        make_model(work / "llama-chat", "llama", bos=True, chat=True)
    for case, args in cache_cases().items():
        t = time.time()
        if caches_from is None:
            run_mft(work, ["cache", *args, *CACHE_ARGS, "--out", case])
        result["caches"][case] = {"args": args, **dump_cache(work / case, roots)}
        result["seconds"][case] = round(time.time() - t, 2)
        print(f"{case}: {result['caches'][case]['num_rows']} rows ({result['seconds'][case]} s)", flush=True)
    for case, args in train_cases().items():
        t = time.time()
        run_mft(work, ["train", *args, *TRAIN_ARGS, "--out", case])
        result["trains"][case] = {"args": args, **read_run(work / case, roots)}
        result["seconds"][case] = round(time.time() - t, 2)
        print(f"{case}: losses {[s.get('loss') for s in result['trains'][case]['steps']]} ({result['seconds'][case]} s)",
              flush=True)
    result["seconds"]["total"] = round(time.time() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "equivalence.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out / 'equivalence.json'}: {len(result['caches'])} caches, {len(result['trains'])} runs, "
          f"{result['seconds']['total']} s")


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(sub, f"{prefix}.{key}" if prefix else key).items()}
    return {prefix: value}


def numbers_differ(a: dict, b: dict) -> list[str]:
    """Keys both dicts hold whose numbers differ by more than TOL (or, not numbers, differ at all)."""
    out = []
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        num = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        if (abs(x - y) > TOL) if num else x != y:
            out.append(f"{k}: {x} vs {y}")
    return out


def compare_cache(a: dict, b: dict) -> list[tuple[str, str]]:
    checks = [("rows", "ok" if a["num_rows"] == b["num_rows"] else f"DIFF {a['num_rows']} vs {b['num_rows']}")]
    bad = [i for i, (x, y) in enumerate(zip(a["rows"], b["rows"])) if x["fingerprint"] != y["fingerprint"]]
    checks.append(("values (name-free)", f"DIFF in {len(bad)} rows, first row {bad[0]}" if bad else
                   f"ok ({len(a['rows'])} rows)"))
    names_a, names_b = ({n for r in side["rows"] for n in r["fields"]} for side in (a, b))
    diffs = [f"row {i} {n}" for i, (x, y) in enumerate(zip(a["rows"], b["rows"])) for n in sorted(names_a & names_b)
             if x["fields"].get(n) != y["fields"].get(n)]
    only = (f"; only in A: {sorted(names_a - names_b)}, only in B: {sorted(names_b - names_a)}"
            if names_a != names_b else "")
    checks.append(("values (by name)", (f"DIFF {len(diffs)}: {diffs[:3]}" if diffs else
                                        f"ok ({len(names_a & names_b)} shared fields)") + only))
    fa, fb = flatten(a["manifest"]), flatten(b["manifest"])
    diff = [f"{k} only in {'A' if k in fa else 'B'}" for k in sorted(fa.keys() ^ fb.keys())] + numbers_differ(fa, fb)
    checks.append(("manifest", f"DIFF {len(diff)}: {diff[:3]}" if diff else f"ok ({len(fa)} keys)"))
    return checks


def compare_train(a: dict, b: dict) -> list[tuple[str, str]]:
    checks = []
    for what in ("steps", "evals"):
        if len(a[what]) != len(b[what]):
            checks.append((what, f"DIFF {len(a[what])} vs {len(b[what])} records"))
            continue
        pairs = list(zip(a[what], b[what]))
        diff = [f"#{i} {d}" for i, (x, y) in enumerate(pairs) for d in numbers_differ(x, y)]
        diff += [f"#{i} {k} only in {'A' if k in x else 'B'}" for i, (x, y) in enumerate(pairs)
                 for k in sorted(x.keys() ^ y.keys())]
        if what == "steps":
            diff += [f"#{i} no loss" for i, (x, y) in enumerate(pairs) if "loss" not in x or "loss" not in y]
            worst = max((abs(x["loss"] - y["loss"]) for x, y in pairs if "loss" in x and "loss" in y), default=0.0)
        label, done = ("losses", f", max |d loss| {worst:.1e}") if what == "steps" else ("evaluations", "")
        checks.append((label, f"DIFF {len(diff)}: {diff[:3]}" if diff else f"ok ({len(a[what])} records{done})"))
    diff = numbers_differ(flatten(a["summary"]), flatten(b["summary"]))
    checks.append(("summary", f"DIFF {diff[:3]}" if diff else "ok"))
    return checks


def compare(path_a: Path, path_b: Path) -> int:
    a, b = json.loads(path_a.read_text()), json.loads(path_b.read_text())
    rows = []
    if a["meta"]["versions"] != b["meta"]["versions"]:
        rows.append(("(meta)", "library versions", f"note: {a['meta']['versions']} vs {b['meta']['versions']}"))
    for section, check in (("caches", compare_cache), ("trains", compare_train)):
        for case in sorted(a[section].keys() | b[section].keys()):
            if case not in a[section] or case not in b[section]:
                rows.append((case, "case", f"DIFF only in {'A' if case in a[section] else 'B'}"))
                continue
            rows += [(case, what, status) for what, status in check(a[section][case], b[section][case])]
    width = max(len(r[0]) for r in rows)
    print(f"A: {path_a} ({a['meta']['commit'][:10]}, {a['meta']['dirty_files']} dirty)\n"
          f"B: {path_b} ({b['meta']['commit'][:10]}, {b['meta']['dirty_files']} dirty)")
    print(f"{'case':<{width}}  {'what':<18}  status")
    for case, what, status in rows:
        print(f"{case:<{width}}  {what:<18}  {status}")
    failed = sum(s.startswith("DIFF") for _, _, s in rows)
    print(f"{len(rows)} checks, {failed} differ" if failed else f"{len(rows)} checks, all identical")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder to write equivalence.json to")
    ap.add_argument("--work", type=Path, help="scratch folder (kept; default: a temporary one, removed)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    ap.add_argument("--caches-from", type=Path, metavar="WORK",
                    help="reuse the models, data and caches of an earlier run's work folder (WORK/equivalence-work,\n"
                    "e.g. made by another version) instead of building them")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("--out or --compare is required")
    reuse = args.caches_from.resolve() / "equivalence-work" if args.caches_from else None
    if reuse is not None and not reuse.is_dir():
        ap.error(f"--caches-from {args.caches_from}: no equivalence-work folder in it")
    if args.work:
        produce(args.out, args.work.resolve() / "equivalence-work", reuse)
    else:
        with tempfile.TemporaryDirectory(prefix="mft-equiv-") as tmp:
            produce(args.out, Path(tmp) / "work", reuse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
