"""Training in less memory: activation checkpointing, a reduced-precision frozen base under an adapter, the other
optimisers (and their resume), and `mft train --plan`'s estimate."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_texts, write_jsonl
from mft_cache.cli import main
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.testing import build_model
from mft_cache.trainer.config import TrainConfig
from mft_cache.trainer.loss_module import StudentLoss
from mft_cache.trainer.optim import build_optimizer, state_bytes
from mft_cache.trainer.train import enable_checkpointing, prepare_student, train

SEQ = 32


@pytest.fixture(scope="module")
def cache(llama, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("memory")
    data = write_jsonl(d / "train.jsonl", make_texts(16, seed=21))
    out = d / "cache"
    build_cache(CacheConfig(model=str(llama), data=str(data), out=str(out), seq_len=SEQ, top_k=8))
    return out


def _batch(vocab: int, b: int = 2, t: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    length = torch.tensor([t, t - 5][:b])
    mask = torch.arange(t - 1)[None, :] < (length[:, None] - 1)
    return {"input_ids": ids, "length": length, "label_mask": mask}


def _loss_and_grads(model, batch, impl="fused"):
    module = StudentLoss(model, chunk_size=7, impl=impl).train()
    loss, _ = module(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_checkpointing_changes_no_loss_or_gradient(kind, peft):
    vocab = 300
    plain = build_model(kind, vocab, seed=3)
    ckpt = copy.deepcopy(plain)
    enable_checkpointing(ckpt)
    cfg = TrainConfig(peft=peft, lora_rank=4)
    torch.manual_seed(1)  # the adapter's initialisation draws from the global generator: the same for both
    plain = prepare_student(cfg, plain)
    torch.manual_seed(1)
    ckpt = prepare_student(cfg, ckpt)
    if peft != "none":  # LoRA's B starts at zero: make the adapter's own path carry a gradient to A too
        for model in (plain, ckpt):
            torch.manual_seed(5)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(0, 0.02)
    batch = _batch(vocab)
    loss_a, grads_a = _loss_and_grads(plain, batch)
    loss_b, grads_b = _loss_and_grads(ckpt, batch)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-7, msg=n)


def test_checkpointed_training_run_matches_the_plain_one(cache, tmp_path):
    def losses(name, **kw):
        train(TrainConfig(cache=str(cache), out=str(tmp_path / name), steps=4, batch_size=4, lr=3e-3,
                          warmup_steps=1, eval_every=100, save_every=0, log_every=100, **kw))
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([x["loss"] for x in lines if x["type"] == "train"], dtype=torch.float64)

    plain, ckpt = losses("plain"), losses("ckpt", gradient_checkpointing=True)
    assert len(plain) == 4
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=0)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["gradient_checkpointing"] is True


def test_bf16_base_under_lora_trains_and_keeps_the_base_bit_identical(llama):
    from mft_cache.models import load_model

    cfg = TrainConfig(peft="lora", base_dtype="bfloat16", lora_rank=4)
    model = prepare_student(cfg, load_model(str(llama), torch.bfloat16, torch.device("cpu")))
    reference = load_model(str(llama), torch.bfloat16, torch.device("cpu"))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # the adapter stays float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    module = StudentLoss(model, chunk_size=16).train()
    opt = build_optimizer("adamw", trained, 1e-2, 0.0)
    batch = _batch(300)
    losses = []
    for _ in range(3):
        loss, n = module(**batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach() / n))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before)  # the adapter moved
    base = dict(reference.named_parameters())
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in frozen.items():
        key = n.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, base[key]), n  # bit for bit


def test_bf16_base_run_writes_best_and_final(cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = tmp_path / "eval"
    spec = write_jsonl(d / "spec.jsonl", make_texts(6, seed=22))
    out = tmp_path / "r"
    summary = train(TrainConfig(cache=str(cache), out=str(out), steps=4, batch_size=2, lr=1e-2, warmup_steps=1,
                                eval_every=2, save_every=0, log_every=100, peft="lora", lora_rank=4,
                                base_dtype="bfloat16", eval_specialized=str(spec)))
    assert summary["best_step"] in (2, 4) and summary["S"] is not None
    for folder in ("best", "final"):
        weights = load_file(out / folder / "adapter_model.safetensors")
        assert weights and all(w.dtype == torch.float32 for w in weights.values())
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "config.json").read_text())["resolved_model"],
                                                dtype=torch.bfloat16)
    PeftModel.from_pretrained(base, out / "final")  # loads


def test_base_dtype_without_an_adapter_is_refused(cache, tmp_path, capsys):
    code = main(["train", "--cache", str(cache), "--out", str(tmp_path / "r"), "--base-dtype", "bfloat16"])
    assert code == 2 and "--base-dtype bfloat16 needs --peft" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_run_from_before_these_options_still_resumes(cache, tmp_path):
    """config.json written before --optimizer, --base-dtype and --gradient-checkpointing existed: they ran with their
    defaults, which is no difference."""
    cfg = TrainConfig(cache=str(cache), out=str(tmp_path / "r"), steps=2, batch_size=2, eval_every=100, save_every=0)
    summary = train(cfg)
    path = tmp_path / "r" / "config.json"
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("optimizer", "base_dtype", "gradient_checkpointing")}
    path.write_text(json.dumps(old))
    assert train(dataclasses.replace(cfg, resume=True)) == summary  # finished, not "another configuration"
    with pytest.raises(ValueError, match="another configuration"):
        train(dataclasses.replace(cfg, resume=True, optimizer="sgd"))


_RETAINED = """
import os, sys
import numpy as np
if sys.argv[1] == "lean":
    from mft_cache.allocator import use_lean_allocator
    assert use_lean_allocator()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
a = np.ones(16 << 20, np.uint8)
del a  # a freed 16 MiB mapping: glibc's default raises its threshold to it, and serves smaller blocks from its heap
before = rss()
big, small = [], []
for i in range(40):  # activations of varying sizes, with small allocations between them, then all freed
    big.append(np.ones((2 + i % 8) << 20, np.uint8))
    small.append(bytearray(4096))
del big
print(rss() - before)
"""


def _retained(mode: str) -> int:
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", _RETAINED, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_lean_allocator_gives_freed_blocks_back():
    """200 MiB allocated in blocks of 2-9 MiB and freed: glibc's default keeps most of it resident (the negative
    control), --cpu-allocator lean keeps none of it."""
    default, lean = _retained("default"), _retained("lean")
    assert default > 100 * 2**20, default
    assert lean < 16 * 2**20, lean


def test_lean_allocator_in_a_run_and_in_the_plan(cache, tmp_path, capsys, caplog, monkeypatch):
    import logging

    from mft_cache import allocator

    calls = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: type("C", (), {
        "mallopt": staticmethod(lambda k, v: calls.append((k, v)) or 1)}))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    cfg = TrainConfig(cache=str(cache), out=str(tmp_path / "r"), steps=1, batch_size=2, eval_every=100, save_every=0,
                      cpu_allocator="lean")
    with caplog.at_level(logging.INFO, logger="mft_cache"):
        train(cfg)
    if __import__("platform").libc_ver()[0] == "glibc":
        assert calls == [(-3, 1 << 20)] and "--cpu-allocator lean" in caplog.text
    # the allocator does not change what is trained: a run may resume under the other one
    assert train(dataclasses.replace(cfg, resume=True, cpu_allocator="default"))["steps"] == 1
    # --plan: lean holds less besides the tensors; the default plan offers lean as its cheapest change
    for flags in ([], ["--cpu-allocator", "lean"]):
        assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "p"), "--plan-json", *flags]) == 0
        p = json.loads(capsys.readouterr().out)
        if not flags:
            default = p
    assert p["estimate"]["runtime"] <= default["estimate"]["runtime"]
    from mft_cache.trainer.plan import MB, cpu_runtime

    assert cpu_runtime(513 * MB, "lean") < cpu_runtime(513 * MB, "default") / 2  # SmolLM2-135M's weights
    assert cpu_runtime(MB // 2, "lean") == cpu_runtime(MB // 2, "default")  # a tiny model's
    assert "--cpu-allocator lean" in [c["flags"] for c in default["changes"]]
    assert "--cpu-allocator lean" not in [c["flags"] for c in p["changes"]]
    with pytest.raises(SystemExit) as stop:
        main(["train", "--cache", str(cache), "--out", str(tmp_path / "p"), "--cpu-allocator", "huge"])
    assert stop.value.code == 2 and "--cpu-allocator" in capsys.readouterr().err


def test_default_optimizer_is_torchs_adamw_as_before():
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(TrainConfig().optimizer, p, 1e-4, 0.0)
    assert type(opt) is torch.optim.AdamW
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-4, weight_decay=0.0)
    assert {k: v for k, v in opt.defaults.items()} == ref.defaults


def test_adamw8bit_needs_its_extra_or_a_gpu(cache, tmp_path, capsys):
    code = main(["train", "--cache", str(cache), "--out", str(tmp_path / "r"), "--optimizer", "adamw8bit"])
    err = capsys.readouterr().err
    assert code == 2 and "--optimizer adamw8bit needs" in err
    assert ("mft-cache[8bit]" in err) or ("CUDA" in err)
    assert not (tmp_path / "r" / "config.json").exists()


@pytest.mark.parametrize("optimizer", ["adafactor", "sgd"])
def test_each_optimizer_resumes_exactly(optimizer, cache, tmp_path, monkeypatch):
    import mft_cache.trainer.train as train_module

    def cfg(name, **kw):
        return TrainConfig(cache=str(cache), out=str(tmp_path / name), steps=6, batch_size=2, lr=3e-2,
                           warmup_steps=1, eval_every=100, save_every=2, log_every=100, optimizer=optimizer, **kw)

    class Stop(Exception):
        pass

    def crash_after_step_5(name):
        if name == "train:step-5":
            raise Stop()

    with monkeypatch.context() as m:
        m.setattr(train_module, "fault_point", crash_after_step_5)
        with pytest.raises(Stop):
            train(cfg("r"))
    saved = tmp_path / "r" / "checkpoints" / "step-000004"
    assert (saved / "optimizer.bin").exists()
    state = torch.load(saved / "optimizer.bin", weights_only=True)["state"]
    key = "momentum_buffer" if optimizer == "sgd" else "row_var"
    assert any(key in s for s in state.values())  # the optimiser's own state was saved
    train(cfg("r", resume=True))
    train(cfg("u"))
    a = load_file(tmp_path / "r" / "final" / "model.safetensors")
    b = load_file(tmp_path / "u" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(name):
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("r") == losses("u") and len(losses("u")) == 6
    w0 = load_file(Path(json.loads((tmp_path / "u" / "config.json").read_text())["resolved_model"])
                   / "model.safetensors")
    assert any(not torch.equal(w0[k], b[k]) for k in b)  # it trained


def test_optimizer_state_bytes():
    shapes = [(100, 20), (20,)]
    assert state_bytes("adamw", shapes) == 8 * 2020
    assert state_bytes("sgd", shapes) == 4 * 2020
    assert state_bytes("adafactor", shapes) == 4 * (100 + 20) + 4 * 20  # factored matrix, full vector
    assert state_bytes("adamw8bit", [(100, 100)]) == 2 * 10_000 + 8 * 40  # 8-bit moments, a scale per 256
    # the factored state is what torch's Adafactor allocates
    p = [torch.nn.Parameter(torch.randn(100, 20)), torch.nn.Parameter(torch.randn(20))]
    opt = torch.optim.Adafactor(p)
    for x in p:
        x.grad = torch.ones_like(x)
    opt.step()
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert held == state_bytes("adafactor", shapes)


# -- --plan -------------------------------------------------------------------------------------------------------
def test_plan_prints_the_breakdown_and_writes_nothing(cache, tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["train", "--cache", str(cache), "--out", str(out), "--plan"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    for part in ("weights (float32)", "gradients", "optimizer states (adamw)", "activations without checkpointing",
                 "activations with --gradient-checkpointing", "one chunk of logits", "cache rows in flight",
                 "peak", "available", "--gradient-checkpointing", "--peft lora"):
        assert part in text, part
    code = main(["train", "--cache", str(cache), "--out", str(out), "--plan-json", "--peft", "lora",
                 "--base-dtype", "bfloat16", "--gradient-checkpointing"])
    p = json.loads(capsys.readouterr().out)
    assert code == 0 and not out.exists()
    e = p["estimate"]
    assert e["total"] == max(e["phases"].values()) > e["weights"] > 0
    assert e["activations"] == e["activations_with_checkpointing"]
    assert p["trainable"] < p["params"] and p["seq_len"] == SEQ


def _estimate(config, **kw):
    from mft_cache.trainer.plan import activation_profile, estimate, model_shape

    cfg = TrainConfig(**{"batch_size": 4, **kw})
    return estimate(model_shape(config, cfg), activation_profile(config, cfg), cfg, 128, "cpu", top_k=8)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_plan_estimate_is_monotone_in_the_obvious_ways(kind):
    from mft_cache.testing import model_config

    config = model_config(kind, 1000, hidden=64, layers=3, max_positions=512)
    base = _estimate(config)
    ckpt = _estimate(config, gradient_checkpointing=True)
    lora = _estimate(config, peft="lora")
    bf16 = _estimate(config, peft="lora", base_dtype="bfloat16")
    assert ckpt["activations"] < base["activations"] == base["activations_without_checkpointing"]
    assert ckpt["activations_without_checkpointing"] == base["activations"]
    assert lora["gradients"] < base["gradients"] / 4 and lora["optimizer"] < base["optimizer"] / 4
    assert lora["weights"] > base["weights"]  # the adapter is added to the base
    assert bf16["weights"] < lora["weights"]
    assert _estimate(config, optimizer="adafactor")["optimizer"] < _estimate(config, optimizer="sgd")["optimizer"] \
        < base["optimizer"]
    assert _estimate(config, chunk_size=16)["loss_chunk"] < base["loss_chunk"]
    # an online teacher is read and cast after the student, which is resident by then: its load is the larger one
    online = _estimate(config, peft="lora", base_dtype="bfloat16", teacher="online", model="m", data="-")
    assert online["phases"]["loading"] > bf16["phases"]["loading"] > 0
    assert _estimate(config, batch_size=8)["activations"] == pytest.approx(2 * base["activations"])
    for e in (base, ckpt, lora, bf16):
        assert e["total"] == max(e["phases"].values())
    assert ckpt["total"] <= base["total"] and lora["total"] < base["total"]


def test_plan_activations_are_what_autograd_keeps():
    """The probe's per-layer bytes, scaled to a model of L layers, are the saved tensors of that whole model."""
    from mft_cache.testing import model_config
    from mft_cache.trainer.plan import _saved_bytes, activation_profile, estimate, model_shape

    config = model_config("llama", 512, hidden=64, layers=4, max_positions=512)
    cfg = TrainConfig(batch_size=1)
    e = estimate(model_shape(config, cfg), activation_profile(config, cfg), cfg, 96, "cpu")
    model = build_model("llama", 512, hidden=64, layers=4, max_positions=512).train()
    assert e["activations"] == pytest.approx(_saved_bytes(model, 96, None), rel=1e-6)


# -- on a CUDA GPU (skipped without one; bench/gpu_check.sh runs them) --------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_checkpointing_and_bf16_base_match_on_the_gpu():
    dev = torch.device("cuda")
    plain = build_model("llama", 300, seed=3).to(dev)
    ckpt = copy.deepcopy(plain)
    enable_checkpointing(ckpt)
    batch = {k: v.to(dev) for k, v in _batch(300).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_a, grads_a = _loss_and_grads(plain, batch)
        loss_b, grads_b = _loss_and_grads(ckpt, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)
    model = prepare_student(TrainConfig(peft="lora", base_dtype="bfloat16", gradient_checkpointing=True),
                            build_model("llama", 300, seed=3).to(dev, torch.bfloat16))
    loss, grads = _loss_and_grads(model, batch)
    assert torch.isfinite(loss) and grads and all(g.dtype == torch.float32 for g in grads.values())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kw", [{}, {"gradient_checkpointing": True}, {"peft": "lora", "base_dtype": "bfloat16"},
                                {"optimizer": "adafactor"}, {"loss_impl": "transformers", "objective": "ft"}])
def test_cuda_plan_estimate_is_within_15_percent_of_max_memory_allocated(kw):
    """The estimate on CUDA has no runtime term: it must match what the allocator handed out."""
    from mft_cache.testing import model_config
    from mft_cache.trainer.plan import activation_profile, estimate, model_shape

    dev = torch.device("cuda")
    config = model_config("llama", 16384, hidden=512, layers=6, max_positions=1024, tied=True)
    cfg = TrainConfig(**{"batch_size": 2, "objective": "ft", **kw})
    e = estimate(model_shape(config, cfg), activation_profile(config, cfg), cfg, 512, "cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = build_model("llama", 16384, hidden=512, layers=6, max_positions=1024, tied=True)
    model = prepare_student(cfg, model.to(dev, {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.base_dtype]))
    module = StudentLoss(model, cfg.chunk_size, cfg.loss_impl).train()
    opt = build_optimizer(cfg.optimizer, [p for p in module.parameters() if p.requires_grad], 1e-4, 0.0)
    batch = {k: v.to(dev) for k, v in _batch(16384, b=2, t=512).items()}
    batch["label_mask"][:] = True
    batch["length"][:] = 512
    for _ in range(3):
        loss, n = module(**batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() - start
    assert 0.85 <= e["total"] / measured <= 1.15, (e["total"] / measured, e["peak_phase"], measured / 2**20)


@pytest.mark.cuda
@cuda
def test_cuda_adamw8bit_trains_and_resumes(cache, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import mft_cache.trainer.train as train_module

    def cfg(name, **kw):
        return TrainConfig(cache=str(cache), out=str(tmp_path / name), steps=6, batch_size=2, lr=1e-3,
                           warmup_steps=1, eval_every=100, save_every=2, log_every=100, optimizer="adamw8bit", **kw)

    class Stop(Exception):
        pass

    with monkeypatch.context() as m:
        m.setattr(train_module, "fault_point", lambda name: (_ for _ in ()).throw(Stop()) if name == "train:step-5"
                  else None)
        with pytest.raises(Stop):
            train(cfg("r"))
    train(cfg("r", resume=True))
    train(cfg("u"))
    a = load_file(tmp_path / "r" / "final" / "model.safetensors")
    b = load_file(tmp_path / "u" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
