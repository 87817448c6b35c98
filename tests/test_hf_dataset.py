"""A cache as a `datasets.Dataset` (docs/HF.md, mft_cache.hf.cache_dataset): its rows are CacheDataset's, exactly,
for both backends, float16 and q8, text, chat (segment ids) and a schema-1 cache; the datasets operations work on
them; a hostile cache is refused with open_cache's own error, also where an Arrow file of it was made before; the
cache folder is never written. And `mft inspect hf://...` (the Hub faked, as in test_hub.py)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fake_download, resign, rewrite_field, snapshot, write_legacy_copy
from mft_cache.cli import main
from mft_cache.hf import CacheDataset, MFTLoss, cache_dataset, collate
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.storage import CorruptShardError, open_cache
from mft_cache.testing import WORDS, make_chat_tokenizer, make_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-dataset")


@pytest.fixture(scope="module")
def chats(root) -> Path:
    rng = random.Random(3)

    def say(n):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))

    rows = [{"messages": [{"role": "user", "content": say(2)}, {"role": "assistant", "content": say(3)}]}
            for _ in range(10)]
    path = root / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama_chat(root) -> Path:
    folder = root / "llama-chat"
    make_model(folder, "llama", vocab_size=320)
    make_chat_tokenizer("llama3", bos=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def caches(root, text_cache, llama, docs_jsonl, llama_chat, chats) -> dict[str, Path]:
    """zarr float16 text (text_cache), arrow q8 text, arrow float16 chat, zarr q8 chat, and text_cache as schema 1."""
    out = {"zarr-float16-text": text_cache}
    for name, model, data, seq, fmt, dtype in (("arrow-q8-text", llama, docs_jsonl, 32, "arrow", "q8"),
                                               ("arrow-float16-chat", llama_chat, chats, 128, "arrow", "float16"),
                                               ("zarr-q8-chat", llama_chat, chats, 128, "zarr", "q8")):
        out[name] = root / name
        build_cache(CacheConfig(model=str(model), data=str(data), out=str(out[name]), seq_len=seq, top_k=8,
                                format=fmt, logprob_dtype=dtype, batch_size=4, shard_mb=0.01))
    out["zarr-float16-schema1"] = root / "schema1"
    write_legacy_copy(text_cache, out["zarr-float16-schema1"])
    return out


def copy_of(cache: Path, tmp_path: Path) -> Path:
    shutil.copytree(cache, tmp_path / "copy")
    return tmp_path / "copy"


def open_cache_error(folder: Path) -> Exception:
    """What open_cache, then reading every row, raises for `folder`."""
    try:
        cache = open_cache(folder)
        cache.read_rows(0, len(cache))
    except (FileNotFoundError, ValueError) as e:
        return e
    raise AssertionError(f"open_cache accepted {folder}")


def assert_refused_as_open_cache_refuses(folder: Path, cache_dir: Path) -> None:
    expected = open_cache_error(folder)
    with pytest.raises(type(expected)) as e:
        cache_dataset(folder, cache_dir=cache_dir)
    assert type(e.value) is type(expected) and str(e.value) == str(expected)


# -- the rows --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zarr-float16-text", "arrow-q8-text", "arrow-float16-chat", "zarr-q8-chat",
                                  "zarr-float16-schema1"])
def test_rows_are_cache_dataset_rows_exactly(name, caches, tmp_path):
    """Every row, every column: the same keys in the same order, dtypes, shapes and values as CacheDataset; the
    numpy format (dtype=None) gives the same arrays; the cache folder is not written."""
    folder = caches[name]
    before = snapshot(folder)
    ds, ref = cache_dataset(folder, cache_dir=tmp_path), CacheDataset(folder)
    assert len(ds) == len(ref) > 1 and list(ds.features) == list(ref[0])
    assert ("segment_ids" in ds.features) == name.endswith("chat")
    arrays = ds.with_format("numpy", dtype=None)
    for i in range(len(ref)):
        ours, theirs = ds[i], ref[i]
        assert list(ours) == list(theirs)
        for k, v in theirs.items():
            assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), (i, k)
            np.testing.assert_array_equal(arrays[i][k], v.numpy(), strict=True)
    expected = {"zarr-float16-text": torch.float16, "arrow-q8-text": torch.float32}.get(name)
    assert expected is None or ds[0]["topk_logprobs"].dtype == expected
    assert ds.cache_files and all(tmp_path in Path(f["filename"]).parents for f in ds.cache_files)
    assert snapshot(folder) == before


def test_filter_map_shuffle_select_and_the_loss(caches, llama, tmp_path):
    """The datasets operations keep the rows and their dtypes; a batch of its rows through collate gives MFTLoss the
    loss of CacheDataset's same rows."""
    folder = caches["zarr-float16-text"]
    ds, ref = cache_dataset(folder, cache_dir=tmp_path), CacheDataset(folder)
    order = ds.map(lambda r, i: {"row": i}, with_indices=True).shuffle(seed=3)
    perm = [int(i) for i in order["row"]]
    assert sorted(perm) == list(range(len(ds))) and perm != list(range(len(ds)))
    for i in (0, len(ds) - 1):
        assert all(torch.equal(order[i][k], v) for k, v in ref[perm[i]].items())
    full = ds.filter(lambda r: bool(r["length"] == ref.manifest.seq_len))
    short = [i for i in range(len(ref)) if ref[i]["length"] < ref.manifest.seq_len]
    assert len(full) == len(ds) - len(short) and len(full) > 0
    counted = ds.map(lambda r: {"trained": int(r["label_mask"].sum())})
    assert [int(t) for t in counted["trained"]] == [int(ref[i]["label_mask"].sum()) for i in range(len(ref))]
    assert counted[0]["topk_logprobs"].dtype == torch.float16
    assert sum(int(t) for t in counted["trained"]) == ref.manifest.num_tokens
    picked = [2, 0, 5]
    rows = ds.select(picked)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    loss = MFTLoss(tau=0.25)
    ours = loss(model, collate([rows[j] for j in range(len(rows))]))
    assert torch.equal(ours, loss(model, collate([ref[i] for i in picked])))


def test_a_second_call_reuses_the_arrow_file(caches, tmp_path):
    folder = caches["arrow-q8-text"]
    first = cache_dataset(folder, cache_dir=tmp_path)
    files = sorted(p for p in tmp_path.rglob("*.arrow"))
    again = cache_dataset(folder, cache_dir=tmp_path)
    assert again.cache_files == first.cache_files and sorted(p for p in tmp_path.rglob("*.arrow")) == files
    assert again._fingerprint == first._fingerprint


# -- hostile caches --------------------------------------------------------------------------------------------
def flip_a_byte(folder: Path) -> None:
    shard = next(p for p in sorted(folder.rglob("*")) if p.is_file() and "shard-00000" in str(p)
                 and p.stat().st_size > 64 and p.suffix != ".json")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["zarr-float16-text", "arrow-q8-text"])
@pytest.mark.parametrize("tamper", ["flipped byte", "truncated shard", "manifest edited", "manifest re-signed",
                                    "NaN re-signed", "no manifest"])
def test_a_hostile_cache_is_refused_with_open_caches_error(name, tamper, caches, tmp_path):
    """Before any Arrow file of it exists, and after one was made from the good files (a changed shard is never
    answered from cache_dir)."""
    folder = copy_of(caches[name], tmp_path)
    cache_dir = tmp_path / "datasets"
    cache_dataset(folder, cache_dir=cache_dir)  # the good files, written to cache_dir
    fresh = tmp_path / "fresh"
    shard = folder / open_cache(folder).shards[0].name
    if tamper == "flipped byte":
        flip_a_byte(folder)
    elif tamper == "truncated shard":
        path = shard if shard.is_file() else next(p for p in sorted(shard.rglob("*")) if p.is_file())
        path.write_bytes(path.read_bytes()[:-5])
    elif tamper == "manifest edited":
        m = json.loads((folder / "manifest.json").read_text())
        m["top_k"] = 4
        (folder / "manifest.json").write_text(json.dumps(m))
    elif tamper == "manifest re-signed":
        resign(folder, lambda m: m.update(top_k=4))
    elif tamper == "NaN re-signed":
        rewrite_field(folder, "label_logprob", lambda a: a.__setitem__(np.nonzero(a)[0][0], np.nan))
    else:
        (folder / "manifest.json").unlink()
    assert_refused_as_open_cache_refuses(folder, fresh)  # read from the folder
    assert_refused_as_open_cache_refuses(folder, cache_dir)  # where the good files' Arrow file is


def test_cache_dir_inside_the_cache_is_refused(caches, tmp_path):
    folder = copy_of(caches["zarr-float16-text"], tmp_path)
    before = snapshot(folder)
    for inside in (folder, folder / "datasets"):
        with pytest.raises(ValueError, match="cache_dir: .* inside the cache"):
            cache_dataset(folder, cache_dir=inside)
    assert snapshot(folder) == before


# -- the Hub ---------------------------------------------------------------------------------------------------
def test_a_hub_cache_is_downloaded_and_verified(caches, tmp_path, monkeypatch):
    folder = copy_of(caches["arrow-float16-chat"], tmp_path)
    calls = []
    fake_download(monkeypatch, folder, calls)
    ds = cache_dataset("hf://me/chats@v3", cache_dir=tmp_path / "datasets")
    ref = CacheDataset(folder)
    assert calls == [("me/chats", "dataset", "v3")] and len(ds) == len(ref)
    assert all(torch.equal(ds[1][k], v) for k, v in ref[1].items())
    flip_a_byte(folder)
    with pytest.raises(CorruptShardError, match="shard-00000"):
        cache_dataset("hf://me/chats@v3", cache_dir=tmp_path / "datasets")
    with pytest.raises(ValueError, match=r"cache hf://me/chats@\.\./x: a Hub cache is hf://OWNER/NAME"):
        cache_dataset("hf://me/chats@../x", cache_dir=tmp_path / "datasets")
    assert len(calls) == 2  # the bad revision never reached the Hub


def test_inspect_a_hub_cache(caches, tmp_path, monkeypatch, capsys):
    """`mft inspect hf://OWNER/NAME@REVISION`: downloaded, every shard verified, the same statistics as the folder's;
    a changed shard exits 3 naming it; a bad reference exits 2 naming CACHE before the Hub is asked."""
    folder = copy_of(caches["zarr-float16-text"], tmp_path)
    calls = []
    fake_download(monkeypatch, folder, calls)
    assert main(["inspect", "hf://me/c@v1", "--json"]) == 0
    hub = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(folder), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert calls == [("me/c", "dataset", "v1")]
    assert hub["hub"] == "hf://me/c@v1" and hub["verified"] is True and local["hub"] is None
    assert {k: v for k, v in hub.items() if k not in ("hub", "verified")} == \
        {k: v for k, v in local.items() if k not in ("hub", "verified")}
    assert main(["inspect", "hf://me/c"]) == 0
    text = capsys.readouterr().out
    assert f"hf://me/c ({folder})" in text and "verified" in text
    flip_a_byte(folder)
    assert main(["inspect", "hf://me/c@v1"]) == 3
    assert "shard-00000" in capsys.readouterr().err
    assert main(["inspect", "hf://me/c@/etc"]) == 2
    err = capsys.readouterr().err
    assert "CACHE hf://me/c@/etc" in err and "Traceback" not in err and len(calls) == 3


def test_mft_trainer_trains_on_it_as_on_cache_dataset(caches, llama, tmp_path):
    """MFTTrainer on the datasets.Dataset gives the losses it gives on CacheDataset, step by step, in the same row
    order, with TrainingArguments' default remove_unused_columns=True (MFTTrainer keeps every column: the model's
    forward names none of them, and plain Trainer would drop them all)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from mft_cache.hf import MFTTrainer

    folder = caches["zarr-float16-text"]
    losses = {}
    for name, rows in (("cache_dataset", cache_dataset(folder, cache_dir=tmp_path / "datasets")),
                       ("CacheDataset", CacheDataset(folder))):
        got = losses[name] = []

        class Recording(MFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                got.append(loss.item())
                return loss

        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=3,
                                 learning_rate=1e-3, seed=0, report_to="none", save_strategy="no",
                                 logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
        Recording(model=model, args=args, train_dataset=rows, mft_loss=MFTLoss(tau=0.25),
                  same_order_as_mft_train=True).train()
    assert len(losses["cache_dataset"]) == 3 and losses["cache_dataset"] == losses["CacheDataset"]
