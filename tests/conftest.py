"""Tiny random models built from config, tokenizers trained on the spot, and data made by the tests.
Nothing downloads."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is faster, and subprocesses inherit it
# as on a CPU without native bf16 (`--dtype auto` gives float32 teachers): the same values on every machine;
# tests/test_bf16.py sets it per test
os.environ.setdefault("MFT_CPU_BF16", "0")

import torch  # noqa: E402

torch.set_num_threads(1)

from mft_cache.testing import make_model, make_texts, make_tokenizer, write_jsonl  # noqa: E402,F401 (tests import them from here)

from helpers import SMALL_CACHE, SMALL_RUN, cli, subprocess_env, train_args  # noqa: E402


def unpack_stream(packed):
    """The token stream back from the rows: each row's real tokens, minus the BOS a continuation row starts with."""
    starts = set(packed.doc_offsets[:-1].tolist())
    out, p = [], 0
    for row, n in zip(packed.input_ids, packed.lengths):
        seg = row[:n] if packed.bos_id is None or p in starts else row[1:n]
        out.append(seg)
        p += len(seg)
    return np.concatenate(out)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama(models_dir) -> Path:
    return make_model(models_dir / "llama", "llama")


@pytest.fixture(scope="session")
def gpt2(models_dir) -> Path:
    return make_model(models_dir / "gpt2", "gpt2")


@pytest.fixture(scope="session")
def gemma_big(models_dir) -> Path:
    """Gemma-3-style, tied embeddings, BOS tokenizer, a vocabulary above 65,536 (ids need uint32)."""
    return make_model(models_dir / "gemma3-70k", "gemma3", vocab_size=70_000)


@pytest.fixture(scope="session")
def docs_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", make_texts(24, seed=1))


@pytest.fixture(scope="session")
def text_cache(llama, docs_jsonl, tmp_path_factory) -> Path:
    """A small text cache of docs_jsonl (seq len 32, k 16), read by the cards, config-file, hub, tracking and Trainer
    tests; none of them writes into it."""
    from mft_cache.pipeline.cache import CacheConfig, build_cache

    out = tmp_path_factory.mktemp("hf-caches") / "c"
    build_cache(CacheConfig(model=str(llama), data=str(docs_jsonl), out=str(out), seq_len=32, top_k=16))
    return out


# -- the fault suites' caches and runs (test_faults_*.py, test_attack_*.py): built once, never modified ------------
@pytest.fixture(scope="session")
def fault_docs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("rel-data")
    return {"train": write_jsonl(d / "train.jsonl", make_texts(30, seed=41)),
            "other": write_jsonl(d / "other.jsonl", make_texts(30, seed=42)),
            "spec": write_jsonl(d / "spec.jsonl", make_texts(4, seed=43))}


@pytest.fixture(scope="session")
def fault_cache(llama, fault_docs, tmp_path_factory) -> Path:
    """The cache of fault_docs["train"] with SMALL_CACHE, built in-process: what a killed and rerun build must equal."""
    from mft_cache.pipeline.cache import CacheConfig, build_cache

    out = tmp_path_factory.mktemp("rel-ref") / "cache"
    build_cache(CacheConfig(model=str(llama), data=str(fault_docs["train"]), out=str(out), **SMALL_CACHE))
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) >= 5
    return out


@pytest.fixture(scope="session")
def run_docs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hostile-data") / "train.jsonl", make_texts(12, seed=51))


@pytest.fixture(scope="session")
def run_cache(llama, run_docs, tmp_path_factory) -> Path:
    """Built in-process with SMALL_CACHE, the options the run-folder tests give `mft cache`: the reference a stopped
    and rerun build must equal."""
    from mft_cache.pipeline.cache import CacheConfig, build_cache

    out = tmp_path_factory.mktemp("hostile-cache") / "cache"
    build_cache(CacheConfig(model=str(llama), data=str(run_docs), out=str(out), **SMALL_CACHE))
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) >= 4
    return out


@pytest.fixture(scope="session")
def finished_run(run_cache, tmp_path_factory) -> Path:
    """An uninterrupted SMALL_RUN on run_cache."""
    from mft_cache.cli import main

    out = tmp_path_factory.mktemp("hostile-run") / "run"
    assert main(train_args(run_cache, out, **SMALL_RUN)) == 0
    return out


@pytest.fixture(scope="session")
def killed_run(run_cache, tmp_path_factory) -> Path:
    """A SMALL_RUN SIGKILLed after step 5: complete checkpoints at steps 2 and 4. Tests damage copies of it."""
    out = tmp_path_factory.mktemp("hostile-killed") / "run"
    res = subprocess.run(cli(train_args(run_cache, out, **SMALL_RUN)), capture_output=True, text=True,
                         env=subprocess_env(MFT_FAULT="train:step-5"), timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    return out


@pytest.fixture
def stopped_run(killed_run, tmp_path) -> Path:
    """A copy of killed_run to damage or resume."""
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    return out


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one state per process; each in-process training run gets a fresh one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# -- the reliability table: tests record each fault they injected once its outcome is checked --
_RELIABILITY: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--reliability-report", default="", help="write the table of faults injected and their "
                     "checked outcomes (RELIABILITY.md) to this path")


@pytest.fixture
def reliability(request):
    """record(area, fault, outcome): call it AFTER the assertions that check the outcome."""
    def record(area: str, fault: str, outcome: str) -> None:
        _RELIABILITY.append({"area": area, "fault": fault, "outcome": outcome, "test": request.node.nodeid})

    return record


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--reliability-report", default="")
    if not path or not _RELIABILITY:
        return
    order = ("crash", "corruption", "mismatch", "hostile input", "disk", "numerics", "security")
    rows = sorted(_RELIABILITY, key=lambda r: (order.index(r["area"]) if r["area"] in order else 99, r["test"]))
    failed = session.testsfailed
    lines = ["# Reliability", "",
             "Written by the reliability suite (`make reliability`, the same tests CI runs in `make test`): one row per "
             "fault injected or hostile input tried, recorded by the test only after its checks of the outcome passed.",
             f"This run: {len(rows)} cases, {failed} failing tests in the session.", "",
             (Path(__file__).parent / "threat_model.md").read_text().rstrip(), "", "## Cases", "",
             "| area | fault or input | outcome (checked) | test |", "|---|---|---|---|"]
    lines += [f"| {r['area']} | {r['fault']} | {r['outcome']} | `{r['test'].split('::', 1)[-1]}` |" for r in rows]
    Path(path).write_text("\n".join(lines) + "\n")
