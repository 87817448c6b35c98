"""A cache as a `datasets.Dataset` (public as `mft_cache.hf.cache_dataset`, docs/HF.md): the rows `CacheDataset`
gives, as Arrow, so that `filter`, `map`, `shuffle`, `select`, `concatenate_datasets` and the rest of the `datasets`
library apply to them.

The shards are not wrapped as they are: what a shard stores is not the per-row view (ids in the narrowest unsigned
dtype, the teacher's values at the trained positions only, q8 codes, caches of schema versions 1 and 2 without a
label mask), so the rows are read through the cache's reader (decoded, expanded, checked) and written once by
`Dataset.from_generator` into an Arrow file under `cache_dir`, which the dataset then memory-maps.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mft_cache.storage import Cache, CorruptShardError, ManifestError, open_cache
from mft_cache.storage.hub import download_cache, is_hub_ref
from mft_cache.storage.schema import SEGMENTS_FIELD

from .data import Rows

VIEW_VERSION = 1  # the per-row view the Arrow file holds; part of its fingerprint, so a change rewrites it
_CHUNK_BYTES = 64 * 2**20  # the rows read (and buffered by the Arrow writer) at a time, in bytes of the view


def cache_dataset(cache: str | Path, cache_dir: str | Path | None = None):
    """The rows of a cache as a `datasets.Dataset`, in torch format: `ds[i]` equals `CacheDataset(cache)[i]` (the
    same keys, dtypes and shapes), so `collate`, `MFTLoss` and `MFTTrainer` take its rows.

    Args:
        cache: a cache folder, or hf://OWNER/NAME[@REVISION] (downloaded as `mft train --cache` downloads it, every
            shard checked against the manifest).
        cache_dir: where `datasets` writes the Arrow file of the rows (default: its own cache,
            HF_DATASETS_CACHE). Never inside the cache folder, which is only read. The file is named after a digest
            of the cache's manifest, so a second call on the same cache reuses it.
    Returns:
        datasets.Dataset of len(cache) rows with the columns input_ids (T,) int64, length () int64, label_mask (T-1,)
        bool, topk_ids (T-1, K) int64, topk_logprobs (T-1, K) as CacheDataset gives them (float16 or float32; q8
        decoded to float32), label_logprob (T-1,) float32 and, with documents packed whole, segment_ids (T,) int64;
        format "torch" with dtype=None (`with_format("numpy", dtype=None)` for arrays of the same dtypes; datasets'
        default dtype would turn float16 into float32).
    Raises:
        what open_cache raises for the same folder: FileNotFoundError, ManifestError, CorruptShardError (every
        shard is checked as it is read; an Arrow file reused from cache_dir is returned only once every shard of
        the folder passes the same check, Cache.verify_shard); ValueError for a bad hf:// reference or a cache_dir
        inside the cache.
    """
    from datasets import Dataset, config
    from datasets.exceptions import DatasetGenerationError

    folder = download_cache(str(cache), "cache") if is_hub_ref(str(cache)) else Path(cache)
    opened = open_cache(folder)  # the manifest and every shard's place and size, checked
    target = Path(cache_dir if cache_dir is not None else config.HF_DATASETS_CACHE)
    if _inside(target, opened.folder):
        raise ValueError(f"cache_dir: {target} lies inside the cache {opened.folder}, which is only read; give a "
                         "folder outside it (or none: datasets' own cache, HF_DATASETS_CACHE)")
    features = view_features(opened)
    rows_per_chunk = max(1, _CHUNK_BYTES // _view_bytes(features))
    state = {"generated": False}

    def generate():
        state["generated"] = True
        yield from _view_rows(opened, features, rows_per_chunk)

    try:
        ds = Dataset.from_generator(generate, features=features, cache_dir=None if cache_dir is None else str(cache_dir),
                                    fingerprint=view_fingerprint(opened), writer_batch_size=rows_per_chunk)
    except DatasetGenerationError as e:  # the reader's own error, as open_cache's readers see it
        if isinstance(e.__cause__, (CorruptShardError, ManifestError)):
            raise e.__cause__ from None
        raise
    if not state["generated"]:  # reused from cache_dir: only for shards that still hold the bytes it was made of
        for i in range(len(opened.shards)):
            opened.verify_shard(i)  # what reading them would have checked
    return ds.with_format("torch", dtype=None)


def view_features(cache: Cache):
    """The `datasets.Features` of a cache's per-row view (what Rows.batch gives for one row), from its manifest."""
    from datasets import Array2D, Features, List, Value

    m = cache.manifest
    t, k = m.seq_len, m.top_k
    fields = {f.name: f for f in cache.schema}
    lp = fields["topk_logprobs"]
    lp_dtype = "float32" if lp.encoding is not None else lp.dtype  # decoded on read
    out = {"input_ids": List(Value("int64"), length=t), "length": Value("int64"),
           "label_mask": List(Value("bool"), length=t - 1), "topk_ids": Array2D((t - 1, k), "int64"),
           "topk_logprobs": Array2D((t - 1, k), lp_dtype),
           "label_logprob": List(Value(fields["label_logprob"].dtype), length=t - 1)}
    if SEGMENTS_FIELD in fields and m.rule == "document":  # the reader gives them for documents packed whole only
        out[SEGMENTS_FIELD] = List(Value("int64"), length=t)
    return Features(out)


def view_fingerprint(cache: Cache) -> str:
    """The Arrow file's identity: a digest of the cache's manifest (its shards' sha256s among it) and VIEW_VERSION."""
    text = json.dumps({"manifest": cache.manifest.to_json(), "view": VIEW_VERSION}, sort_keys=True)
    return "mft-cache-" + hashlib.sha256(text.encode()).hexdigest()[:32]


class _Consecutive:
    """A cache whose take() reads a run of consecutive rows with one read_rows (Cache.take reads row by row); the
    arrays are the same, so Rows.batch gives CacheDataset's items."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def take(self, rows: list[int]) -> dict[str, np.ndarray]:
        assert rows == list(range(rows[0], rows[-1] + 1)), "consecutive rows only"
        return self.cache.read_rows(rows[0], rows[-1] + 1)


def _view_rows(cache: Cache, features, rows_per_chunk: int):
    """Each row of the cache as a dict of numpy arrays, read rows_per_chunk rows at a time."""
    rows = Rows(_Consecutive(cache))
    for a in range(0, len(cache), rows_per_chunk):
        batch = rows.batch(list(range(a, min(len(cache), a + rows_per_chunk))))
        assert list(batch) == list(features), f"the view's columns {list(batch)} are not {list(features)}"
        arrays = {k: v.numpy() for k, v in batch.items()}
        for i in range(len(arrays["length"])):
            yield {k: v[i] for k, v in arrays.items()}


def _view_bytes(features) -> int:
    """Bytes of one row of the view."""
    total = 0
    for f in features.values():  # Value, List(Value, length) or Array2D
        dtype = f.feature.dtype if hasattr(f, "feature") else f.dtype
        count = f.length if hasattr(f, "feature") else int(np.prod(getattr(f, "shape", ()), dtype=np.int64))
        total += np.dtype(dtype).itemsize * count
    return total


def _inside(path: Path, folder: Path) -> bool:
    """Whether path is folder or lies under it (links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents
