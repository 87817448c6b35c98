"""Values nobody means, runs reproduced on a cache that changed, evaluations of nothing, and the Python API given
what the command line refuses. Each is refused naming the flag or the argument (exit 2 for a command) before any
work, or recorded as what it is (null), never as a number it is not."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import SMALL_RUN, config_json, read_manifest, resign, train_args
from mft_cache.cli import main


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


# -- sizes: refused at once, not after minutes and a MemoryError --------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--batch-size", str(10**12)], "--batch-size must be at most 65,536"),
    (["--grad-accum", str(10**20)], "--grad-accum must be at most 65,536"),
    (["--eval-batch-size", str(10**12)], "--eval-batch-size must be at most 65,536"),
    (["--chunk-size", str(10**12)], "--chunk-size must be at most"),
    (["--lora-rank", str(10**9), "--peft", "lora"], "--lora-rank must be at most 65,536"),
    (["--seq-len", str(10**12)], "--seq-len must be at most"),
    (["--batch-size", "4096", "--grad-accum", "4096"], "sequences per step; at most 1,048,576"),
    (["--seed", str(2**40)], "--seed must be in [0, 4294967295]"),
])
def test_an_absurd_size_is_refused_before_any_work(args, message, run_cache, tmp_path, capsys, monkeypatch,
                                                   reliability):
    def boom(*a, **k):
        raise AssertionError("the run started before the refusal")

    monkeypatch.setattr("mft_cache.trainer.train.open_training_rows", boom)
    out = tmp_path / "run"
    assert main([*train_args(run_cache, out, **SMALL_RUN), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists(), err
    reliability("hostile input", f"`mft train {' '.join(args)}`", f"exit 2 at once: \"{message}\"; nothing "
                "read or written")


# -- --teacher online: rows no longer than the model allows, as `mft cache` refuses them ---------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_online_seq_len_above_the_models_positions_is_refused(kind, llama, gpt2, docs_jsonl, tmp_path, capsys,
                                                              monkeypatch, reliability):
    monkeypatch.setattr("mft_cache.trainer.train.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    model = {"gpt2": gpt2, "llama": llama}[kind]  # max positions 256 (GPT-2 n_positions, Llama max_position_embeddings)
    out = tmp_path / "run"
    assert main(["train", "--teacher", "online", "--model", str(model), "--data", str(docs_jsonl), "--objective", "ft",
                 "--steps", "1", "--seq-len", "257", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--seq-len 257 exceeds the model's maximum of 256 positions" in err and "Traceback" not in err, err
    assert not out.exists()
    reliability("hostile input", f"`mft train --teacher online --seq-len 257` with a {kind} of 256 positions",
                "exit 2: \"--seq-len 257 exceeds the model's maximum of 256 positions\", before a model loads")


def test_the_online_default_seq_len_is_checked_too(docs_jsonl, tmp_path, capsys, reliability):
    from mft_cache.testing import make_model

    short = make_model(tmp_path / "short", "gpt2", max_positions=64)
    assert main(["train", "--teacher", "online", "--model", str(short), "--data", str(docs_jsonl), "--objective",
                 "ft", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--seq-len (default with --teacher online) 256 exceeds the model's maximum of 64 positions" in err, err
    reliability("hostile input", "`mft train --teacher online` without --seq-len on a model of 64 positions",
                "exit 2 naming `--seq-len` and its default (256) against the model's maximum")


# -- reproducing a run (`--config RUN/config.json`) on a cache rebuilt since ----------------------------------------
def test_reproducing_a_run_refuses_a_cache_rebuilt_since(finished_run, run_cache, tmp_path, capsys, reliability):
    rebuilt = tmp_path / "cache"
    shutil.copytree(run_cache, rebuilt)
    resign(rebuilt, lambda m: m["created_by"].update(torch="another build"))  # same rows, another manifest
    recorded, now = config_json(finished_run)["cache_manifest_sha256"], read_manifest(rebuilt)["manifest_sha256"]
    assert recorded == read_manifest(run_cache)["manifest_sha256"] != now
    reproduce = ["train", "--config", str(finished_run / "config.json"), "--steps", "1", "--save-every", "0"]

    assert main([*reproduce, "--cache", str(rebuilt), "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert f"its manifest sha256 is {now}" in err and f"manifest sha256 {recorded}" in err, err
    assert "--allow-changed-cache" in err and "Traceback" not in err and not (tmp_path / "r1").exists()

    assert main([*reproduce, "--cache", str(rebuilt), "--out", str(tmp_path / "r2"), "--allow-changed-cache"]) == 0
    c = config_json(tmp_path / "r2")
    assert (c["cache_manifest_sha256"], c["allow_changed_cache"]) == (now, True)

    # the run's own cache passes the same check
    assert main([*reproduce, "--out", str(tmp_path / "r3")]) == 0
    assert config_json(tmp_path / "r3")["cache_manifest_sha256"] == recorded
    reliability("mismatch", "`mft train --config RUN/config.json` after the cache at that path was rebuilt (another "
                "manifest sha256)", "exit 2 naming both manifest sha256s and `--allow-changed-cache`, nothing "
                "written; with the flag it trains and config.json records both")


def test_a_reproduction_does_not_inherit_allow_changed_cache(finished_run, run_cache, tmp_path, capsys,
                                                              reliability):
    """A run made with --allow-changed-cache records it; reproducing that run asks for the flag again. A recorded
    cache_manifest_sha256 that is no sha256 is refused naming the file and the key."""
    import json

    record = config_json(finished_run) | {"allow_changed_cache": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    rebuilt = tmp_path / "cache"
    shutil.copytree(run_cache, rebuilt)
    resign(rebuilt, lambda m: m["created_by"].update(torch="another build"))
    assert main(["train", "--config", str(path), "--cache", str(rebuilt), "--out", str(tmp_path / "r")]) == 2
    assert "--allow-changed-cache" in capsys.readouterr().err and not (tmp_path / "r").exists()
    path.write_text(json.dumps(record | {"cache_manifest_sha256": "../../etc"}))
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(path), "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "cache_manifest_sha256 must be a sha256" in capsys.readouterr().err
    reliability("mismatch", "reproducing a run that was made with `--allow-changed-cache`, or whose config.json "
                "records a cache_manifest_sha256 that is no sha256", "refused (exit 2): the flag must be given again; "
                "the key named")


# -- an evaluation set with no position to evaluate: no perplexity, not perplexity 1 ---------------------------------
def test_an_evaluation_set_without_a_trained_position_is_refused(run_cache, run_docs, tmp_path, capsys, monkeypatch,
                                                                 reliability):
    from mft_cache.trainer import inputs

    real = inputs._rows

    def without_labels(cfg, source, tokenizer, seq_len, what, spec_of=None):
        packed = real(cfg, source, tokenizer, seq_len, what, spec_of)
        if what == "--eval-specialized":
            packed.trained = np.zeros((packed.num_sequences, seq_len - 1), dtype=bool)
        return packed

    monkeypatch.setattr(inputs, "_rows", without_labels)
    out = tmp_path / "run"
    assert main(train_args(run_cache, out, "--eval-specialized", str(run_docs), "--eval-general", str(run_docs),
                           **{**SMALL_RUN, "steps": 2, "eval_every": 1})) == 2
    err = capsys.readouterr().err
    assert "--eval-specialized" in err and "no position to evaluate" in err and "Traceback" not in err, err
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    reliability("numerics", "`--eval-specialized` whose rows hold no trained position",
                "exit 2 naming the flag before the first step (never perplexity 1.0 and S 0.0)")


def test_an_evaluation_of_nothing_is_null_not_perplexity_1(llama, run_docs, reliability):
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from mft_cache.models import load_tokenizer
    from mft_cache.rows import build_rows
    from mft_cache.trainer.checkpoint import TrainState
    from mft_cache.trainer.data import Rows
    from mft_cache.trainer.evaluate import evaluate_perplexity_se, perplexity_se
    from mft_cache.trainer.loss_module import StudentLoss
    from mft_cache.trainer.train import score

    packed = build_rows(str(run_docs), load_tokenizer(str(llama)), 32, what="--eval-specialized")[0]
    packed.trained = np.zeros((packed.num_sequences, 31), dtype=bool)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    assert evaluate_perplexity_se(StudentLoss(model, 64), Rows(packed), 4, Accelerator(cpu=True)) == (None, None)
    assert perplexity_se(torch.zeros(6, dtype=torch.float64)) == (None, None)
    state = TrainState()
    first = score({"step": 0, "ppl_specialized": None, "ppl_general": 20.0}, state)
    later = score({"step": 1, "ppl_specialized": None, "ppl_general": 22.0}, state)
    assert (first["S"], later["S"], later["ratio"]) == (None, None, None) and later["DG"] == pytest.approx(0.1)
    reliability("numerics", "an evaluation (API, or a set that reaches the loop) with no trained position",
                "perplexity, S and DG/S recorded as null with a warning, never perplexity 1.0 and S 0.0")


# -- the API checks what the command line checks ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"tau": float("nan")}, "tau"), ({"tau": 1.5}, "tau"), ({"tau": "0.5"}, "tau"), ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"), ({"top_k": True}, "top_k"), ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 1.5}, "chunk_size"), ({"impl": "transformers"}, "impl"), ({"objective": "mtf"}, "objective"),
    ({"tail": "none"}, "tail"), ({"vocab_size": 0}, "vocab_size"),
])
def test_mft_loss_refuses_an_invalid_argument_naming_it(kwargs, name, reliability):
    from mft_cache.hf import MFTLoss

    with pytest.raises(ValueError, match=f"MFTLoss: {name} must"):
        MFTLoss(**kwargs)
    reliability("hostile input", f"`MFTLoss({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})`",
                f"ValueError naming `{name}` and its range")


def test_the_student_loss_refuses_a_chunk_size_below_1(llama):
    from transformers import AutoModelForCausalLM

    from mft_cache.trainer.loss_module import StudentLoss

    model = AutoModelForCausalLM.from_pretrained(llama)
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            StudentLoss(model, bad)


def test_the_api_refuses_a_student_that_does_not_match_the_cache(cache, llama, gpt2, tmp_path, reliability):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from mft_cache.hf import CacheDataset, MFTLoss, MFTTrainer, collate
    from mft_cache.testing import build_model

    other = build_model("llama", 400)  # the cache's teacher predicts 300 tokens
    with pytest.raises(ValueError, match="model: predicts a vocabulary of 400 tokens"):
        CacheDataset(cache, model=other)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to="none", max_steps=1)
    with pytest.raises(ValueError, match="model: predicts a vocabulary of 400 tokens"):
        MFTTrainer(model=other, args=args, train_dataset=CacheDataset(cache))
    student = AutoModelForCausalLM.from_pretrained(llama)
    with pytest.raises(ValueError, match="mft_loss: top_k 64 exceeds the top-k of 16"):
        MFTTrainer(model=student, args=args, train_dataset=CacheDataset(cache), mft_loss=MFTLoss(top_k=64))
    with pytest.raises(ValueError, match="processing_class: not the tokenizer"):
        MFTTrainer(model=student, args=args, train_dataset=CacheDataset(cache),
                   processing_class=AutoTokenizer.from_pretrained(gpt2))
    trainer = MFTTrainer(model=student, args=args, train_dataset=CacheDataset(cache),
                         processing_class=AutoTokenizer.from_pretrained(llama))
    assert trainer.mft_loss.vocab_size == 300  # from the cache: a model of another vocabulary is refused at every call
    with pytest.raises(ValueError, match="model: predicts a vocabulary of 400 tokens"):
        trainer.mft_loss(other, collate([CacheDataset(cache)[i] for i in range(2)]))
    reliability("mismatch", "`CacheDataset(model=)`, `MFTTrainer` and `MFTLoss` given a student of another "
                "vocabulary or tokenizer, or a top_k above the cache's", "ValueError naming `model`, "
                "`processing_class` or `top_k`, as `mft train` refuses them")
