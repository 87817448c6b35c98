"""The Hugging Face habits (docs/HF.md): config files, trackers, model cards, the cache in a user's own
transformers.Trainer, and the Hub paths failing offline."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mft_cache.cli import main, parse
from mft_cache.pipeline.cache import CacheConfig, build_cache

SEQ = 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(llama, docs_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf-caches") / "c"
    build_cache(CacheConfig(model=str(llama), data=str(docs_jsonl), out=str(out), seq_len=SEQ, top_k=16))
    return out


def tiny_flags(cache: Path, docs: Path, out: Path) -> list[str]:
    return ["--cache", str(cache), "--out", str(out), "--steps", "3", "--batch-size", "2", "--lr", "3e-3",
            "--warmup-steps", "1", "--eval-every", "2", "--save-every", "0", "--eval-specialized", str(docs),
            "--eval-general", str(docs), "--eval-max-sequences", "2", "--tau", "0.5"]


def config_json(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


# -- config files ----------------------------------------------------------------------------------------
def test_a_yaml_config_and_the_same_flags_give_identical_config_json(cache, docs_jsonl, tmp_path):
    flags = tiny_flags(cache, docs_jsonl, tmp_path / "flags")
    assert main(["train", *flags]) == 0
    options = {k: v for k, v in config_json(tmp_path / "flags").items() if k in dict(zip(
        [f[2:].replace("-", "_") for f in flags[::2]], flags[1::2]))}
    (tmp_path / "c.yaml").write_text("train:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in options.items()))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "yaml")]) == 0
    a, b = config_json(tmp_path / "flags"), config_json(tmp_path / "yaml")
    assert a.pop("out") != b.pop("out") and a == b


def test_a_runs_config_json_reproduces_it(cache, docs_jsonl, tmp_path):
    assert main(["train", *tiny_flags(cache, docs_jsonl, tmp_path / "x"), "--seed", "3"]) == 0
    assert main(["train", "--config", str(tmp_path / "x" / "config.json"), "--out", str(tmp_path / "y")]) == 0
    a, b = config_json(tmp_path / "x"), config_json(tmp_path / "y")
    assert a.pop("out") != b.pop("out") and a == b
    lines = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "xy"]
    assert [x["loss"] for x in lines[0] if x["type"] == "train"] == [x["loss"] for x in lines[1] if x["type"] == "train"]


def test_flags_override_the_file_and_values_are_typed(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 7\nlr: 3e-4\ntrain:\n  tau: '0.5'\n  steps: 8\nsweep:\n  taus: 0.5\n")
    args = parse(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "1e-3"])
    assert (args.steps, args.lr, args.tau) == (8, 1e-3, 0.5) and isinstance(args.tau, float)
    assert parse(["sweep", "--config", str(tmp_path / "c.yaml")]).taus == "0.5"


@pytest.mark.parametrize("command, text, words", [
    ("train", "stepz: 3\n", ["unknown key 'stepz'", "c.yaml"]),
    ("train", "eval-every: 3\n", ["unknown key 'eval-every'", "eval_every"]),
    ("cache", "tau: 0.5\n", ["unknown key 'tau'", "mft cache"]),
    ("cache", "train:\n  tau: 0.5\nresolved_model: x\n", ["unknown key 'resolved_model'"]),
    ("train", "steps: many\n", ["steps", "not a valid value"]),
    ("train", "resume: 1\n", ["resume", "not a valid value"]),
    ("train", "objective: sft\n", ["objective", "not one of"]),
    ("train", "- steps\n", ["must hold a mapping"]),
    ("train", "steps: [\n", ["not valid YAML"]),
])
def test_a_bad_config_file_exits_2_naming_the_key_and_the_file(command, text, words, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "c.yaml") in err and all(w in err for w in words), err


# what `make -n PRESET=... cache train sweep study` runs: the options of the presets' config files, as flags (the
# demo's train and sweep at the defaults chosen from its learning-rate sweep)
_OLD_MAKE = {
    "demo": [
        "cache --model assets/model --data assets/data/licenses_train.jsonl --out caches/demo --seq-len 256 --top-k 32 "
        "--format zarr --batch-size 4",
        "train --cache caches/demo --out runs/demo --objective mft --tau 0.25 --steps 20 --batch-size 4 --lr 5e-4 "
        "--eval-every 10 --mixed-precision no --eval-specialized assets/data/licenses_val.jsonl --eval-general "
        "assets/data/bbc_val.jsonl --eval-max-sequences 0 --resume",
        "sweep --cache caches/demo --out runs/sweep --taus 0.1,0.25,0.5 --seeds 0,1,2 --lrs 2e-4,5e-4 --steps 20 "
        "--batch-size 4 --lr 5e-4 --eval-every 10 --mixed-precision no --eval-specialized "
        "assets/data/licenses_val.jsonl --eval-general assets/data/bbc_val.jsonl --eval-max-sequences 0 --resume",
        "study --model assets/model --data assets/data/licenses_train.jsonl --out runs/study --seq-len 256 --steps 20 "
        "--batch-size 4 --lr 5e-4 --tau 0.25 --eval-every 20 --save-every 5 --eval-specialized "
        "assets/data/licenses_val.jsonl --eval-general assets/data/bbc_val.jsonl --eval-max-sequences 16 --parts abcd "
        "--report STUDIES.md"],
    "gpu": [
        "cache --model assets/model --data assets/data/licenses_train_full.jsonl --out caches/gpu --seq-len 2048 "
        "--top-k 32 --format zarr --batch-size 16",
        "train --cache caches/gpu --out runs/gpu --objective mft --tau 0.25 --steps 1000 --batch-size 16 --lr 1e-5 "
        "--eval-every 100 --mixed-precision bf16 --eval-specialized assets/data/licenses_val_full.jsonl "
        "--eval-general assets/data/bbc_val_full.jsonl --eval-max-sequences 0 --resume",
        "sweep --cache caches/gpu --out runs/sweep --taus 0.1,0.25,0.5 --steps 1000 --batch-size 16 --lr 1e-5 "
        "--eval-every 100 --mixed-precision bf16 --eval-specialized assets/data/licenses_val_full.jsonl "
        "--eval-general assets/data/bbc_val_full.jsonl --eval-max-sequences 0 --resume",
        "study --model assets/model --data assets/data/licenses_train_full.jsonl --out runs/study --seq-len 2048 "
        "--steps 20 --batch-size 16 --lr 5e-4 --tau 0.25 --eval-every 20 --save-every 5 --eval-specialized "
        "assets/data/licenses_val_full.jsonl --eval-general assets/data/bbc_val_full.jsonl --eval-max-sequences 16 "
        "--parts abcd --report STUDIES.md"],
}


def make_commands(*make_args: str) -> list[list[str]]:
    """The mft command lines `make -n` would run (the executable dropped)."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), *make_args], capture_output=True, text=True, check=True).stdout
    lines = out.replace("\\\n", " ").splitlines()
    return [shlex.split(x)[1:] for x in lines if "bin/mft " in x]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("preset", ["demo", "gpu"])
def test_make_resolves_the_same_options_as_before_the_config_files(preset, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config paths in the commands are relative to the repository
    new = make_commands(f"PRESET={preset}", "cache", "train", "sweep", "study")
    assert [vars(parse(c)) | {"config": None} for c in new] == [
        vars(parse(shlex.split(c))) | {"config": None} for c in _OLD_MAKE[preset]]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_variables_still_override(monkeypatch):
    monkeypatch.chdir(ROOT)
    [train] = make_commands("train", "TAU=0.1", "STEPS=100", "RUN=runs/x")
    args = parse(train)
    assert (args.tau, args.steps, args.out, args.lr) == (0.1, 100, "runs/x", 5e-4)


# -- trackers -----------------------------------------------------------------------------------------------
def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files in `folder`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """What metrics.jsonl says the trackers were sent."""
    want: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        prefix, keys = ("train", ("loss", "lr", "tokens_per_s")) if r["type"] == "train" else (
            "eval", ("ppl_specialized", "ppl_general", "S", "DG", "ratio"))
        for k in keys:
            if r.get(k) is not None:
                want.setdefault(f"{prefix}/{k}", {})[r["step"]] = r[k]
    return want


def assert_same_scalars(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for tag in want:
        assert set(got[tag]) == set(want[tag]), tag
        for step, value in want[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)  # stored as float32


def test_tensorboard_events_hold_the_metrics_of_a_run(cache, docs_jsonl, tmp_path):
    run = tmp_path / "tb"
    assert main(["train", *tiny_flags(cache, docs_jsonl, run), "--report-to", "tensorboard", "--run-name", "r1"]) == 0
    want = expected_scalars(run)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/ppl_specialized", "eval/ppl_general", "eval/S",
            "eval/DG", "eval/ratio"} <= set(want) and set(want["train/loss"]) == {1, 2, 3}
    assert_same_scalars(scalars(run / "tensorboard" / "r1"), want)


def test_a_sweep_logs_every_tau_as_a_run_of_one_tensorboard_folder(cache, docs_jsonl, tmp_path):
    flags = tiny_flags(cache, docs_jsonl, tmp_path / "sw")
    flags[flags.index("--steps") + 1] = "2"
    assert main(["sweep", *flags, "--taus", "0.25,1", "--no-ft", "--report-to", "tensorboard"]) == 0
    names = sorted(p.name for p in (tmp_path / "sw" / "tensorboard").iterdir())
    assert names == ["sw-mft-tau0.25", "sw-mft-tau1"]
    for name, run in zip(names, ("mft-tau0.25", "mft-tau1")):
        assert_same_scalars(scalars(tmp_path / "sw" / "tensorboard" / name), expected_scalars(tmp_path / "sw" / run))
        assert config_json(tmp_path / "sw" / run)["run_name"] == name


def test_a_tracker_that_is_not_installed_exits_2_naming_it(cache, docs_jsonl, tmp_path, capsys, monkeypatch):
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    assert main(["train", *tiny_flags(cache, docs_jsonl, tmp_path / "w"), "--report-to", "wandb"]) == 2
    assert "--report-to wandb" in capsys.readouterr().err and not (tmp_path / "w").exists()


# -- model cards --------------------------------------------------------------------------------------------
def test_best_and_final_carry_a_model_card_with_the_summary_numbers(cache, docs_jsonl, tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "card"
    argv = ["train", *tiny_flags(cache, docs_jsonl, run)]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((cache / "manifest.json").read_text())
    for folder, prefix in (("best", "best_"), ("final", "final_")):
        card = ModelCard.load(run / folder / "README.md")
        m = card.data.to_dict()["mft"]
        assert m["ppl_specialized"] == pytest.approx(summary[f"{prefix}ppl_specialized"], rel=1e-12)
        assert m["ppl_general"] == pytest.approx(summary[f"{prefix}ppl_general"], rel=1e-12)
        got = (m["S"], m["DG"], m["ratio"])
        want = (summary["S"], summary["DG"], summary["ratio"]) if folder == "best" else (
            summary["final_S"], summary["final_DG"], summary["final_ratio"])
        assert got == pytest.approx(want, rel=1e-12)
        assert (m["base_ppl_specialized"], m["base_ppl_general"]) == (summary["base_ppl_specialized"],
                                                                      summary["base_ppl_general"])
        assert (m["objective"], m["tau"], m["cache_top_k"], m["cache_logprob_dtype"]) == ("mft", 0.5, 16, "float16")
        assert m["data_fingerprint"] == manifest["data"]["fingerprint"]
        assert m["cache_manifest_sha256"] == manifest["manifest_sha256"]
        assert m["command"] == shlex.join(["mft", *argv]) and m["mft_cache_version"]
        assert card.data.library_name == "transformers" and "mft-cache" in card.data.tags
        assert shlex.join(["mft", *argv]) in card.text and f"{summary['S']:.4f}" in (run / "best" / "README.md").read_text()


def test_an_adapters_card_says_it_is_one(cache, docs_jsonl, tmp_path):
    from huggingface_hub import ModelCard

    flags = tiny_flags(cache, docs_jsonl, tmp_path / "lora")
    flags[flags.index("--steps") + 1] = "1"
    assert main(["train", *flags, "--peft", "lora"]) == 0
    card = ModelCard.load(tmp_path / "lora" / "final" / "README.md")
    assert card.data.library_name == "peft" and card.data.to_dict()["mft"]["adapter"] == "lora"
    assert (tmp_path / "lora" / "final" / "adapter_config.json").exists()


# -- the cache in your own transformers.Trainer -------------------------------------------------------------
def test_the_collator_gives_the_batches_mft_train_uses(cache):
    import torch

    from mft_cache.hf import CacheDataset, collate
    from mft_cache.trainer.data import CacheRows

    ds = CacheDataset(cache)
    rows = [5, 0, 17]
    want = CacheRows(ds.cache).batch(rows)
    got = collate([ds[i] for i in rows])
    assert set(got) == {"input_ids", "length", "mask", "topk_ids", "topk_logprobs", "label_logprob"} == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_mft_trainer_matches_mft_train_losses(cache, llama, tmp_path):
    """Same cache, student, seed, batch and row order (same_order_as_mft_train), constant lr without warm-up
    (--warmup-steps 0 --min-lr-ratio 1 against lr_scheduler_type constant), AdamW without weight decay, clipping
    at 1.0: the losses of every step agree."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from mft_cache.hf import CacheDataset, MFTLoss, MFTTrainer

    steps, batch, lr, tau = 4, 2, 1e-3, 0.5
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "mft"), "--steps", str(steps),
                 "--batch-size", str(batch), "--lr", str(lr), "--warmup-steps", "0", "--min-lr-ratio", "1",
                 "--tau", str(tau), "--save-every", "0", "--seed", "0"]) == 0
    want = [json.loads(x)["loss"] for x in (tmp_path / "mft" / "metrics.jsonl").read_text().splitlines()]

    got = []

    class Recording(MFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            got.append(loss.item())
            return loss

    model = AutoModelForCausalLM.from_pretrained(llama, dtype="float32")
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch", seed=0, report_to="none", save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    Recording(model=model, args=args, train_dataset=CacheDataset(cache), mft_loss=MFTLoss("mft", tau),
              same_order_as_mft_train=True).train()
    assert len(got) == len(want) == steps
    assert got == pytest.approx(want, abs=1e-5, rel=0)
    assert got[-1] < got[0]


def test_mft_loss_is_the_fused_loss_normalised_per_trained_token(cache, llama):
    import torch
    from transformers import AutoModelForCausalLM

    from mft_cache.hf import CacheDataset, MFTLoss, collate
    from mft_cache.trainer.loss_module import StudentLoss
    from mft_cache.trainer.targets import from_cache

    model = AutoModelForCausalLM.from_pretrained(llama, dtype="float32")
    batch = collate([CacheDataset(cache)[i] for i in range(3)])
    for tail in ("bucket", "drop"):
        t = from_cache(batch, objective="mft", tau=0.25, top_k=8, tail=tail)
        s, n = StudentLoss(model, 16)(batch["input_ids"], batch["length"], batch["mask"], **t.tensors(),
                                      drop_tail=t.drop_tail)
        got = MFTLoss("mft", 0.25, top_k=8, tail=tail, chunk_size=16)(model, batch)
        torch.testing.assert_close(got, s / n)
    with pytest.raises(ValueError, match="top-k 99"):
        MFTLoss(top_k=99)(model, batch)


# -- the Hub: never needed offline ----------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_push_to_hub_offline_exits_2_before_any_work(cache, llama, docs_jsonl, tmp_path, capsys, offline):
    assert main(["train", *tiny_flags(cache, docs_jsonl, tmp_path / "t"), "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub me/model" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()
    assert main(["cache", "--model", str(llama), "--data", str(docs_jsonl), "--out", str(tmp_path / "c"),
                 "--seq-len", str(SEQ), "--push-to-hub", "me/cache"]) == 2
    assert "--push-to-hub me/cache" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("ref, words", [("hf://me/cache@v1", ["--cache hf://me/cache@v1", "HF_HUB_OFFLINE"]),
                                        ("hf://nothing", ["--cache hf://nothing", "hf://OWNER/NAME"])])
def test_a_hub_cache_offline_exits_2_naming_the_flag(ref, words, tmp_path, capsys, offline):
    assert main(["train", "--cache", ref, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err, err


def fake_download(monkeypatch, folder: Path, calls: list):
    import huggingface_hub

    def snapshot_download(repo_id, repo_type=None, revision=None, **kw):
        calls.append((repo_id, repo_type, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_a_hub_cache_is_downloaded_and_every_shard_verified(cache, tmp_path, capsys, monkeypatch):
    """snapshot_download stands in for the Hub: a good copy trains (config.json keeps the hf:// reference); a copy
    with one flipped byte in a shard is refused (exit 3) before training."""
    copy = tmp_path / "snapshot"
    shutil.copytree(cache, copy)
    calls = []
    fake_download(monkeypatch, copy, calls)
    argv = ["train", "--cache", "hf://me/cache@v1", "--steps", "1", "--batch-size", "2", "--save-every", "0"]
    assert main([*argv, "--out", str(tmp_path / "ok")]) == 0
    assert calls == [("me/cache", "dataset", "v1")] and config_json(tmp_path / "ok")["cache"] == "hf://me/cache@v1"
    chunk = next(p for p in sorted(copy.rglob("*")) if p.is_file() and p.parent.name == "0" and "topk_ids" in str(p))
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert main([*argv, "--out", str(tmp_path / "bad")]) == 3
    assert "shard-00000" in capsys.readouterr().err and not (tmp_path / "bad" / "config.json").exists()


class FakeApi:
    """huggingface_hub.HfApi, recording what would be uploaded."""
    uploads: list = []

    def create_repo(self, repo, repo_type=None, exist_ok=False):
        return f"https://hub.example/{repo}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, **kw):
        FakeApi.uploads.append(("folder", repo_id, repo_type, sorted(p.name for p in Path(folder_path).iterdir())))

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, repo_type=None, **kw):
        FakeApi.uploads.append(("file", repo_id, repo_type, path_in_repo, path_or_fileobj.decode()))


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.uploads = []


def test_push_to_hub_uploads_final_and_the_cache_with_a_dataset_card(cache, llama, docs_jsonl, tmp_path, online):
    from huggingface_hub import DatasetCard

    flags = tiny_flags(cache, docs_jsonl, tmp_path / "t")
    flags[flags.index("--steps") + 1] = "1"
    assert main(["train", *flags, "--push-to-hub", "me/model"]) == 0
    [(kind, repo, repo_type, names)] = FakeApi.uploads
    assert (kind, repo, repo_type) == ("folder", "me/model", "model") and {"README.md", "model.safetensors"} <= set(names)
    assert "push_to_hub" not in config_json(tmp_path / "t")  # so --config of it does not push again

    FakeApi.uploads = []
    out = tmp_path / "c"
    assert main(["cache", "--model", str(llama), "--data", str(docs_jsonl), "--out", str(out), "--seq-len", str(SEQ),
                 "--top-k", "16", "--max-sequences", "8", "--push-to-hub", "me/c"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "push_to_hub" not in manifest["config"]  # not part of what the cache is: a rerun without it resumes it
    (_, repo, repo_type, names), (_, _, _, path, text) = FakeApi.uploads
    assert (repo, repo_type, path) == ("me/c", "dataset", "README.md") and "manifest.json" in names
    card = DatasetCard(text)
    facts = card.data.to_dict()["mft_cache"]
    assert (facts["top_k"], facts["logprob_dtype"], facts["bytes_per_token"]) == (16, "float16",
                                                                                  manifest["bytes_per_token"])
    assert facts["teacher"] == manifest["model"]["id"] and "--cache hf://me/c" in card.text


@pytest.mark.parametrize("command", ["sweep", "study"])
def test_sweep_and_study_refuse_push_to_hub(command, tmp_path, capsys):
    assert main([command, "--out", str(tmp_path / "s"), "--push-to-hub", "me/x"]) == 2
    assert "--push-to-hub uploads one run" in capsys.readouterr().err and not (tmp_path / "s").exists()
