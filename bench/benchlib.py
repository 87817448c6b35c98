"""What the benchmark scripts share: the interface of a section of bench/run.py, machine description, memory
probes, tiny models and data built from config (nothing downloads), synthetic cache rows, and the one-line JSON
hand-off of a child."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


# -- a section of bench/run.py ----------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """What every section's run is given: the scratch folder, the model and documents of --model/--data (or
    their defaults) and the resolved device."""
    work: Path
    model: str
    data: str
    device: str


@dataclass(frozen=True)
class Section:
    """One section of bench/run.py.

    name: its --sections name and its key under "sections" in results.json.
    flags(group): adds its own options to the parser (an argument group titled after it).
    resolve(args, error): fills in the defaults of those options after parsing; error(message) is the parser's.
    run(args, inputs) -> dict: measures; the dict is what results.json records of the section.
    finish(section, args, stamp): amends that record once it carries the run that measured it (stamp).
    table(section, results) -> lines of the page's tables (results: the whole file, for what sections share).
    verdicts(section) -> rows {target, value, met (None: a comparison, not a target), detail}.
    default: whether it runs without --sections naming it.
    """
    name: str
    run: Callable[[argparse.Namespace, Inputs], dict]
    table: Callable[[dict, dict], list[str]]
    verdicts: Callable[[dict], list[dict]] = lambda section: []
    flags: Callable[[argparse._ArgumentGroup], None] | None = None
    resolve: Callable[[argparse.Namespace, Callable[[str], None]], None] | None = None
    finish: Callable[[dict, argparse.Namespace, dict], None] | None = None
    default: bool = True


def verdict(target: str, value, ok, detail: str, info: bool = False) -> dict:
    """A row of the verdicts: a target met or not, or (info) a comparison that is no target."""
    return {"target": target, "value": value, "met": None if info else bool(ok), "detail": detail}


def ints(text: str) -> list[int]:
    """A comma-separated list of integers, as the section flags take them."""
    return [int(x) for x in text.split(",")]


def fmt(x, digits=3) -> str:
    """A number in a table cell: thousands separated, n/a for a missing or non-finite value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def say(msg: str) -> None:
    print(msg, flush=True)


# -- numbers ----------------------------------------------------------------------------------------
def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else float("nan")


def now() -> float:
    return time.perf_counter()


# -- arithmetic: FLOPs of a model's passes and the machine's matmul peak --------------------------------
# A pass's FLOPs are counted as PaLM counts them for its model FLOPs utilisation (Chowdhery et al. 2022, app. B):
# per token position, 2 per parameter outside the embeddings (decoder layers and norms), 2 x vocab x hidden where the
# output layer runs, and attention's two products QK^T and AV, 2 x 2 x layers x seq_len x attention width (the whole
# seq_len x seq_len square, the causal mask not subtracted). A training step is three forwards (the backward does
# twice a forward's work): 6N + 12 L T d per position. Embedding lookups, norms, softmax and the loss are not counted.
DTYPES = ("float32", "bfloat16")
FLOP_FORMULA = ("FLOPs as PaLM counts them: a forward is 2 N P + 2 V H P_head + 4 L T d P (N parameters outside the "
                "embeddings, P positions run, P_head positions the output layer runs at, V x H the output layer, L "
                "layers, T the sequence length, d heads x head dim); a training step is 3 forwards; GFLOP/s is those "
                "FLOPs over the measured time, and the peak the best of a square matmul in the same dtype in the same run")


def default_dtypes(device: str) -> list[str]:
    """The dtypes the train and cache sections measure unless --dtypes says: bf16 beside float32 where the device
    computes it natively (mft_cache.models.native_bf16_on, MFT_CPU_BF16 overriding the CPU's detection)."""
    import torch

    from mft_cache.models import native_bf16_on

    return list(DTYPES) if native_bf16_on(torch.device(device)) else ["float32"]


def matmul_peak(dtype: str, device: str, n: int = 2048, repeats: int = 10) -> dict:
    """The machine's matmul peak in `dtype`: GFLOP/s of (n, n) @ (n, n) (2 n^3 FLOPs), the best of `repeats` timed
    products after an untimed one, with their median."""
    import torch

    dev, dt = torch.device(device), getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dev, dt) for _ in range(2))
    c = torch.empty(n, n, dtype=dt, device=dev)
    mem = Memory(dev)
    torch.matmul(a, b, out=c)
    mem.sync()
    times = []
    for _ in range(repeats):
        t0 = now()
        torch.matmul(a, b, out=c)
        mem.sync()
        times.append(now() - t0)
    flops = 2 * n**3
    return {"dtype": dtype, "n": n, "repeats": repeats, "gflops": flops / min(times) / 1e9,
            "gflops_median": flops / median(times) / 1e9, "s": times}


def matmul_peaks(dtypes, device: str, quick: bool) -> dict:
    """matmul_peak of each dtype, measured here and now (n 512 with --quick, 2048 on a CPU, 8192 on a GPU)."""
    n = 512 if quick else 8192 if str(device).startswith("cuda") else 2048
    peaks = {d: matmul_peak(d, device, n) for d in dtypes}
    say("  matmul peak: " + ", ".join(f"{d} {p['gflops']:,.1f} GFLOP/s" for d, p in peaks.items()) + f" ({n}^2)")
    return peaks


def peaks_note(peaks: dict, counting: str) -> str:
    """The line under a table of GFLOP/s: the matmul peaks measured in the run, the FLOP formula and `counting` (how
    the section counts its FLOPs)."""
    first = next(iter(peaks.values()))
    return (f"\nMatmul peak measured in this run ({first['n']} x {first['n']}, best of {first['repeats']}"
            f"{', before and after the runs' if 'gflops_measured' in first else ''}): "
            + ", ".join(f"{d} {fmt(x['gflops'], 1)} GFLOP/s" for d, x in peaks.items()) + ". " + FLOP_FORMULA + "; "
            + counting)


def best_peaks(before: dict, after: dict) -> dict:
    """Each dtype's higher peak of two measures (before and after a section's runs), both kept: on a shared machine
    one measure can land on a slow moment, and a share of a peak measured low would read too high."""
    out = {}
    for d, a in before.items():
        b = after[d]
        out[d] = {**(a if a["gflops"] >= b["gflops"] else b), "gflops_measured": [a["gflops"], b["gflops"]]}
    say("  matmul peak (the better of before and after): " + ", ".join(f"{d} {p['gflops']:,.1f} GFLOP/s"
                                                                          for d, p in out.items()))
    return out


def model_shape(model) -> dict:
    """What the FLOP counts need of a causal LM: its parameters, those outside the embeddings (the tied or untied
    output layer and the input embedding left out), the output layer's vocab x hidden, layers, heads x head dim."""
    cfg = model.config.get_text_config()
    emb = {id(w): w.numel() for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    params = sum(p.numel() for p in model.parameters())
    vocab, hidden = model.get_output_embeddings().weight.shape
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"params": params, "params_non_embedding": params - sum(emb.values()), "vocab": int(vocab),
            "hidden": int(hidden), "layers": cfg.num_hidden_layers, "attention_width": heads * head_dim}


def forward_flops(shape: dict, positions: int, head_positions: int, seq_len: int) -> float:
    """FLOPs of a forward pass over `positions` positions of rows of `seq_len`, the output layer at `head_positions`
    of them: 2 N P + 2 V H P_head + 4 L T d P (see FLOP_FORMULA)."""
    return float(2 * shape["params_non_embedding"] * positions + 2 * shape["vocab"] * shape["hidden"] * head_positions
                 + 4 * shape["layers"] * seq_len * shape["attention_width"] * positions)


def train_flops(shape: dict, positions: int, head_positions: int, seq_len: int) -> float:
    """FLOPs of a training step: forward and backward, three forwards."""
    return 3 * forward_flops(shape, positions, head_positions, seq_len)


# -- memory ---------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """High-water mark of this process's resident set (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best we have
        return peak_rss_mb()


class Memory:
    """Peak memory of what follows `mark()`: process RSS on CPU, torch.cuda.max_memory_allocated on CUDA."""

    def __init__(self, device):
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def mark(self) -> dict:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            base = current_rss_mb()
        self.base = base
        return {"baseline_mb": base, "peak_rss_at_baseline_mb": peak_rss_mb()}

    def report(self) -> dict:
        out = {"peak_rss_mb": peak_rss_mb(), "baseline_mb": self.base, "kind": "cuda_allocated" if self.cuda else "rss"}
        if self.cuda:
            import torch

            out["peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            out["peak_mb"] = out["peak_rss_mb"]
        out["delta_mb"] = out["peak_mb"] - self.base
        return out


# -- the machine ----------------------------------------------------------------------------------
def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return None


def machine_info() -> dict:
    import numpy
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for mod in ("accelerate", "zarr", "pyarrow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


# -- tiny models and data, built here (mft_cache.testing: the same builders as the tests) ----------------
def make_texts(n: int, seed: int = 0) -> list[str]:
    """Longer documents than the tests' (60-400 words), so rows fill up."""
    from mft_cache.testing import make_texts

    return make_texts(n, seed, min_words=60, max_words=400)


def write_texts(path: Path, n: int, seed: int = 0) -> Path:
    from mft_cache.testing import write_jsonl

    return path if path.exists() else write_jsonl(path, make_texts(n, seed))


def build_llama(vocab_size: int, hidden: int = 128, layers: int = 2, seed: int = 0):
    """A tiny random Llama in memory, tied embeddings (like SmolLM2 and Gemma)."""
    from mft_cache.testing import build_model

    return build_model("llama", vocab_size, seed, hidden=hidden, layers=layers, max_positions=4096, tied=True)


def make_tiny_model(folder: Path, vocab_size: int = 512, hidden: int = 64, layers: int = 2) -> Path:
    """A saved tiny Llama with a BOS-adding BPE tokenizer (for --quick and when assets/ is absent)."""
    from mft_cache.testing import make_model

    return make_model(folder, "llama", vocab_size, tokenizer_vocab=min(vocab_size, 4096), hidden=hidden,
                      layers=layers, max_positions=4096, tied=True)


def synthetic_rows(num_rows: int, seq_len: int, vocab_size: int, k: int, seed: int = 0) -> dict:
    """Valid cache rows (numpy, the schema's fields) with random values: distinct top-k ids sorted by
    descending log-prob, probabilities summing below 1, the label's log-prob consistent with the top-k
    (its own value where it is in the top-k, below the k-th elsewhere); the label is the top-1 half the time."""
    import numpy as np

    from mft_cache.storage.schema import id_dtype

    rng = np.random.default_rng(seed)
    p = seq_len - 1
    input_ids = rng.integers(0, vocab_size, size=(num_rows, seq_len))
    labels = input_ids[:, 1:]  # (R, P)
    # distinct ids: base + j * stride (mod V) with a stride coprime to V
    stride = 7919 if vocab_size % 7919 else 7907
    top1 = np.where(rng.random((num_rows, p)) < 0.5, labels, rng.integers(0, vocab_size, size=(num_rows, p)))
    ids = (top1[..., None] + np.arange(k) * stride) % vocab_size  # (R, P, K)
    logits = np.sort(rng.normal(0, 2, size=(num_rows, p, k + 1)), axis=-1)[..., ::-1]  # last column: the tail
    logits[..., 0] += 2.0
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # (R, P, K+1) sums to 1 with the tail
    topk_lp = lp[..., :k]
    where = ids == labels[..., None]
    label_lp = np.where(where.any(-1), (topk_lp * where).sum(-1), lp[..., k] - 3.0)  # outside: part of the tail
    dt = id_dtype(vocab_size)
    return {
        "input_ids": input_ids.astype(dt),
        "length": np.full(num_rows, seq_len, dtype=np.int32),
        "topk_ids": ids.astype(dt),
        "topk_logprobs": topk_lp.astype(np.float32),
        "label_logprob": label_lp.astype(np.float32),
    }


# -- child processes ------------------------------------------------------------------------------
def run_child(script: str, spec: dict, log_path: Path, timeout: float = 1800) -> dict:
    """Run bench/<script> with a JSON spec in a fresh process; return the JSON it wrote."""
    out = log_path.with_suffix(".json")
    out.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), json.dumps(spec), str(out)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"bench/{script} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(out.read_text())


def child_main(fn) -> None:
    """Entry point of a child script: argv = [spec JSON, output path]."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    threads = spec.get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    result = fn(spec)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
