"""The cache schema, declared once. Both backends (Zarr, Arrow) are built from this declaration.

One row of the cache is one packed sequence of `seq_len` tokens. Position t of the per-position
fields predicts token t+1 (next-token alignment), so they hold `seq_len - 1` positions.

Every cache is written as schema version 3: a row holds its `label_mask` (the trained positions) and, with documents
packed whole, its `segment_ids` (which document each token belongs to); the teacher's fields (axis "position") hold
the trained positions only, row after row in order, so prompt positions and padding take no bytes. Readers expand
them back to `seq_len - 1` positions with zeros elsewhere.

Caches of schema versions 1 and 2 store every per-position field at all `seq_len - 1` positions of a row, zeros where
nothing is trained (`legacy_schema`); the reader (reader.py) gives their rows the same view, its label mask
following from the rows' BOS rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .encoding import Q8, encode_q8, q8_spec

SCHEMA_VERSION = 3  # the version every cache is written in: fields along axis "position"; older readers refuse it
PLAIN_SCHEMA_VERSION = 1  # read only: every position stored, plain arrays (float16/float32 log-probs)
ENCODED_SCHEMA_VERSION = 2  # read only: every position stored, an encoded field (q8)
READABLE_SCHEMA_VERSIONS = (PLAIN_SCHEMA_VERSION, ENCODED_SCHEMA_VERSION, SCHEMA_VERSION)
POSITION = "position"  # the axis of a field that holds one entry per trained position, not per row
MASK_FIELD = "label_mask"  # the row field whose True entries are the positions of the "position" fields
SEGMENTS_FIELD = "segment_ids"  # the row field that says which document each token belongs to (documents packed whole)
FORMAT_NAME = "mft-cache"
LOGPROB_DTYPES = ("float16", "float32", Q8)
ENCODINGS = (Q8,)

# What the stored values mean. Written into every manifest so a reader never has to guess.
VALUE_SEMANTICS = {
    "logprobs": "natural-log probabilities from log_softmax over the FULL vocabulary at temperature 1, "
    "computed in float32 (then stored in the schema's dtype)",
    "alignment": "next-token: position t of topk_ids/topk_logprobs/label_logprob is the teacher's "
    "prediction for input_ids[t+1]; the label of position t is input_ids[t+1]",
    "topk_order": "descending log-prob; topk_ids[..., 0] is the teacher's argmax (ties broken as torch.topk)",
    "padding": "positions t >= length - 1 are padding: their values are 0 and must be ignored",
    "tail": "the teacher mass outside top-k and the label is not stored: 1 - sum of the stored "
    "probabilities, used by the trainer as one tail bucket",
}
Q8_SEMANTICS = (
    "topk_logprobs is stored encoded (schema field 'encoding', name 'q8'): top1_logprob holds the exact max "
    "log-prob, topk_logprobs uint8 increments of sqrt-companded gaps below it; readers decode them to float32 "
    "log-probs whose column 0 is top1_logprob exactly"
)


TRAINED_SEMANTICS = {
    "padding": "positions where label_mask is 0 (padding, prompts, document boundaries) hold no values: readers give "
    "zeros there, which must be ignored",
    "positions": "topk_ids, topk_logprobs (and top1_logprob) and label_logprob hold the trained positions only "
    "(label_mask == 1), row after row in order: the positions of row r follow those of rows before it in its shard",
}
SEGMENTS_SEMANTICS = ("segment_ids: 1, 2, ... for the documents of a row, 0 for the padding; each document attends "
                      "only to itself and its position ids restart at 0")


def value_semantics(logprob_dtype: str, schema: tuple[Field, ...]) -> dict[str, str]:
    """What the stored values of a cache of these fields mean, for the manifest's "values"."""
    out = dict(VALUE_SEMANTICS)
    if any(f.per_position for f in schema):
        out.update(TRAINED_SEMANTICS)
    if any(f.name == SEGMENTS_FIELD for f in schema):
        out["segments"] = SEGMENTS_SEMANTICS
    if logprob_dtype == Q8:
        out["topk_logprobs_encoding"] = Q8_SEMANTICS
    return out


@dataclass(frozen=True)
class Field:
    """One stored field: name, numpy dtype name, shape of one entry, what it holds, how it is encoded
    (None: the values as they are; else the spec readers decode with, e.g. encoding.q8_spec()), and its axis:
    "row" (one entry per row) or POSITION (one entry per trained position)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    doc: str
    encoding: dict | None = None
    axis: str = "row"

    @property
    def row_bytes(self) -> int:
        """Bytes of one entry (of a row, or of a trained position)."""
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))

    @property
    def per_position(self) -> bool:
        return self.axis == POSITION

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "doc": self.doc}
        if self.encoding is not None:  # absent for plain fields: schema version 1 holds none
            d["encoding"] = dict(self.encoding)
        if self.per_position:  # absent for row fields: schema versions 1 and 2 hold no axis
            d["axis"] = self.axis
        return d


def id_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer dtype that holds every token id of the vocabulary."""
    for name in ("uint8", "uint16", "uint32"):
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    return "uint64"


def cache_schema(*, vocab_size: int, top_k: int, seq_len: int, logprob_dtype: str = "float16",
                 segments: bool = False) -> tuple[Field, ...]:
    """The fields of one cache row for a teacher vocabulary, k and sequence length.

    A row holds input_ids (seq_len,), length (), label_mask (seq_len - 1,) uint8 and, with `segments` (documents
    packed whole), segment_ids (seq_len,); the teacher's fields are per trained position (axis POSITION):
    topk_ids (K,), topk_logprobs (K,), label_logprob (). With logprob_dtype "q8", `top1_logprob` (float32) is
    stored too and `topk_logprobs` holds uint8 codes (see storage/encoding.py); readers decode them.
    """
    check_logprob_dtype(logprob_dtype)
    ids, at = id_dtype(vocab_size), "at a trained position"
    if logprob_dtype == Q8:
        logprobs: tuple[Field, ...] = (
            Field("top1_logprob", "float32", (), f"teacher log-prob of topk_ids[0], its argmax (exact, float32), {at}",
                  axis=POSITION),
            Field("topk_logprobs", "uint8", (top_k,), f"teacher log-probs of topk_ids {at}, q8-encoded: increments "
                  "along k of sqrt-companded gaps below top1_logprob (decoded by readers)", encoding=q8_spec(),
                  axis=POSITION),
        )
    else:
        logprobs = (Field("topk_logprobs", logprob_dtype, (top_k,),
                          f"teacher log-probs of topk_ids {at} (full-vocabulary log_softmax)", axis=POSITION),)
    segment_ids = (Field(SEGMENTS_FIELD, id_dtype(seq_len + 1), (seq_len,), "the document of each token: 1, 2, ... "
                         "in row order, 0 for the padding"),) if segments else ()
    return (
        Field("input_ids", ids, (seq_len,), "the packed token ids of the sequence (padding after `length`)"),
        Field("length", "int32", (), "number of real (non-padding) tokens in the sequence"),
        *segment_ids,
        Field(MASK_FIELD, "uint8", (seq_len - 1,), "1 where position t is trained (its label input_ids[t+1] is a "
              "real token of the same document that the rows train), else 0"),
        Field("topk_ids", ids, (top_k,), f"ids of the teacher's top-k next tokens {at}, by descending log-prob",
              axis=POSITION),
        *logprobs,
        Field("label_logprob", "float32", (), f"teacher log-prob of the label {at} (exact, float32)", axis=POSITION),
    )


def legacy_schema(*, vocab_size: int, top_k: int, seq_len: int, logprob_dtype: str = "float16") -> tuple[Field, ...]:
    """The fields of a row of schema versions 1 and 2 (read, never written): every per-position field holds all
    `seq_len - 1` positions, zeros where nothing is trained."""
    check_logprob_dtype(logprob_dtype)
    ids, p = id_dtype(vocab_size), seq_len - 1
    if logprob_dtype == Q8:
        logprobs: tuple[Field, ...] = (
            Field("top1_logprob", "float32", (p,), "teacher log-prob of topk_ids[..., 0], its argmax (exact, float32)"),
            Field("topk_logprobs", "uint8", (p, top_k), "teacher log-probs of topk_ids, q8-encoded: increments along k "
                  "of sqrt-companded gaps below top1_logprob (decoded by readers)", encoding=q8_spec()),
        )
    else:
        logprobs = (Field("topk_logprobs", logprob_dtype, (p, top_k),
                          "teacher log-probs of topk_ids (full-vocabulary log_softmax)"),)
    return (
        Field("input_ids", ids, (seq_len,), "the packed token ids of the sequence (padding after `length`)"),
        Field("length", "int32", (), "number of real (non-padding) tokens in the sequence"),
        Field("topk_ids", ids, (p, top_k), "ids of the teacher's top-k next tokens, by descending log-prob"),
        *logprobs,
        Field("label_logprob", "float32", (p,), "teacher log-prob of the label input_ids[t+1] (exact, float32)"),
    )


def check_logprob_dtype(logprob_dtype: str) -> None:
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"--logprob-dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")


def stores_positions(schema: tuple[Field, ...]) -> bool:
    """Whether the teacher's fields hold the trained positions only (schema version 3), not every position."""
    return any(f.per_position for f in schema)


def store_rows(arrays: dict[str, np.ndarray], schema: tuple[Field, ...]) -> dict[str, np.ndarray]:
    """Rows whose per-position fields are given at every position (R, T-1, ...), with their label_mask (R, T-1) ->
    the fields as a shard of `schema` stores them: per-position fields at the trained positions only (N, ...), in
    row order, and the mask as uint8. What a writer of its own (a test, another tool) hands CacheWriter.write_shard."""
    mask = np.asarray(arrays[MASK_FIELD]).astype(bool)
    out = {f.name: np.asarray(arrays[f.name])[mask] if f.per_position else np.asarray(arrays[f.name]) for f in schema}
    out[MASK_FIELD] = mask.astype(np.uint8)
    return out


def encode_logprobs(topk_logprobs: np.ndarray, logprob_dtype: str) -> dict[str, np.ndarray]:
    """The stored field(s) for float32 top-k log-probs (..., K): {"topk_logprobs"} in the dtype, or for
    "q8" {"top1_logprob", "topk_logprobs"} as encoding.encode_q8 writes them."""
    if logprob_dtype == Q8:
        top1, increments = encode_q8(topk_logprobs)
        return {"top1_logprob": top1, "topk_logprobs": increments}
    return {"topk_logprobs": np.asarray(topk_logprobs).astype(logprob_dtype)}


def schema_version_of(schema_json: list[dict]) -> int:
    """The schema version a manifest with these fields gets: 3 once any field is per position, else (the versions
    that were written before) 2 once any field is encoded, else 1."""
    if any(isinstance(d, dict) and d.get("axis") == POSITION for d in schema_json):
        return SCHEMA_VERSION
    return ENCODED_SCHEMA_VERSION if any(d.get("encoding") for d in schema_json) else PLAIN_SCHEMA_VERSION


def schema_from_json(items: list[dict]) -> tuple[Field, ...]:
    return tuple(Field(d["name"], d["dtype"], tuple(d["shape"]), d.get("doc", ""), d.get("encoding"),
                       d.get("axis", "row")) for d in items)


def row_bytes(schema: tuple[Field, ...]) -> int:
    """Uncompressed bytes of one row; where fields are per trained position, an upper bound: every position trained."""
    positions = next((f.shape[0] for f in schema if f.name == MASK_FIELD), 0)
    return sum(f.row_bytes * (positions if f.per_position else 1) for f in schema)


def position_counts(schema: tuple[Field, ...], arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """(R,) int64 trained positions of each row of `arrays` (the per-position fields' entries of each row), or None
    where the schema stores every position (versions 1 and 2)."""
    if not stores_positions(schema):
        return None
    return np.asarray(arrays[MASK_FIELD]).astype(bool).sum(axis=1).astype(np.int64)
