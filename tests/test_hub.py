"""The Hub (docs/HF.md, "The Hub"): never needed offline (the Hub paths exit 2 naming the flag); a Hub cache is
downloaded and every shard verified; --push-to-hub uploads final/ and the cache with its cards."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import config_json, fake_download, tiny_flags
from mft_cache.cli import main

SEQ = 32


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


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


def test_a_hub_replay_cache_is_downloaded_and_verified(cache, tmp_path, monkeypatch):
    """--replay takes hf://OWNER/NAME@REVISION as --cache does: downloaded (snapshot_download stands in for the Hub),
    every shard verified, then checked against the main cache (same teacher and seq len)."""
    copy = tmp_path / "replay"
    shutil.copytree(cache, copy)
    calls = []
    fake_download(monkeypatch, copy, calls)
    out = tmp_path / "r"
    assert main(["train", "--cache", str(cache), "--replay", "hf://me/replay@v2", "--steps", "1", "--batch-size", "2",
                 "--save-every", "0", "--out", str(out)]) == 0
    assert calls == [("me/replay", "dataset", "v2")] and config_json(out)["replay"] == "hf://me/replay@v2"


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
