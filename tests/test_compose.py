"""Compositions on tiny models: PEFT adapters, replay, a truncated top-k and the tail ablations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_texts, write_jsonl
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.trainer.config import TrainConfig
from mft_cache.trainer.data import MixedRows, mixed_step_rows, replay_layout
from mft_cache.trainer.targets import from_cache
from mft_cache.trainer.train import train

SEQ = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("compose-data")
    return {"train": write_jsonl(d / "train.jsonl", make_texts(16, seed=21)),
            "replay": write_jsonl(d / "replay.jsonl", make_texts(12, seed=22, min_words=5, max_words=40)),
            "spec": write_jsonl(d / "spec.jsonl", make_texts(4, seed=23))}


@pytest.fixture(scope="module")
def caches(llama, data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compose-caches")
    out = {}
    for name in ("train", "replay"):
        out[name] = root / name
        build_cache(CacheConfig(model=str(llama), data=str(data[name]), out=str(out[name]), seq_len=SEQ, top_k=16))
    return out


def run(tmp_path: Path, name: str, **kw) -> tuple[dict, list[dict]]:
    cfg = dict(out=str(tmp_path / name), steps=4, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=100,
               save_every=0, log_every=100)
    cfg.update(kw)
    summary = train(TrainConfig(**cfg))
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, [x for x in lines if x["type"] == "train"]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("objective", ["mft", "ft"])
def test_adapter_trains_and_the_base_stays_frozen(llama, caches, data, tmp_path, method, objective):
    base = load_file(llama / "model.safetensors")
    summary, lines = run(tmp_path, "run", cache=str(caches["train"]), peft=method, objective=objective,
                         eval_specialized=str(data["spec"]), eval_every=2)
    assert summary["peft"] == method and len(lines) == 4
    best = tmp_path / "run" / "best"
    assert (best / "adapter_config.json").exists() and not (best / "model.safetensors").exists()
    adapter = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert adapter and all(("lora_" in k or "ia3_" in k or "magnitude" in k) for k in adapter)
    # the adapter learned: LoRA/DoRA's B starts at 0, IA3's scales at 1
    moved = [k for k, v in adapter.items() if ("lora_B" in k and v.abs().max() > 0) or ("ia3_" in k and (v != 1).any())]
    assert len(moved) >= 2, sorted(adapter)
    # the base weights inside the trained peft model are the teacher's, bit for bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "run" / "final")
    trained_base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                    for k, v in model.state_dict().items() if not any(t in k for t in ("lora_", "ia3_", "magnitude"))}
    for k, v in base.items():
        assert torch.equal(trained_base[k], v), k


def test_adapter_targets_every_projection_not_the_head(llama, caches, tmp_path):
    run(tmp_path, "run", cache=str(caches["train"]), peft="lora", steps=1)
    cfg = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cfg["r"] == 8


def test_merged_adapter_loads_as_a_plain_model(llama, caches, tmp_path):
    from transformers import AutoModelForCausalLM

    run(tmp_path, "run", cache=str(caches["train"]), peft="lora", merge_adapter=True, steps=2)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    base = load_file(llama / "model.safetensors")
    got = merged.state_dict()
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_unknown_adapter_target_is_refused(caches, tmp_path):
    with pytest.raises(ValueError, match="--peft-targets"):
        run(tmp_path, "run", cache=str(caches["train"]), peft="lora", peft_targets="q_proj,nope")


@pytest.mark.parametrize("g,fraction", [(4, 0.5), (8, 0.25), (6, 0.5), (5, 0.4)])
def test_replay_batches_hold_the_requested_fraction(g, fraction):
    for step in range(5):
        rows = mixed_step_rows(step, g, 10, 7, fraction, seed=3)
        replay = [r for r in rows if r >= 10]
        assert len(replay) == round(fraction * g)
        assert all(0 <= r < 17 for r in rows) and len(rows) == g
    layout = replay_layout(8, 4)
    assert layout == [False, True] * 4  # spread: every micro-batch of 2 holds one replay row


def test_replay_streams_cover_each_source_once_per_epoch():
    seen_main, seen_replay = [], []
    for step in range(5):  # G=4, half replay: 2 + 2 rows per step; 10 main rows = 5 steps
        rows = mixed_step_rows(step, 4, 10, 10, 0.5, seed=0)
        seen_main += [r for r in rows if r < 10]
        seen_replay += [r - 10 for r in rows if r >= 10]
    assert sorted(seen_main) == list(range(10)) and sorted(seen_replay) == list(range(10))


def test_mixed_rows_keep_the_order_and_the_common_fields():
    class Src:
        def __init__(self, base, extra):
            self.base, self.extra = base, extra

        def __len__(self):
            return 5

        def batch(self, rows):
            out = {"input_ids": torch.tensor([[self.base + r] for r in rows]), "length": torch.tensor(rows)}
            return {**out, "topk_ids": torch.zeros(len(rows), 1)} if self.extra else out

    mixed = MixedRows(Src(0, True), Src(100, False))
    b = mixed.batch([7, 1, 5, 0])
    assert b["input_ids"][:, 0].tolist() == [102, 1, 100, 0]
    assert set(b) == {"input_ids", "length"}


def test_mft_replay_targets_come_from_the_replay_cache(caches, tmp_path, monkeypatch):
    import mft_cache.trainer.train as train_mod

    seen = []
    real = train_mod.from_cache

    def spy(mb, **kw):
        seen.append(mb)
        return real(mb, **kw)

    monkeypatch.setattr(train_mod, "from_cache", spy)
    summary, lines = run(tmp_path, "run", cache=str(caches["train"]), replay=str(caches["replay"]),
                         replay_fraction=0.5, steps=2)
    assert summary["replay"] == str(caches["replay"]) and len(lines) == 2
    from mft_cache.storage import open_cache

    replay = open_cache(caches["replay"])
    replay_rows = {tuple(replay.read_rows(i, i + 1)["input_ids"][0].tolist()): i for i in range(len(replay))}
    mb = seen[0]
    hits = [replay_rows.get(tuple(x.tolist())) for x in mb["input_ids"]]
    assert sum(h is not None for h in hits) == 2  # half the batch from the replay cache...
    for j, h in enumerate(hits):
        if h is not None:  # ...with that cache's own teacher values
            row = replay.read_rows(h, h + 1)
            assert torch.equal(mb["label_logprob"][j], torch.from_numpy(row["label_logprob"][0]))


def test_replay_cache_with_a_different_top_k_trains_with_the_narrower_columns(llama, caches, data, tmp_path):
    """A k=16 main cache with a k=8 replay cache at --top-k 8, and the other way round: one batch, one K."""
    narrow = tmp_path / "replay-k8"
    build_cache(CacheConfig(model=str(llama), data=str(data["replay"]), out=str(narrow), seq_len=SEQ, top_k=8))
    for objective in ("mft", "ft"):
        summary, lines = run(tmp_path, f"wide-main-{objective}", cache=str(caches["train"]), replay=str(narrow),
                             top_k=8, objective=objective)
        assert len(lines) == 4 and all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    summary, lines = run(tmp_path, "wide-replay", cache=str(narrow), replay=str(caches["replay"]))
    assert len(lines) == 4 and summary["top_k"] == 8
    with pytest.raises(ValueError, match="--top-k"):  # main's 16 columns need 16 from replay too
        run(tmp_path, "too-wide", cache=str(caches["train"]), replay=str(narrow))


def test_mft_replay_from_raw_documents_is_refused(caches, data, tmp_path):
    with pytest.raises(ValueError, match="cache them first"):
        run(tmp_path, "run", cache=str(caches["train"]), replay=str(data["replay"]))


def test_ft_replay_from_raw_documents_trains(caches, data, tmp_path):
    summary, lines = run(tmp_path, "run", cache=str(caches["train"]), replay=str(data["replay"]), objective="ft")
    assert summary["replay_fraction"] == 0.5 and len(lines) == 4


def test_replay_cache_from_another_teacher_is_refused(gpt2, data, caches, tmp_path):
    other = tmp_path / "other"
    build_cache(CacheConfig(model=str(gpt2), data=str(data["replay"]), out=str(other), seq_len=SEQ, top_k=16))
    with pytest.raises(ValueError, match="--replay"):
        run(tmp_path, "run", cache=str(caches["train"]), replay=str(other))


def _sparse(seed=0, n=7, k=5, v=20):
    """One row of n + 1 tokens with the full teacher distribution of its n positions, and a cache batch of them."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    vals, ids = lp.topk(k, -1)
    input_ids = torch.randint(0, v, (1, n + 1), generator=g)
    labels = input_ids[0, 1:]
    label_lp = lp.gather(1, labels[:, None])[:, 0]
    batch = {"input_ids": input_ids, "topk_ids": ids[None], "topk_logprobs": vals[None], "label_logprob": label_lp[None]}
    return lp, vals, ids, labels, label_lp, batch


def test_top_k_truncation_is_the_smaller_cache():
    lp, vals, ids, labels, label_lp, batch = _sparse()
    t = from_cache(batch, objective="mft", tau=0.25, top_k=3).flatten()
    v3, i3 = lp.topk(3, -1)
    assert torch.equal(t.topk_ids, i3) and torch.equal(t.logprobs, v3) and torch.equal(t.label_logprob, label_lp)
    # the correction weight uses the exact p_max and p_label, whatever the cut
    assert torch.equal(t.weight, from_cache(batch, objective="mft", tau=0.25).flatten().weight)


def test_renormalize_puts_all_mass_on_topk_and_label():
    lp, vals, ids, labels, label_lp, batch = _sparse(seed=1)
    t = from_cache(batch, objective="mft", tau=0.25, tail="renormalize").flatten()
    v2, l2 = t.logprobs, t.label_logprob
    in_topk = (ids == labels[:, None]).any(-1)
    total = v2.exp().sum(-1) + torch.where(in_topk, 0.0, l2.exp())
    torch.testing.assert_close(total, torch.ones(len(total)))
    # the ranks and ratios are kept
    torch.testing.assert_close(v2 - v2[:, :1], vals - vals[:, :1])


def test_top_k_above_the_cache_is_refused(caches, tmp_path):
    with pytest.raises(ValueError, match="--top-k 17"):
        run(tmp_path, "run", cache=str(caches["train"]), top_k=17)


def test_tail_modes_and_top_k_train_and_differ(caches, tmp_path):
    results = {}
    for name, kw in {"bucket": {}, "renorm": {"tail": "renormalize"}, "drop": {"tail": "drop"},
                     "k1": {"top_k": 1}}.items():
        summary, lines = run(tmp_path, name, cache=str(caches["train"]), **kw)
        results[name] = [x["loss"] for x in lines]
        assert all(torch.isfinite(torch.tensor(results[name])))
    assert summary["top_k"] == 1
    for a in results:
        for b in results:
            if a < b:
                assert results[a] != results[b], (a, b)
