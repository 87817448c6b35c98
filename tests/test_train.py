"""Stage two end to end on tiny models: cache == online teacher, tau=1 == ft, accumulation, resume, refusals."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model, make_texts, write_jsonl
from helpers import cli, subprocess_env, train_args
from mft_cache.cli import main
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.trainer.config import TrainConfig
from mft_cache.trainer.train import train

SEQ = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("train-data")
    return {"train": write_jsonl(d / "train.jsonl", make_texts(16, seed=11)),
            "spec": write_jsonl(d / "spec.jsonl", make_texts(6, seed=12)),
            "gen": write_jsonl(d / "gen.jsonl", make_texts(6, seed=13, min_words=5, max_words=30))}


@pytest.fixture(scope="module")
def full_cache(llama, data, tmp_path_factory) -> Path:
    """k = vocabulary, float32 log-probs: the cache holds the teacher's whole distribution."""
    out = tmp_path_factory.mktemp("caches") / "full"
    build_cache(CacheConfig(model=str(llama), data=str(data["train"]), out=str(out), seq_len=SEQ, top_k=300,
                            logprob_dtype="float32"))
    return out


def run(tmp_path: Path, name: str, **kw) -> tuple[dict, list[dict]]:
    cfg = dict(out=str(tmp_path / name), steps=5, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=100,
               save_every=0, log_every=100)
    cfg.update(kw)
    summary = train(TrainConfig(**cfg))
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, [x for x in lines if x["type"] == "train"]


def losses(lines: list[dict]) -> torch.Tensor:
    return torch.tensor([x["loss"] for x in lines], dtype=torch.float64)


def test_cache_with_k_equal_vocabulary_matches_the_online_teacher(llama, data, full_cache, tmp_path):
    _, cached = run(tmp_path, "cached", cache=str(full_cache))
    _, online = run(tmp_path, "online", teacher="online", model=str(llama), data=str(data["train"]), seq_len=SEQ)
    assert len(cached) == len(online) == 5
    torch.testing.assert_close(losses(cached), losses(online), rtol=1e-4, atol=0)
    assert losses(cached)[-1] < losses(cached)[0]  # it trains


def test_tau_one_from_the_cache_is_plain_finetuning(full_cache, tmp_path):
    _, mft1 = run(tmp_path, "tau1", cache=str(full_cache), tau=1.0)
    ft_summary, ft = run(tmp_path, "ft", cache=str(full_cache), objective="ft")
    assert ft_summary["tau"] == 1.0  # ft is MFT at tau = 1, whatever --tau says
    torch.testing.assert_close(losses(mft1), losses(ft), rtol=1e-6, atol=0)
    _, mft = run(tmp_path, "tau025", cache=str(full_cache), tau=0.25)
    assert not torch.allclose(losses(mft), losses(ft), rtol=1e-3)  # the comparison can fail


def test_accumulation_matches_one_big_batch(full_cache, tmp_path):
    _, big = run(tmp_path, "b4", cache=str(full_cache), batch_size=4, grad_accum=1)
    _, acc = run(tmp_path, "a4", cache=str(full_cache), batch_size=1, grad_accum=4)
    torch.testing.assert_close(losses(acc), losses(big), rtol=1e-5, atol=0)
    w_big = load_file(tmp_path / "b4" / "final" / "model.safetensors")
    w_acc = load_file(tmp_path / "a4" / "final" / "model.safetensors")
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=1e-4, atol=1e-6)


def test_outputs_best_checkpoint_summary_and_plot(llama, data, tmp_path):
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "c"
    build_cache(CacheConfig(model=str(llama), data=str(data["train"]), out=str(cache), seq_len=SEQ, top_k=8))
    summary, lines = run(tmp_path, "r", cache=str(cache), steps=6, eval_every=3, eval_specialized=str(data["spec"]),
                         eval_general=str(data["gen"]), save_every=2)
    out = tmp_path / "r"
    for key in ("objective", "tau", "S", "DG", "ratio", "best_step", "base_ppl_specialized", "base_ppl_general",
                "best_ppl_specialized", "tokens", "wall_time_s"):
        assert key in summary
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["teacher_loaded"] is False and summary["teacher"] == "cache"
    assert summary["tokens"] == lines[-1]["tokens"] > 0
    for line in lines:
        for key in ("step", "loss", "lr", "tokens", "tokens_per_s"):
            assert key in line
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert all("ppl_specialized" in e and "ppl_general" in e for e in evals)
    best = min(evals[1:], key=lambda e: e["ppl_specialized"])
    assert summary["best_step"] == best["step"]
    assert summary["S"] == pytest.approx((evals[0]["ppl_specialized"] - best["ppl_specialized"]) / evals[0]["ppl_specialized"])
    assert summary["DG"] == pytest.approx((best["ppl_general"] - evals[0]["ppl_general"]) / evals[0]["ppl_general"])
    assert summary["ratio"] == pytest.approx(summary["DG"] / summary["S"])
    assert (out / "s_dg.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["num_processes"] == 1
    model = AutoModelForCausalLM.from_pretrained(out / "best")
    assert model.config.vocab_size == 300
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert not (out / "checkpoints").exists()  # finished: no resume state left


@pytest.mark.parametrize("objective", ["distill-partial", "corrective-ft"])
def test_ablations_train(objective, full_cache, tmp_path):
    summary, lines = run(tmp_path, objective, cache=str(full_cache), objective=objective, steps=3)
    assert summary["objective"] == objective and len(lines) == 3
    assert summary["tau"] == (None if objective == "corrective-ft" else 0.25)
    assert all(torch.isfinite(losses(lines)))


def test_bf16_mixed_precision_trains(full_cache, tmp_path):
    _, lines = run(tmp_path, "bf16", cache=str(full_cache), mixed_precision="bf16", steps=3)
    assert all(torch.isfinite(losses(lines)))


EIGHT_STEPS = dict(steps=8, batch_size=2, lr=3e-3, save_every=2, eval_every=4, log_every=100)


@pytest.mark.parametrize("fault", ["train:step-5", pytest.param("train:checkpoint-4", marks=pytest.mark.slow)])  # slow: ~20 s
def test_resume_after_sigkill_matches_an_uninterrupted_run(fault, full_cache, data, tmp_path):
    evals = ["--eval-specialized", str(data["spec"]), "--eval-general", str(data["gen"])]
    env = subprocess_env(MFT_FAULT=fault)
    killed = subprocess.run(cli(train_args(full_cache, tmp_path / "r", *evals, **EIGHT_STEPS)), env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, mid-run
    assert not (tmp_path / "r" / "summary.json").exists()
    saved = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step-??????/*"))
    assert "trainer_state.json" in saved and "model.safetensors" in saved
    assert not [n for n in saved if n.startswith("custom_checkpoint")]  # nothing restored with weights_only=False
    resumed = subprocess.run(cli(train_args(full_cache, tmp_path / "r", *evals, "--resume", **EIGHT_STEPS)),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    clean = subprocess.run(cli(train_args(full_cache, tmp_path / "u", *evals, **EIGHT_STEPS)),
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]

    def metrics(name):
        keep = ("type", "step", "loss", "lr", "tokens", "ppl_specialized", "ppl_general", "S", "DG")
        return [{k: v for k, v in json.loads(x).items() if k in keep}
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert metrics("r") == metrics("u") and len(metrics("u")) == 8 + 3
    a, b = load_file(tmp_path / "r" / "final" / "model.safetensors"), load_file(tmp_path / "u" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("r", "u"))
    assert {k: sa[k] for k in ("S", "DG", "best_step", "tokens")} == {k: sb[k] for k in ("S", "DG", "best_step", "tokens")}


def test_cache_from_another_tokenizer_or_vocabulary_is_refused(full_cache, tmp_path, capsys, reliability):
    other_vocab = make_model(tmp_path / "v512", "llama", vocab_size=512)
    code = main(["train", "--cache", str(full_cache), "--model", str(other_vocab), "--out", str(tmp_path / "a")])
    assert code == 2 and "vocabulary of 512 tokens but the cache was made with 300" in capsys.readouterr().err
    other_tok = make_model(tmp_path / "gpt2", "gpt2")  # same vocabulary size, tokenizer without BOS
    code = main(["train", "--cache", str(full_cache), "--model", str(other_tok), "--out", str(tmp_path / "b")])
    assert code == 2 and "tokenizer differs from the one the cache was made with" in capsys.readouterr().err
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()
    reliability("mismatch", "a student with another vocabulary, or another tokenizer of the same size",
                "refused (exit 2) naming both; no run started")


@pytest.mark.parametrize("tau", ["-0.1", "1.5", "nan"])
def test_tau_outside_the_unit_interval_is_refused(tau, full_cache, tmp_path, capsys):
    code = main(["train", "--cache", str(full_cache), "--tau", tau, "--out", str(tmp_path / "r")])
    assert code == 2 and "--tau must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_existing_run_is_not_overwritten_by_accident(full_cache, tmp_path, capsys):
    run(tmp_path, "r", cache=str(full_cache), steps=2)
    code = main(["train", "--cache", str(full_cache), "--out", str(tmp_path / "r"), "--steps", "2"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    code = main(["train", "--cache", str(full_cache), "--out", str(tmp_path / "r"), "--steps", "3", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "started with another configuration" in err and "'steps'" in err


def test_sweep_reuses_one_cache_and_never_loads_the_teacher(full_cache, data, tmp_path, caplog, monkeypatch):
    import logging

    import mft_cache.models as models
    from mft_cache.trainer.sweep import sweep

    loaded = []
    real = models.load_model
    monkeypatch.setattr("mft_cache.trainer.train.load_model", lambda mid, *a, **k: loaded.append(mid) or real(mid, *a, **k))
    caplog.set_level(logging.INFO)
    cfg = TrainConfig(cache=str(full_cache), out=str(tmp_path / "s"), steps=2, batch_size=2, eval_every=2,
                      save_every=0, eval_specialized=str(data["spec"]), eval_general=str(data["gen"]))
    rows = sweep(cfg, [0.25, 1.0], with_ft=True)
    assert [r["run"] for r in rows] == ["mft-tau0.25", "mft-tau1", "ft"]
    assert len(loaded) == 3  # one student per run, never a teacher: every load is the student (the cache's model)
    assert not any(r["teacher_loaded"] for r in rows)
    assert "the teacher was loaded 0 times" in caplog.text
    out = tmp_path / "s"
    assert json.loads((out / "sweep.json").read_text())["teacher_loads"] == 0
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("run,objective,tau,S,DG,ratio")
    assert (out / "sweep.md").read_text().count("\n") == 5 and (out / "dg_vs_s.png").stat().st_size > 1000
    # tau = 1 and ft see the same data and give the same result
    assert rows[1]["best_ppl_specialized"] == pytest.approx(rows[2]["best_ppl_specialized"], rel=1e-5)


def test_resume_of_a_finished_run_does_nothing(full_cache, tmp_path):
    summary, _ = run(tmp_path, "r", cache=str(full_cache), steps=2)
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    again, _ = run(tmp_path, "r", cache=str(full_cache), steps=2, resume=True)
    assert again == summary and (tmp_path / "r" / "metrics.jsonl").read_bytes() == before
