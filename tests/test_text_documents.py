"""Plain text packed as documents (--packing document; rows/windows.py) on tiny models: a document's windows cover
each of its tokens exactly once; every window starts with BOS where the tokenizer adds one (Llama) and never where it
adds none (GPT-2); the cache holds, at every trained position, the teacher's values for each document (or window) run
alone; the manifest records the rule with data.format text, its validation refuses what cannot hold it, and the
identity of text caches is unchanged (concat stays the default); a run and its resume on such a cache, evaluation
sets and the online teacher following its packing; bench/text_packing.py's reference equals the document path."""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_texts, write_jsonl
from helpers import cli, resign, subprocess_env, train_args
from mft_cache.cli import main
from mft_cache.models import load_tokenizer
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.rows import DocumentStream, RowSpec, build_rows, stream_batches
from mft_cache.rows.windows import text_windows
from mft_cache.storage import ManifestError, open_cache

SEQ = 32
ROOT = Path(__file__).resolve().parent.parent


def encode(tok, text: str) -> list[int]:
    """A document's tokens, written out here: the tokenizer's special tokens, then EOS if it added none."""
    ids = list(tok(text)["input_ids"])
    return ids if ids[-1:] == [tok.eos_token_id] else ids + [tok.eos_token_id]


def windows_of(ids: list[int], seq_len: int, bos: int | None) -> list[list[int]]:
    """The windows of a document, written plainly: its first seq_len tokens, then (BOS, or the token before) + the
    next seq_len - 1, until none is left."""
    out, p = [ids[:seq_len]], seq_len
    while p < len(ids):
        out.append([bos if bos is not None else ids[p - 1]] + ids[p:p + seq_len - 1])
        p += seq_len - 1
    return out


def runs(segment_ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every document (or window) of a row, in order: the runs of equal non-zero segment ids."""
    out, t = [], 0
    while t < len(segment_ids):
        n = 1
        while t + n < len(segment_ids) and segment_ids[t + n] == segment_ids[t]:
            n += 1
        if segment_ids[t]:
            out.append((t, n))
        t += n
    return out


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Short documents that share rows and long ones of two to five windows at SEQ."""
    return make_texts(14, seed=7, min_words=1, max_words=24)


@pytest.fixture(scope="module")
def docs(texts, tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("text-docs") / "docs.jsonl", texts)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text-document-caches")


@pytest.fixture(scope="module")
def llama_cache(llama, docs, root) -> Path:
    """k = vocabulary, float32: the teacher's whole distribution at every trained position."""
    out = root / "llama"
    build_cache(CacheConfig(model=str(llama), data=str(docs), out=str(out), seq_len=SEQ, top_k=300,
                            logprob_dtype="float32", packing="document", batch_size=3, shard_mb=0.1))
    return out


@pytest.fixture(scope="module")
def gpt2_cache(gpt2, docs, root) -> Path:
    out = root / "gpt2"
    build_cache(CacheConfig(model=str(gpt2), data=str(docs), out=str(out), seq_len=SEQ, top_k=8,
                            logprob_dtype="float32", packing="document", batch_size=3, format="arrow"))
    return out


# -- windows ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len", [2, 3, 5, 32])
@pytest.mark.parametrize("bos", [None, 299])
def test_windows_cover_every_token_exactly_once(seq_len, bos):
    rng = np.random.default_rng(seq_len)
    for n in [1, 2, seq_len - 1, seq_len, seq_len + 1, 2 * seq_len, *rng.integers(1, 120, 20).tolist()]:
        if n < 1:
            continue
        doc = rng.integers(0, 298, n).tolist()
        got = text_windows(doc, seq_len, bos)
        assert got == windows_of(doc, seq_len, bos)
        assert all(1 <= len(w) <= seq_len for w in got) and all(len(w) >= 2 for w in got[1:])
        assert [x for w in got for x in w[1:]] == doc[1:]  # the labels: every token but the first, once each
        assert got[0] + [x for w in got[1:] for x in w[1:]] == doc  # the document back
        assert len(got) == 1 + -(-max(0, n - seq_len) // (seq_len - 1))
        if bos is not None:
            assert all(w[0] == bos for w in got[1:])
    with pytest.raises(ValueError, match="--seq-len must be at least 2"):
        text_windows([1, 2, 3], 1, None)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rows_hold_each_document_whole_or_in_windows_each_token_trained_once(kind, request, docs, texts):
    """Every document or window is one run of segment ids, in order, each starting with BOS where the tokenizer adds
    one and never where it adds none; the trained labels are each document's tokens but its first, once each; the
    offsets point at each document's first window."""
    tok = load_tokenizer(str(request.getfixturevalue(kind)))
    bos = tok.bos_token_id if kind == "llama" else None
    encoded = [encode(tok, t) for t in texts]
    assert (encoded[0][0] == tok.bos_token_id) == (kind == "llama")
    want = [w for ids in encoded for w in windows_of(ids, SEQ, bos)]
    assert max(len(ids) for ids in encoded) > 2 * SEQ and min(len(ids) for ids in encoded) < SEQ // 2
    parts = list(stream_batches(DocumentStream(docs), tok, RowSpec("text", "all", "document", SEQ)))
    ids = np.concatenate([p.input_ids for p in parts])
    seg = np.concatenate([p.segment_ids for p in parts])
    mask = np.concatenate([p.trained for p in parts])
    offsets = np.concatenate([p.doc_offsets for p in parts])
    got, starts, trained = [], {}, 0
    for r in range(len(ids)):
        row_runs = runs(seg[r])
        for s, n in row_runs:
            got.append(ids[r, s:s + n].tolist())
            starts[r * SEQ + s] = len(got) - 1
            assert mask[r, s:s + n - 1].all()  # every label inside the run
            trained += n - 1
        assert mask[r].sum() == sum(n - 1 for _, n in row_runs)  # and none across runs, nor in the padding
    assert got == want and max(len(runs(r)) for r in seg) >= 2  # windows and documents share rows
    assert trained == sum(len(d) - 1 for d in encoded)
    firsts = np.cumsum([0] + [len(windows_of(d, SEQ, bos)) for d in encoded])[:-1]
    assert [starts[int(o)] for o in offsets[:-1]] == firsts.tolist() and offsets[-1] == len(ids) * SEQ
    window_starts = [w[0] for w in got]
    if kind == "llama":
        assert all(x == tok.bos_token_id for x in window_starts)
    else:
        assert tok.bos_token_id not in window_starts and len(got) > len(encoded)
    packed, _ = build_rows(docs, tok, SEQ, packing="document")  # stage two's rows: the same
    np.testing.assert_array_equal(packed.input_ids, ids)
    np.testing.assert_array_equal(packed.label_mask, mask)


# -- the cache ----------------------------------------------------------------------------------------------------
def teacher_alone(model_dir: Path, window: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].float(), -1)[:-1]  # (n-1, V)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_cache_holds_the_teacher_of_each_document_alone(kind, request, texts):
    """At every trained position, the cached log-probs of a document packed with others (or of one of its windows)
    are the teacher's on that document (window) run alone; nothing across documents is trained."""
    model_dir = request.getfixturevalue(kind)
    cache = open_cache(request.getfixturevalue(f"{kind}_cache"), verify="full")
    tok = load_tokenizer(str(model_dir))
    k = cache.top_k
    got_windows = 0
    for r in range(len(cache)):
        row = cache[r]
        seg = row["segment_ids"].numpy()
        assert len(runs(seg)) >= 1
        for s, n in runs(seg):
            window = row["input_ids"][s:s + n].tolist()
            full = teacher_alone(model_dir, window)  # (n-1, V)
            ref = full.topk(k, -1).values
            torch.testing.assert_close(row["topk_logprobs"][s:s + n - 1], ref, rtol=1e-5, atol=2e-5)
            labels = torch.tensor(window[1:])
            torch.testing.assert_close(row["label_logprob"][s:s + n - 1], full.gather(1, labels[:, None])[:, 0],
                                       rtol=1e-5, atol=2e-5)
            got_windows += 1
        assert int(row["label_mask"].sum()) == sum(n - 1 for _, n in runs(seg))
    want = sum(len(windows_of(encode(tok, t), SEQ, tok.bos_token_id if kind == "llama" else None)) for t in texts)
    assert got_windows == want > len(texts)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_manifest_records_text_packed_as_documents(kind, request, texts):
    folder = request.getfixturevalue(f"{kind}_cache")
    tok = load_tokenizer(str(request.getfixturevalue(kind)))
    m = open_cache(folder, verify="full").manifest
    j = m.to_json()
    assert m.rule == "document" and m.data.format == "text" and m.data.train_on == "all" and m.bos_id is None
    assert j["packing"]["bos_token_id"] == (tok.bos_token_id if kind == "llama" else None)
    assert ("BOS" in j["packing"]["description"]) == (kind == "llama") and "windows" in j["packing"]["description"]
    assert "long_rows" not in j["data"] and j["config"]["long_rows"] == "split"
    assert j["config"]["packing"] == "document" and j["config"]["data_format"] == "text"
    assert m.data.num_documents == len(texts) and len(np.load(folder / "documents.npy")) == len(texts) + 1
    assert m.num_tokens == sum(len(encode(tok, t)) - 1 for t in texts)
    assert "segment_ids" in [f["name"] for f in j["schema"]]


def test_a_manifest_that_cannot_hold_the_rule_is_refused(llama_cache, tmp_path):
    def copy(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(llama_cache, folder)
        resign(folder, edit)
        return folder

    without = copy("no-segments", lambda m: m.update(schema=[f for f in m["schema"] if f["name"] != "segment_ids"]))
    with pytest.raises(ManifestError, match=r"packing\.rule.*'document', which a cache without segment_ids cannot hold"):
        open_cache(without)
    per_row = copy("bos-per-row", lambda m: m["packing"].update(rule="bos-per-row"))
    with pytest.raises(ManifestError, match=r"packing\.rule.*'bos-per-row', which a cache of documents packed whole"):
        open_cache(per_row)
    big = copy("bos-out-of-range", lambda m: m["packing"].update(bos_token_id=300))
    with pytest.raises(ManifestError, match=r"packing\.bos_token_id"):
        open_cache(big)
    no_bos = copy("bos-null", lambda m: m["packing"].update(bos_token_id=None))  # as a tokenizer without BOS records
    assert open_cache(no_bos, verify="full").manifest.rule == "document"


# -- identity: text stays concatenated by default -------------------------------------------------------------------
def test_text_stays_concatenated_by_default_and_its_identity_unchanged(llama, docs, tmp_path):
    m = build_cache(CacheConfig(model=str(llama), data=str(docs), out=str(tmp_path / "c"), seq_len=SEQ,
                                top_k=4)).to_json()
    assert m["packing"]["rule"] == "bos-per-row" and "segment_ids" not in [f["name"] for f in m["schema"]]
    assert not {"long_rows", "data_format", "train_on"} & set(m["config"]) and m["config"]["packing"] == "bos-per-row"


def test_the_long_rows_policy_does_not_apply_to_text(llama, docs, llama_cache, tmp_path, caplog):
    """Any --long-rows gives the same rows: the finished cache is complete for each. A text cache packed as documents
    whose identity records a policy (made before text was cut into windows, its long documents dropped or cut) is
    refused, naming long_rows; one that records none (made before the flag: every document held whole) is not."""
    cfg = dict(model=str(llama), data=str(docs), seq_len=SEQ, top_k=300, logprob_dtype="float32",
               packing="document", batch_size=3, shard_mb=0.1)
    with caplog.at_level(logging.INFO):
        for policy in ("drop", "truncate", "refuse"):
            build_cache(CacheConfig(out=str(llama_cache), long_rows=policy, **cfg))
    assert sum("already complete" in r.getMessage() for r in caplog.records) == 3
    older = tmp_path / "older"
    shutil.copytree(llama_cache, older)
    resign(older, lambda m: m["config"].update(long_rows="drop"))
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['long_rows'\]\)"):
        build_cache(CacheConfig(out=str(older), **cfg))
    oldest = tmp_path / "oldest"
    shutil.copytree(llama_cache, oldest)
    resign(oldest, lambda m: m["config"].pop("long_rows"))
    before = (oldest / "manifest.json").read_bytes()
    build_cache(CacheConfig(out=str(oldest), **cfg))
    assert (oldest / "manifest.json").read_bytes() == before


# -- stage two ----------------------------------------------------------------------------------------------------
def test_evaluation_sets_follow_the_cache_packing(llama_cache, llama, docs, tmp_path):
    from mft_cache.trainer.checks import cache_row_spec
    from mft_cache.trainer.config import TrainConfig
    from mft_cache.trainer.inputs import open_eval_sets

    evals = write_jsonl(tmp_path / "val.jsonl", make_texts(4, seed=9, min_words=5, max_words=30))
    tok = load_tokenizer(str(llama))
    cfg = TrainConfig(cache=str(llama_cache), eval_specialized=str(evals))
    spec = cache_row_spec(open_cache(llama_cache).manifest, cfg)
    assert spec.windowed_text
    rows = open_eval_sets(cfg, tok, SEQ, spec)["specialized"].source
    want, _ = build_rows(evals, tok, SEQ, packing="document")
    assert rows.segment_ids is not None
    np.testing.assert_array_equal(rows.input_ids, want.input_ids)
    concat = open_eval_sets(cfg, tok, SEQ, RowSpec("text", "all", "concat", SEQ))["specialized"].source
    assert concat.segment_ids is None and concat.num_predictions == rows.num_predictions  # the same labels, BOS


def test_the_cache_equals_the_online_teacher(llama_cache, llama, docs, tmp_path):
    """k = vocabulary: training from the cache gives the losses of the online teacher on the same rows (--packing
    document with --teacher online windows the text the same way)."""
    from hf_trainer_worker import reset_accelerate
    from mft_cache.trainer.config import TrainConfig
    from mft_cache.trainer.train import train

    common = dict(steps=4, batch_size=3, lr=3e-3, warmup_steps=1, eval_every=100, save_every=0, log_every=100)

    def losses(name: str) -> torch.Tensor:
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([x["loss"] for x in lines if x["type"] == "train"], dtype=torch.float64)

    train(TrainConfig(cache=str(llama_cache), out=str(tmp_path / "cached"), **common))
    reset_accelerate()
    train(TrainConfig(teacher="online", model=str(llama), data=str(docs), seq_len=SEQ, packing="document",
                      out=str(tmp_path / "online"), **common))
    assert len(losses("cached")) == 4
    torch.testing.assert_close(losses("cached"), losses("online"), rtol=1e-4, atol=0)


def test_a_run_and_its_resume_on_a_text_document_cache(llama_cache, tmp_path):
    """Stopped (SIGKILL) after step 3 and resumed from its step-2 checkpoint, a run on such a cache ends with the
    weights and metrics of an uninterrupted one; its evaluation sets are packed as documents too."""
    from hf_trainer_worker import reset_accelerate
    from safetensors.torch import load_file

    evals = write_jsonl(tmp_path / "val.jsonl", make_texts(4, seed=9, min_words=5, max_words=30))
    options = dict(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, save_every=2, eval_every=3, log_every=100,
                   samples=0, eval_specialized=evals, eval_general=evals)
    killed = subprocess.run(cli(train_args(llama_cache, tmp_path / "r", **options)), capture_output=True, text=True,
                            env=subprocess_env(MFT_FAULT="train:step-3"), timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert main(train_args(llama_cache, tmp_path / "r", "--resume", **options)) == 0
    reset_accelerate()
    assert main(train_args(llama_cache, tmp_path / "u", **options)) == 0

    def metrics(name):
        keep = ("type", "step", "loss", "lr", "tokens", "ppl_specialized", "ppl_general")
        return [{k: v for k, v in json.loads(x).items() if k in keep}
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert metrics("r") == metrics("u") and len([m for m in metrics("u") if m["type"] == "train"]) == 6
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("r", "u"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bench/text_packing.py ------------------------------------------------------------------------------------------
def test_the_bench_reference_equals_document_packing(llama, docs, tmp_path):
    """bench/text_packing.py on tiny data: each document alone through plain transformers (1) and `mft train`'s
    evaluation of the rows packed as documents (3) give the same perplexity over the same tokens; concatenation (2)
    counts the same tokens (a BOS tokenizer) but lets documents see each other."""
    spec = importlib.util.spec_from_file_location("text_packing", ROOT / "bench" / "text_packing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = bench.main(["--model", str(llama), "--data", str(docs), "--seq-lens", "32,64", "--device", "cpu",
                         "--batch-size", "3", "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "text_packing.json").read_text())["results"] == record["results"]
    assert [r["seq_len"] for r in record["results"]] == [32, 64] and record["bos_windows"]
    for r in record["results"]:
        assert r["reference"]["tokens"] == r["document"]["tokens"] == r["concat"]["tokens"]
        assert r["document"]["ppl"] == pytest.approx(r["reference"]["ppl"], rel=1e-5)
        assert r["concat"]["ppl"] != pytest.approx(r["reference"]["ppl"], rel=1e-5)
