"""bfloat16 on CPUs that compute it natively: the capability detection and what `auto` resolves to, the fused loss
under bf16 autocast against a float64 dense reference, short bf16 training runs against float32 ones, and a
bf16-teacher cache against a float32-teacher cache of the same model.

Tolerances, as measured here (each bound a few times the largest error seen): the loss under autocast within 2e-3
relative of the float64 reference (seen: 2e-4), its gradients within 1e-2 relative in norm (seen: 4.5e-3) and each
entry within 2e-2 of the largest (seen: 7.6e-3); a bf16 run's step losses within 1e-3 relative of the float32 run's
(seen: 7e-5); a bf16 teacher's top-1 agrees with the float32 teacher's at >= 95% of the trained positions (seen: 98.2%),
its label log-prob within 0.05 (seen: 0.018), 0.01 on average (seen: 0.0035)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mft_cache import models
from mft_cache.cli import main
from mft_cache.trainer import loss as L
from mft_cache.trainer.config import TrainConfig, resolve_mixed_precision
from mft_cache.trainer.targets import TeacherTargets
from mft_cache.trainer.train import train

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture(autouse=True)
def _fresh_detection():
    """Each test detects again: the detection is cached per process."""
    models.detect_native_bf16.cache_clear()
    yield
    models.detect_native_bf16.cache_clear()


def machine(monkeypatch, system: str, arch: str, flags=(), feat_bf16: bool = False) -> None:
    """Pretend to be a `system`/`arch` machine whose CPU lists `flags` (Linux) or reports FEAT_BF16 (macOS)."""
    monkeypatch.delenv(models.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(models, "platform", SimpleNamespace(system=lambda: system, machine=lambda: arch))
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(models, "apple_feat_bf16", lambda: feat_bf16)


# -- detection --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("system, arch, flags, feat, native", [
    ("Linux", "x86_64", {"avx2", "avx512f", "avx512_bf16"}, False, True),  # Cooper Lake, Zen 4 and later
    ("Linux", "x86_64", {"avx2", "avx512f", "amx_tile", "amx_bf16"}, False, True),  # Sapphire Rapids and later
    ("Linux", "x86_64", {"avx2", "avx512f", "avx512_vnni"}, False, False),  # AVX-512 without bf16
    ("Linux", "x86_64", {"avx2", "fma"}, False, False),  # AVX2 only: bf16 is emulated, slower than float32
    ("Linux", "aarch64", {"bf16", "sve"}, False, False),
    ("Darwin", "arm64", (), True, True),  # M2 and later
    ("Darwin", "arm64", (), False, False),  # M1
    ("Darwin", "x86_64", (), True, False),
    ("Windows", "ARM64", (), False, False),
])
def test_native_bf16_is_detected_from_the_cpu(monkeypatch, system, arch, flags, feat, native):
    machine(monkeypatch, system, arch, flags, feat)
    assert models.native_bf16() is native
    assert models.resolve_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)
    assert resolve_mixed_precision("auto", CPU) == ("bf16" if native else "no")


def test_environment_overrides_the_detection(monkeypatch):
    machine(monkeypatch, "Linux", "x86_64", {"avx2"})
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert models.native_bf16() and models.resolve_dtype("auto", CPU) == torch.bfloat16
    assert resolve_mixed_precision("auto", CPU) == "bf16"
    machine(monkeypatch, "Linux", "x86_64", {"avx512_bf16", "amx_bf16"})
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert not models.native_bf16() and models.resolve_dtype("auto", CPU) == torch.float32
    assert resolve_mixed_precision("auto", CPU) == "no"
    monkeypatch.setenv(models.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="MFT_CPU_BF16='?yes'?: expected 1"):
        models.native_bf16()


def test_auto_elsewhere_and_explicit_choices(monkeypatch):
    machine(monkeypatch, "Linux", "x86_64", {"avx512_bf16"})
    assert models.resolve_dtype("auto", CUDA) == torch.bfloat16  # every GPU, whatever the CPU
    assert models.resolve_dtype("auto", MPS) == torch.float32
    assert models.resolve_dtype("float32", CPU) == torch.float32
    assert models.resolve_dtype("float16", CPU) == torch.float16
    assert resolve_mixed_precision("auto", MPS) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_mixed_precision("auto", CUDA) == "bf16"  # asked without emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_mixed_precision("auto", CUDA) == "no"  # emulated only (before Ampere)
    for name in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(name, CPU) == name
    with pytest.raises(ValueError, match="--dtype must be one of auto"):
        models.resolve_dtype("bf16", CPU)


def test_what_the_detection_reads(monkeypatch):
    """The real readers: this machine's flags parse, and the macOS sysctl is read as 1 / anything else / missing."""
    models.detect_native_bf16()  # the real detection runs on this machine, whatever it finds
    flags = models.cpu_flags()
    assert isinstance(flags, frozenset)
    if Path("/proc/cpuinfo").exists() and models.platform.machine().lower() in ("x86_64", "amd64"):
        assert "sse2" in flags  # every x86-64 CPU has it: the flags line was found and split
    answers = iter([subprocess.CompletedProcess([], 0, "1\n", ""), subprocess.CompletedProcess([], 0, "0\n", ""),
                    subprocess.CompletedProcess([], 1, "", "unknown oid")])
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: next(answers))
    assert [models.apple_feat_bf16() for _ in range(3)] == [True, False, False]

    def missing(*a, **k):
        raise FileNotFoundError("sysctl")

    monkeypatch.setattr(models.subprocess, "run", missing)
    assert models.apple_feat_bf16() is False


# -- the fused loss under bf16 autocast -------------------------------------------------------------------------
N, H, V, K = 41, 24, 97, 6


def loss_case(seed: int, kind: str):
    """hidden (N, H), head (V, H) and bias, labels, mask and the TeacherTargets of one `kind`, plus the full teacher."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) * 0.4, torch.randn(V, generator=g) * 0.1
    full = torch.log_softmax(torch.randn(N, V, generator=g) * 3, dim=-1)  # (N, V)
    labels = torch.where(torch.rand(N, generator=g) < 0.5, full.argmax(-1), torch.randint(0, V, (N,), generator=g))
    mask = torch.rand(N, generator=g) > 0.2
    w = torch.rand(N, generator=g)
    lp, ids = full.topk(K, dim=-1)
    targets = {"none": None, "dense": TeacherTargets(w, None, full),
               "sparse": TeacherTargets(w, ids, lp, full.gather(1, labels[:, None])[:, 0])}[kind]
    return hidden, weight, bias, labels, mask, targets, full


def dense_reference(hidden, weight, bias, labels, mask, targets, full) -> torch.Tensor:
    """The summed loss in float64 over the whole vocabulary: the target spelled out densely per row (S = top-k ∪
    {label} of the cached teacher, and one tail bucket holding the mass outside S)."""
    logq = torch.log_softmax(hidden.double() @ weight.double().T + bias.double(), dim=-1)  # (N, V)
    rows = torch.arange(N)
    nll = -logq[rows, labels]  # (N,)
    if targets is None:
        return nll[mask].sum()
    w = targets.weight.double()
    if targets.kind == "dense":
        ce = -(full.double().exp() * logq).sum(-1)
    else:
        in_s = torch.zeros(N, V, dtype=torch.bool).scatter_(1, targets.topk_ids, True)
        p_s = torch.zeros(N, V, dtype=torch.float64).scatter_(1, targets.topk_ids, targets.logprobs.double().exp())
        label_extra = torch.where(in_s[rows, labels], 0.0, targets.label_logprob.double().exp())
        p_s[rows, labels] += label_extra
        in_s[rows, labels] = True
        m = (1 - p_s.sum(-1)).clamp_min(0)  # (N,) the teacher's mass off S
        log_q_tail = torch.logsumexp(logq.masked_fill(in_s, float("-inf")), dim=-1)
        ce = -(p_s * logq).sum(-1) - m * log_q_tail
    return ((1 - w) * ce + w * nll)[mask].sum()


def value_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [x.grad for x in leaves]


def close_gradients(got: list, want: list) -> None:
    """bf16 gradients against the reference's: within 1e-2 relative in norm, each entry within 2e-2 of the largest
    (measured: 4.5e-3 and 7.6e-3 at most)."""
    for g, w in zip(got, want):
        assert (g - w).norm() <= 1e-2 * w.norm()
        torch.testing.assert_close(g, w, rtol=0, atol=2e-2 * w.abs().max().item())


@pytest.mark.parametrize("kind", ["sparse", "dense", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_loss_under_bf16_autocast_matches_a_float64_reference(kind, seed):
    hidden, weight, bias, labels, mask, targets, full = loss_case(seed, kind)

    def fused(h, w, b):
        return L.fused_linear_mft_loss(h, w, b, labels, mask, targets, chunk_size=8)

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)
        return run

    ref, ref_grads = value_and_grads(lambda h, w, b: dense_reference(h, w, b, labels, mask, targets, full),
                                     hidden, weight, bias)
    fp32, fp32_grads = value_and_grads(fused, hidden, weight, bias)
    bf16, bf16_grads = value_and_grads(under_autocast(fused), hidden, weight, bias)
    assert bf16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in bf16_grads)  # the inputs' dtypes
    torch.testing.assert_close(fp32.double(), ref, rtol=1e-5, atol=1e-5)
    assert bf16 != fp32  # the output layer's matmul ran in bf16
    torch.testing.assert_close(bf16.double(), ref, rtol=2e-3, atol=0)  # measured: <= 2e-4
    close_gradients(bf16_grads, ref_grads)
    # the checkpointed engine (any head) computes the same under autocast: bf16 logits, float32 loss math
    def chunked_loss(h, w, b):
        return L.chunked_mft_loss(h, lambda x: torch.nn.functional.linear(x, w, b), labels, mask, targets, chunk_size=8)

    chunked, chunked_grads = value_and_grads(under_autocast(chunked_loss), hidden, weight, bias)
    torch.testing.assert_close(chunked, bf16, rtol=1e-5, atol=1e-5)
    close_gradients(chunked_grads, ref_grads)


def test_evaluation_under_autocast_gives_the_same_loss():
    """No gradient (evaluation): the same bf16 matmul and float32 loss as in training."""
    hidden, weight, bias, labels, mask, targets, _ = loss_case(0, "dense")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            evaluated = L.fused_linear_mft_loss(hidden, weight, bias, labels, mask, targets, chunk_size=8)
        trained = L.fused_linear_mft_loss(hidden, weight.requires_grad_(), bias, labels, mask, targets, chunk_size=8)
    torch.testing.assert_close(evaluated, trained.detach(), rtol=1e-6, atol=1e-6)


# -- training ---------------------------------------------------------------------------------------------------
SETUPS = {"cache": {}, "lora": {"peft": "lora"}, "checkpointing": {"gradient_checkpointing": True},
          "online": {"teacher": "online"}}


def fresh_accelerate() -> None:
    """Accelerate keeps one state per process, its mixed precision included: the next run in this test starts anew."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def short_run(out: Path, cache: Path, llama: Path, docs: Path, setup: str, precision: str) -> list[float]:
    kw = dict(SETUPS[setup])
    if kw.get("teacher") == "online":
        kw.update(model=str(llama), data=str(docs), seq_len=32)
    train(TrainConfig(cache=str(cache), out=str(out), steps=3, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=100,
                      save_every=0, log_every=100, mixed_precision=precision, **kw))
    fresh_accelerate()
    return train_losses(out)


def train_losses(out: Path) -> list[float]:
    lines = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [x["loss"] for x in lines if x["type"] == "train"]


@pytest.mark.parametrize("setup", list(SETUPS))
def test_bf16_training_on_cpu_follows_float32(setup, text_cache, llama, docs_jsonl, tmp_path, monkeypatch):
    """--mixed-precision auto on a CPU without native bf16 is float32, on one with it bf16 (config.json records
    which); both train, with step losses within 1e-3 of each other."""
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    fp32 = short_run(tmp_path / "fp32", text_cache, llama, docs_jsonl, setup, "auto")
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    bf16 = short_run(tmp_path / "bf16", text_cache, llama, docs_jsonl, setup, "auto")
    for run, recorded in (("fp32", "no"), ("bf16", "bf16")):
        assert json.loads((tmp_path / run / "config.json").read_text())["mixed_precision"] == recorded
    assert len(bf16) == 3 and all(np.isfinite(bf16))
    assert bf16 != fp32  # autocast reached the student
    np.testing.assert_allclose(bf16, fp32, rtol=1e-3)


def test_a_run_of_auto_reproduces_with_what_it_chose(text_cache, tmp_path, monkeypatch, capsys):
    """`--config RUN/config.json` reruns what auto chose (bf16), on a machine that would choose otherwise; --resume
    with --mixed-precision auto where it resolves the same accepts the run."""
    flags = ["--steps", "2", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "1", "--save-every", "0",
             "--log-every", "100", "--eval-every", "100"]
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "a"), "--mixed-precision", "auto",
                 *flags]) == 0
    fresh_accelerate()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["mixed_precision"] == "bf16"
    assert main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "a"), "--mixed-precision", "auto",
                 "--resume", *flags]) == 0  # finished, same configuration: nothing to do
    fresh_accelerate()
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert main(["train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")]) == 0
    fresh_accelerate()
    a, b = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("a", "b"))
    assert b["mixed_precision"] == "bf16" and {**a, "out": None} == {**b, "out": None}
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "a"), "--mixed-precision", "auto",
                 "--resume", *flags]) == 2  # resolved to no here: another configuration than the run's
    assert "'mixed_precision'" in capsys.readouterr().err


# -- the teacher in bf16 ----------------------------------------------------------------------------------------
def test_bf16_teacher_cache_is_close_to_the_float32_one(llama, docs_jsonl, text_cache, tmp_path, monkeypatch):
    """The same cache (text_cache's options) with the teacher in bf16 (`--dtype auto` on a native-bf16 CPU): top-1
    agrees at >= 95% of the trained positions, the label log-prob is within 0.05 (mean 0.01); mft inspect shows
    each teacher's dtype."""
    from mft_cache.pipeline.cache import CacheConfig, build_cache
    from mft_cache.pipeline.inspect import cache_stats, format_stats
    from mft_cache.storage import open_cache

    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    build_cache(CacheConfig(model=str(llama), data=str(docs_jsonl), out=str(tmp_path / "bf16"), seq_len=32, top_k=16))
    stats = {name: cache_stats(folder) for name, folder in (("fp32", text_cache), ("bf16", tmp_path / "bf16"))}
    assert stats["fp32"]["teacher_dtype"] == "float32" and stats["bf16"]["teacher_dtype"] == "bfloat16"
    assert "teacher dtype" in format_stats(stats["bf16"]) and "bfloat16" in format_stats(stats["bf16"])
    fp32, bf16 = (next(open_cache(f).iter_shards()) for f in (text_cache, tmp_path / "bf16"))
    assert np.array_equal(fp32["input_ids"], bf16["input_ids"])
    trained = fp32["label_mask"]
    top1 = (fp32["topk_ids"][..., 0] == bf16["topk_ids"][..., 0])[trained]
    diff = np.abs(fp32["label_logprob"].astype(np.float64) - bf16["label_logprob"])[trained]
    assert top1.mean() >= 0.95
    assert diff.max() <= 0.05 and diff.mean() <= 0.01
    assert diff.max() > 0  # the teacher's pass did run in bf16
