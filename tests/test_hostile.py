"""Hostile input: values no teacher can produce in a cache, and random bytes in every data format."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.storage import CorruptShardError, open_cache, read_documents
from mft_cache.storage.backends import ArrowBackend, checksum, size_on_disk
from mft_cache.storage.manifest import save_manifest


def _tamper(folder: Path, field: str, edit) -> str:
    """Rewrite shard 0 with `edit` applied to one field and re-sign it: checksums match, values are wrong."""
    cache = open_cache(folder, verify="none")
    shard = cache.shards[0]
    arrays = cache.read_rows(0, shard["rows"])
    arrays = {k: np.array(v) for k, v in arrays.items()}
    edit(arrays[field])
    path = folder / shard["name"]
    ArrowBackend.write(path, cache.schema, arrays)
    manifest = dict(cache.manifest)
    manifest["shards"] = [{**shard, "sha256": checksum(path), "bytes": size_on_disk(path)}, *manifest["shards"][1:]]
    save_manifest(folder, {k: v for k, v in manifest.items() if k != "manifest_sha256"})
    return shard["name"]


@pytest.mark.parametrize("field, edit, message", [
    ("topk_logprobs", lambda a: a.__setitem__((1, 3, 0), np.nan), "NaN"),
    ("label_logprob", lambda a: a.__setitem__((0, 5), np.inf), "+inf"),
    ("topk_logprobs", lambda a: a.__setitem__((0, 0, 0), 2.5), "positive"),
    ("topk_ids", lambda a: a.__setitem__((2, 1, 1), 299 + 1), "outside [0, 300)"),
    ("input_ids", lambda a: a.__setitem__((0, 0), 65535), "outside [0, 300)"),
    ("length", lambda a: a.__setitem__(0, 10_000), "outside [0, 48]"),
])
def test_impossible_values_in_a_cache_are_refused(field, edit, message, llama, docs_jsonl, tmp_path, reliability):
    folder = tmp_path / "c"
    build_cache(CacheConfig(model=str(llama), data=str(docs_jsonl), out=str(folder), seq_len=48, top_k=4, format="arrow"))
    name = _tamper(folder, field, edit)
    open_cache(folder, verify="none")[0]  # checksums and manifest are consistent: only the values are wrong
    with pytest.raises(CorruptShardError, match=re.escape(name) + ".*" + re.escape(field) + ".*" + re.escape(message)):
        open_cache(folder)[0]
    with pytest.raises(CorruptShardError, match=name):
        open_cache(folder, verify="full")
    reliability("hostile input", f"a re-signed cache whose `{field}` holds {message} values",
                f"refused on first read and by `verify`, naming `{name}`, the field and the row; never reaches a loss")


SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
_FUZZ_CASES: set[str] = set()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from(SUFFIXES), payload=st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=50), st.dictionaries(st.text(max_size=5), st.text(max_size=20))),
             max_size=20).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
))
def test_random_bytes_in_any_format_give_documents_or_a_clear_error(suffix, payload, tmp_path):
    _FUZZ_CASES.add(suffix)
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(payload)
    try:
        docs = read_documents(path)
    except (ValueError, FileNotFoundError) as e:
        assert str(path) in str(e) or "--data" in str(e), e  # names the file or the flag
    else:
        assert docs.texts and all(isinstance(t, str) and t.strip() for t in docs.texts)


def test_huge_line_and_empty_documents(tmp_path, reliability):
    big = "word " * 400_000
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": big}) + "\n" + json.dumps({"text": ""}) + "\n")
    docs = read_documents(tmp_path / "d.jsonl")
    assert len(docs.texts) == 1 and docs.num_empty == 1
    reliability("hostile input", "a 2 MB single-line document and an empty document", "read; the empty one skipped "
                "and counted in the manifest")


def test_fuzzing_covered_every_format(reliability):
    """Runs after the fuzz test (file order): its examples reached every reader."""
    if not _FUZZ_CASES:
        pytest.skip("the fuzz test was not selected")
    assert _FUZZ_CASES == set(SUFFIXES)
    reliability("hostile input", "hypothesis: random bytes, text and JSON rows as .txt/.jsonl/.json/.csv/.parquet "
                "(60 examples)", "documents or a ValueError naming the file; no hang, no crash")
