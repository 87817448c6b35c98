"""Tiny random models built from config, tokenizers trained on the spot, and data made by the tests.
Nothing downloads."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is faster, and subprocesses inherit it

import torch  # noqa: E402

torch.set_num_threads(1)

WORDS = ("licence software copyright permission warranty liability notice redistribution source binary "
         "the a of to and in is that for with as without any distribute modify use copy merge publish grant "
         "holder contributor condition disclaimer implied fitness particular purpose damages contract tort").split()


def make_texts(n: int, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def unpack_stream(packed):
    """The token stream back from the rows: each row's real tokens, minus the BOS a continuation row starts with."""
    starts = set(packed.doc_offsets[:-1].tolist())
    out, p = [], 0
    for row, n in zip(packed.input_ids, packed.lengths):
        seg = row[:n] if packed.bos_id is None or p in starts else row[1:n]
        out.append(seg)
        p += len(seg)
    return np.concatenate(out)


def make_tokenizer(folder: Path, bos: bool, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(make_texts(200, seed=123), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def make_model(folder: Path, kind: str, vocab_size: int = 300, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, Gemma3TextConfig, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, bos=kind != "gpt2")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False, **ids)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids)
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                               sliding_window=64, **ids)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # a peakier random distribution than the default init, so top-k means something
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder


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


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one state per process; each in-process training run gets a fresh one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# -- the reliability table (issue 7): tests record each fault they injected once its outcome is checked --
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
             "| area | fault or input | outcome (checked) | test |", "|---|---|---|---|"]
    lines += [f"| {r['area']} | {r['fault']} | {r['outcome']} | `{r['test'].split('::', 1)[-1]}` |" for r in rows]
    Path(path).write_text("\n".join(lines) + "\n")
