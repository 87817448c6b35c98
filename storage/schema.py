"""The cache schema, declared once. Both backends (Zarr, Arrow) are built from this declaration.

One row of the cache is one packed sequence of `seq_len` tokens. Position t of the per-position
fields predicts token t+1 (next-token alignment), so they hold `seq_len - 1` positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .encoding import Q8, encode_q8, q8_spec

SCHEMA_VERSION = 1  # caches whose fields are plain arrays (float16/float32 log-probs)
ENCODED_SCHEMA_VERSION = 2  # caches holding an encoded field (q8): readers of version 1 must refuse them
READABLE_SCHEMA_VERSIONS = (SCHEMA_VERSION, ENCODED_SCHEMA_VERSION)
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


def value_semantics(logprob_dtype: str) -> dict[str, str]:
    """What the stored values mean, for the manifest's "values"."""
    if logprob_dtype == Q8:
        return {**VALUE_SEMANTICS, "topk_logprobs_encoding": Q8_SEMANTICS}
    return dict(VALUE_SEMANTICS)


@dataclass(frozen=True)
class Field:
    """One stored field: name, numpy dtype name, per-row shape, what it holds, and how it is encoded
    (None: the values as they are; else the spec readers decode with, e.g. encoding.q8_spec())."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    doc: str
    encoding: dict | None = None

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "doc": self.doc}
        if self.encoding is not None:  # absent for plain fields: their manifests stay as before
            d["encoding"] = dict(self.encoding)
        return d


def id_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer dtype that holds every token id of the vocabulary."""
    for name in ("uint8", "uint16", "uint32"):
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    return "uint64"


def cache_schema(*, vocab_size: int, top_k: int, seq_len: int, logprob_dtype: str = "float16") -> tuple[Field, ...]:
    """The fields of one cache row for a teacher vocabulary, k and sequence length.

    Returns a tuple of `Field`; per-row shapes are `(seq_len,)` for tokens and `(seq_len - 1, ...)`
    for per-position values. With logprob_dtype "q8", `top1_logprob` (float32) is stored too and
    `topk_logprobs` holds uint8 codes (see storage/encoding.py); readers decode them.
    """
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"--logprob-dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
    ids = id_dtype(vocab_size)
    p = seq_len - 1
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


def encode_logprobs(topk_logprobs: np.ndarray, logprob_dtype: str) -> dict[str, np.ndarray]:
    """The stored field(s) for float32 top-k log-probs (..., K): {"topk_logprobs"} in the dtype, or for
    "q8" {"top1_logprob", "topk_logprobs"} as encoding.encode_q8 writes them."""
    if logprob_dtype == Q8:
        top1, increments = encode_q8(topk_logprobs)
        return {"top1_logprob": top1, "topk_logprobs": increments}
    return {"topk_logprobs": np.asarray(topk_logprobs).astype(logprob_dtype)}


def schema_version_of(schema_json: list[dict]) -> int:
    """The schema version a manifest with these fields gets: 2 once any field is encoded, else 1."""
    return ENCODED_SCHEMA_VERSION if any(d.get("encoding") for d in schema_json) else SCHEMA_VERSION


def schema_from_json(items: list[dict]) -> tuple[Field, ...]:
    return tuple(Field(d["name"], d["dtype"], tuple(d["shape"]), d.get("doc", ""), d.get("encoding")) for d in items)


def row_bytes(schema: tuple[Field, ...]) -> int:
    """Uncompressed bytes of one row."""
    return sum(f.row_bytes for f in schema)
