"""Stage one's streaming ingestion: the rows, offsets and fingerprint it writes are those of the in-memory path
(read every document, tokenize them all, `pack`), for every input format; memory does not grow with the corpus; hub
datasets stream; and reading a cache in stage two holds a bounded amount whatever its size. (A build killed while it
ingests, or after, and run again: test_faults_cache.py.)"""
from __future__ import annotations

import csv
import gc
import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import make_texts, write_jsonl
from helpers import snapshot
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.storage import open_cache
from mft_cache.rows.documents import DocumentStream, read_documents
from mft_cache.rows.ingest import FILES, IngestedRows, ingest
from mft_cache.rows.packing import StreamPacker, bos_rule, encode_documents, pack, pad_id_of

SEQ = 48


def _texts() -> list[str]:
    texts = make_texts(120, seed=3) + ["", "   "] + make_texts(10, seed=4, min_words=200, max_words=400)
    random.Random(0).shuffle(texts)
    return texts


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same documents in every input format the reader takes."""
    root = tmp_path_factory.mktemp("formats")
    texts = _texts()
    out = {"jsonl": write_jsonl(root / "d.jsonl", texts)}
    out["json"] = root / "d.json"
    out["json"].write_text(json.dumps([{"text": t} for t in texts]))
    out["csv"] = root / "d.csv"
    with open(out["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(texts))
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    out["parquet"] = root / "d.parquet"
    pq.write_table(pa.table({"text": texts}), out["parquet"], row_group_size=7)  # several row groups and batches
    Dataset.from_dict({"text": texts}).save_to_disk(str(root / "saved"))
    out["saved"] = root / "saved"
    folder = root / "txt"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i:04d}.txt").write_text(t)
    out["txt-folder"] = folder
    return out


def _in_memory(source, tokenizer, seq_len=SEQ):
    """The reference: every document held, every one tokenized, then packed at once."""
    docs = read_documents(source)
    return pack(encode_documents(docs.texts, tokenizer), seq_len, pad_id_of(tokenizer), bos_rule(tokenizer)), docs


@pytest.mark.parametrize("seed", range(4))
def test_stream_packer_cuts_the_rows_pack_cuts(seed):
    rng = random.Random(seed)
    for _ in range(60):
        bos = rng.choice([None, 1])
        t = rng.randint(2, 12)
        docs = [[rng.randint(2, 50) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(1, 25))]
        if bos is not None:
            for d in docs:
                d[0] = bos
        ref = pack(docs, t, 0, bos)
        packer, parts, i = StreamPacker(t, 0, bos), [], 0
        while i < len(docs):  # documents arrive in batches of random size
            j = i + rng.randint(1, 5)
            parts.append(packer.add(docs[i:j]))
            i = j
        parts.append((*packer.finish(), np.array([packer.total])))
        assert np.array_equal(np.concatenate([p[0] for p in parts]), ref.input_ids)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), ref.lengths)
        assert np.array_equal(np.concatenate([p[2] for p in parts]), ref.doc_offsets)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "saved", "txt-folder"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # BOS on every row, and plain slices
def test_ingested_rows_equal_the_in_memory_packing(fmt, kind, sources, request, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(kind))
    ref, docs = _in_memory(sources[fmt], tokenizer)
    stream = DocumentStream(sources[fmt])
    rows = ingest(tmp_path, stream, tokenizer, seq_len=SEQ, id_dtype="uint16", rows_per_shard=5)
    ids, lengths = rows.read(0, rows.num_sequences)
    assert np.array_equal(ids, ref.input_ids) and np.array_equal(lengths, ref.lengths)
    assert np.array_equal(np.fromfile(tmp_path / ".ingest-documents.bin", dtype="<i8"), ref.doc_offsets)
    assert rows.info["fingerprint"] == docs.fingerprint and rows.num_predictions == ref.num_predictions
    assert rows.info["num_empty"] == 2 and rows.info["num_documents"] == len(docs.texts)
    per_shard = [int(ref.label_mask[i: i + 5].sum()) for i in range(0, ref.num_sequences, 5)]
    assert rows.info["shard_tokens"] == per_shard
    # documents.npy, copied from disk a piece at a time, is the file np.save writes
    info = rows.write_documents(tmp_path / "documents.npy")
    reference = tmp_path / "reference.npy"
    np.save(reference, ref.doc_offsets)
    assert (tmp_path / "documents.npy").read_bytes() == reference.read_bytes()
    assert info["bytes"] == reference.stat().st_size


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_every_input_format_gives_the_same_cache_as_the_in_memory_rows(backend, sources, llama, tmp_path):
    """The cache's rows and documents.npy are the in-memory packing's; and since a shard depends only on its rows,
    the same documents in any format give the same cache, file for file."""
    from transformers import AutoTokenizer

    ref, docs = _in_memory(sources["jsonl"], AutoTokenizer.from_pretrained(llama))
    files = {}
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / fmt
        m = build_cache(CacheConfig(model=str(llama), data=str(sources[fmt]), out=str(out), seq_len=SEQ, top_k=4,
                                    format=backend, shard_mb=0.1))
        assert m.data.fingerprint == docs.fingerprint and m.num_tokens == ref.num_predictions
        cache = open_cache(out)
        got = cache.read_rows(0, len(cache))
        assert np.array_equal(got["input_ids"], ref.input_ids) and np.array_equal(got["length"], ref.lengths)
        assert np.array_equal(np.load(out / "documents.npy"), ref.doc_offsets)
        assert not any((out / n).exists() for n in FILES)  # the ingested rows are gone once the manifest is written
        files[fmt] = snapshot(out, "manifest.json")
    assert len(files["jsonl"]) > 3 and all(f == files["jsonl"] for f in files.values())


def test_ingestion_memory_does_not_grow_with_the_corpus(llama, tmp_path):
    """Python's peak allocations (numpy's included) while ingesting 8x more documents stay the same: the documents,
    their token lists and the rows are never all held (both corpora fill several tokenizer batches of 256)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    peaks = {}
    for n in (800, 6400):
        data = write_jsonl(tmp_path / f"d{n}.jsonl", make_texts(n, seed=n))
        folder = tmp_path / f"ingest{n}"
        folder.mkdir()
        tracemalloc.start()
        rows = ingest(folder, DocumentStream(data), tokenizer, seq_len=SEQ, id_dtype="uint16", rows_per_shard=50)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert rows.num_sequences > n // 4
    assert peaks[6400] < 1.15 * peaks[800], peaks


def test_a_hub_dataset_is_read_through_the_datasets_streaming_loader(sources, monkeypatch):
    """A hub id goes to `datasets.load_dataset(..., streaming=True)`; here the hub is a local folder of JSON Lines
    files loaded by that same streaming loader, and the documents and fingerprint are those of the file."""
    import datasets

    real, calls = datasets.load_dataset, []

    def local_hub(path, split=None, streaming=False, **kw):
        calls.append((path, split, streaming))
        return real(str(sources["jsonl"].parent), data_files={"train": sources["jsonl"].name}, split=split,
                    streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", local_hub)
    stream = DocumentStream("someone/licences")
    texts = list(stream)
    assert calls == [("someone/licences", "train", True)]
    ref = read_documents(sources["jsonl"])
    assert texts == ref.texts and stream.fingerprint == ref.fingerprint and stream.signature() is None
    assert isinstance(real(str(sources["jsonl"].parent), data_files={"train": sources["jsonl"].name}, split="train",
                           streaming=True), datasets.IterableDataset)


def _synthetic_cache(folder: Path, num_shards: int) -> Path:
    """A zarr cache of `num_shards` shards of 4 random valid rows, written without a teacher."""
    from mft_cache.storage import CacheMetadata, CacheWriter, cache_schema, store_rows
    from test_backends import shard_arrays

    schema = cache_schema(vocab_size=50, top_k=3, seq_len=6)
    writer = CacheWriter(folder, fmt="zarr", schema=schema, identity={"what": "toy"})
    for i in range(num_shards):
        writer.write_shard(i, store_rows(shard_arrays(4, i), schema))
    rows = 4 * num_shards
    meta = CacheMetadata(model={"id": "toy"}, tokenizer={"fingerprint": "t", "bos_token_id": None}, vocab_size=50,
                         top_k=3, seq_len=6, logprob_dtype="float16", data={"source": "toy", "split": "train"},
                         packing={"rule": "concat", "bos_token_id": None}, num_sequences=rows, num_tokens=5 * rows,
                         num_input_tokens=6 * rows, rows_per_shard=4, num_processes=1, created_by={})
    writer.finish(meta, num_shards, np.array([0, 6 * rows]))
    return folder


@pytest.mark.slow  # about 20 s: caches of three sizes
def test_reading_a_cache_in_stage_two_holds_the_same_whatever_its_size(tmp_path):
    """Batches read through the trainer's rows from a cache of 6x more shards peak at the same Python allocations:
    at most MAX_OPEN_SHARDS shard readers stay open, and what a closed one held is freed at once."""
    from mft_cache.storage.reader import MAX_OPEN_SHARDS
    from mft_cache.trainer.data import Rows

    peaks = {}
    for n in (12, 72):
        rows = Rows(open_cache(_synthetic_cache(tmp_path / f"c{n}", n)))
        rows.batch([0])  # first-use costs (imports, codec set-up) left out of the measure
        gc.collect()
        tracemalloc.start()
        for start in range(0, len(rows), 4):
            rows.batch(list(range(start, start + 4)))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(rows.source._open) == MAX_OPEN_SHARDS
    assert peaks[72] < 1.25 * peaks[12], peaks


def test_a_source_read_once_cannot_be_read_again(sources):
    stream = DocumentStream(sources["jsonl"])
    with pytest.raises(RuntimeError, match="fingerprint is known once"):
        _ = stream.fingerprint
    assert len(list(stream)) == 130
    with pytest.raises(RuntimeError, match="read once"):
        list(stream)


def test_rows_reads_any_range(sources, llama, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    ref, _ = _in_memory(sources["jsonl"], tokenizer)
    rows = ingest(tmp_path, DocumentStream(sources["jsonl"]), tokenizer, seq_len=SEQ, id_dtype="uint16",
                  rows_per_shard=5, max_sequences=11)
    assert rows.num_sequences == 11 and isinstance(rows, IngestedRows)
    ids, lengths = rows.read(3, 9)
    assert np.array_equal(ids, ref.input_ids[3:9]) and np.array_equal(lengths, ref.lengths[3:9])
    # the offsets still cover every document: --max-sequences truncates the rows, not the data
    assert np.array_equal(np.fromfile(tmp_path / ".ingest-documents.bin", dtype="<i8"), ref.doc_offsets)
