"""Stage one's ingestion: documents streamed, tokenized and packed into rows on disk, in bounded memory.

`ingest` reads a DocumentStream once and appends every completed row to files in the cache folder, so that
the teacher's pass (on one process or many) reads the rows it needs from disk and nothing holds the corpus:

    .ingest-input_ids.bin   (R, seq_len) rows, the cache's id dtype, raw little-endian
    .ingest-lengths.bin     (R,) int32
    .ingest-documents.bin   (D + 1,) int64 document offsets in the stream (documents.npy's content)
    .ingest-label_mask.bin  (R, seq_len - 1) uint8, the trained positions
    .ingest-segment_ids.bin (R, seq_len) int32, documents packed whole only (rows/spec.py)
    .ingest.json            what was ingested, and from what: written with "complete": false before the first row
                            and rewritten, complete, after the last; with conversations or prompt-completion rows
                            packed whole, "long_rows" (what became of those longer than a row, rows/long_rows.py)

The rows, the offsets and the data fingerprint are exactly those `pack` and Documents.fingerprint give for the same
documents (the cache's bytes do not depend on the path that made them). The files are the build's own: they are
removed once the manifest is written.

Seeking on a rerun: a complete ingestion whose key (the source's files with their sizes and modification times,
the tokenizer, the packing and the shard size) is unchanged is reused once the source, read again without
tokenizing, gives the recorded content fingerprint (a file rewritten with the same size and time is caught); an
ingestion that was stopped is started again from the beginning (it is a small part of a build: the teacher
dominates), and a hub dataset, whose files no signature covers, is always ingested again.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mft_cache.faults import fault_point

from .documents import DocumentStream
from mft_cache.files import open_owned, remove_member, write_json_atomic
from mft_cache.masks import BOS_PER_ROW, CONCAT

from .long_rows import LongRows
from .packing import bos_rule
from .spec import RowSpec, stream_batches

log = logging.getLogger(__name__)

INGEST = ".ingest.json"
INPUT_IDS, LENGTHS, OFFSETS = ".ingest-input_ids.bin", ".ingest-lengths.bin", ".ingest-documents.bin"
SEGMENTS, MASKS = ".ingest-segment_ids.bin", ".ingest-label_mask.bin"
FILES = (INGEST, INPUT_IDS, LENGTHS, OFFSETS, SEGMENTS, MASKS)
_COPY = 1 << 20  # int64s copied at a time into documents.npy


@dataclass
class IngestedRows:
    """The ingested rows of a cache folder, read from disk a range at a time."""

    folder: Path
    info: dict  # .ingest.json

    @property
    def num_sequences(self) -> int:
        return self.info["num_sequences"]

    @property
    def seq_len(self) -> int:
        return self.info["seq_len"]

    @property
    def bos_id(self) -> int | None:
        return self.info["bos_token_id"]

    @property
    def rule(self) -> str:
        return CONCAT if self.bos_id is None else BOS_PER_ROW

    @property
    def num_predictions(self) -> int:
        return self.info["num_predictions"]

    def shard_tokens(self, i: int) -> int:
        """Trained positions of shard i (rows_per_shard rows)."""
        return self.info["shard_tokens"][i]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids (n, T) int64, lengths (n,) int32) of rows start..stop-1."""
        t, dtype = self.seq_len, np.dtype(self.info["id_dtype"])
        ids = np.fromfile(self.folder / INPUT_IDS, dtype=dtype, count=(stop - start) * t,
                          offset=start * t * dtype.itemsize).astype(np.int64).reshape(-1, t)
        lengths = np.fromfile(self.folder / LENGTHS, dtype=np.int32, count=stop - start, offset=start * 4)
        return ids, lengths

    @property
    def segmented(self) -> bool:
        """Whether the rows hold documents packed whole, with their segment ids."""
        return self.info["packing"] == "document"

    def trained(self, start: int, stop: int) -> np.ndarray:
        """(n, T-1) bool: the trained positions of rows start..stop-1."""
        t = self.seq_len
        mask = np.fromfile(self.folder / MASKS, dtype=np.uint8, count=(stop - start) * (t - 1), offset=start * (t - 1))
        return mask.astype(bool).reshape(-1, t - 1)

    def segment_ids(self, start: int, stop: int) -> np.ndarray | None:
        """(n, T) int64 segment ids of rows start..stop-1 (documents packed whole), else None."""
        if not self.segmented:
            return None
        t = self.seq_len
        seg = np.fromfile(self.folder / SEGMENTS, dtype="<i4", count=(stop - start) * t, offset=start * t * 4)
        return seg.astype(np.int64).reshape(-1, t)

    def write_documents(self, path: Path) -> dict:
        """documents.npy (the same bytes np.save writes for the offsets), copied from disk a piece at a time;
        returns {name, sha256, bytes}."""
        n = self.info["num_documents"] + 1
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (n,)})
        h, size = hashlib.sha256(header.getvalue()), len(header.getvalue())
        with open_owned(self.folder, OFFSETS, "rb") as src, open_owned(path.parent, path.name, "wb") as dst:
            dst.write(header.getvalue())
            while piece := src.read(8 * _COPY):
                h.update(piece)
                dst.write(piece)
                size += len(piece)
            dst.flush()
            os.fsync(dst.fileno())
        return {"name": path.name, "sha256": h.hexdigest(), "bytes": size}

    def remove(self) -> None:
        for name in FILES:
            (self.folder / name).unlink(missing_ok=True)


def _append(f, array: np.ndarray) -> None:
    """Append an array's bytes to an open file (a full disk raises OSError with its errno, which ndarray.tofile
    does not give)."""
    if array.size:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))


def read_info(folder: Path) -> dict:
    """.ingest.json, or {} where there is none (or it cannot be read)."""
    try:
        info = json.loads((Path(folder) / INGEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def ingest(folder: Path, stream: DocumentStream, tokenizer, *, seq_len: int, id_dtype: str, rows_per_shard: int,
           max_sequences: int = 0, key: dict | None = None, progress=None,
           spec: RowSpec | None = None) -> IngestedRows:
    """Ingest `stream` into `folder` (or reuse a complete ingestion of the same key there); see the module docstring.

    `key` holds what else decides the rows (e.g. the tokenizer's fingerprint); with the source's signature, the
    seq len, the id dtype, the shard size and max_sequences it must equal the recorded one for a reuse.
    `progress(tokens)` is called as documents are tokenized. `spec` (rows/spec.py): how rows are made; None is
    plain text concatenated."""
    folder = Path(folder)
    spec = spec or RowSpec("text", "all", "concat", seq_len)
    signature = stream.signature()
    full_key = {"signature": signature, "seq_len": seq_len, "id_dtype": id_dtype, "rows_per_shard": rows_per_shard,
                "max_sequences": max_sequences, **(key or {})}
    full_key["rows"] = {"format": spec.format, "train_on": spec.train_on, "packing": spec.packing}
    segmented = spec.packing == "document"
    if segmented:
        full_key["rows"]["long_rows"] = spec.long_rows_rule
    old = read_info(folder)
    if signature is not None and old.get("complete") and old.get("key") == full_key:
        for _ in stream:  # the content, read again (not tokenized): a signature is only sizes and times
            pass
        if stream.fingerprint == old.get("fingerprint"):
            log.info("reusing the ingested rows in %s (the source is unchanged)", folder)
            return IngestedRows(folder, old)
        log.info("the source changed since the rows in %s were ingested (same sizes and times, other content): "
                 "ingesting it again", folder)
        stream = stream.reopen()
    write_json_atomic(folder / INGEST, {"complete": False, "key": full_key})
    dtype = np.dtype(id_dtype)
    num_rows = predictions = input_tokens = max_id = 0
    shard_tokens: list[int] = []
    long_rows = LongRows(spec.long_rows)
    bos_id = bos_rule(tokenizer) if spec.streamed_text else None
    remove_member(folder / SEGMENTS)
    with open_owned(folder, INPUT_IDS, "wb") as f_ids, open_owned(folder, LENGTHS, "wb") as f_len, \
            open_owned(folder, OFFSETS, "wb") as f_off, open_owned(folder, MASKS, "wb") as f_mask, \
            contextlib.ExitStack() as more:
        f_seg = more.enter_context(open_owned(folder, SEGMENTS, "wb")) if segmented else None
        for batch in stream_batches(stream, tokenizer, spec, long_rows):
            rows, lengths, offsets = batch.input_ids, batch.lengths, batch.doc_offsets
            _append(f_off, offsets.astype("<i8"))
            if progress is not None and len(offsets):
                progress(int(offsets[-1]))
            if max_sequences:
                keep = max(0, min(len(rows), max_sequences - num_rows))
                rows, lengths = rows[:keep], lengths[:keep]
            if not len(rows):
                continue
            max_id = max(max_id, int(rows.max()))
            if max_id > np.iinfo(dtype).max:
                raise ValueError(f"token id {max_id} does not fit the cache's id dtype {id_dtype}")
            _append(f_ids, rows.astype(dtype.newbyteorder("<")))
            _append(f_len, lengths.astype("<i4"))
            mask = batch.trained[: len(rows)]
            _append(f_mask, mask.astype(np.uint8))
            if segmented:
                _append(f_seg, batch.segment_ids[: len(rows)].astype("<i4"))
            trained = mask.sum(axis=1)
            for r, count in enumerate(trained, num_rows):  # per-shard sums of trained positions
                if r // rows_per_shard == len(shard_tokens):
                    shard_tokens.append(0)
                shard_tokens[-1] += int(count)
            num_rows += len(rows)
            fault_point("cache:ingest")  # the crash tests: killed with rows written, the ingestion unfinished
            predictions += int(trained.sum())
            input_tokens += int(lengths.sum())
        for f in (f_ids, f_len, f_off, f_mask, *((f_seg,) if segmented else ())):
            f.flush()
            os.fsync(f.fileno())
    info = {"complete": True, "key": full_key, "seq_len": seq_len, "id_dtype": id_dtype,
            "bos_token_id": bos_id, "num_sequences": num_rows, "num_predictions": predictions,
            "num_input_tokens": input_tokens, "max_token_id": max_id, "shard_tokens": shard_tokens,
            "fingerprint": stream.fingerprint, "num_documents": stream.num_documents - long_rows.dropped,
            "num_empty": stream.num_empty, "num_files": stream.num_files, "format": spec.format,
            "train_on": spec.train_on, "packing": spec.packing}
    if segmented and not spec.windowed_text:  # the documents in the rows are counted above; the others were dropped
        info["long_rows"] = long_rows.record()
    write_json_atomic(folder / INGEST, info)
    return IngestedRows(folder, info)
