"""The cache schema, declared once. Both backends (Zarr, Arrow) are built from this declaration.

One row of the cache is one packed sequence of `seq_len` tokens. Position t of the per-position
fields predicts token t+1 (next-token alignment), so they hold `seq_len - 1` positions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SCHEMA_VERSION = 1
FORMAT_NAME = "mft-cache"
LOGPROB_DTYPES = ("float16", "float32")

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


@dataclass(frozen=True)
class Field:
    """One stored field: name, numpy dtype name, per-row shape, and what it holds."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    doc: str

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
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
    for per-position values.
    """
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"--logprob-dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
    ids = id_dtype(vocab_size)
    p = seq_len - 1
    return (
        Field("input_ids", ids, (seq_len,), "the packed token ids of the sequence (padding after `length`)"),
        Field("length", "int32", (), "number of real (non-padding) tokens in the sequence"),
        Field("topk_ids", ids, (p, top_k), "ids of the teacher's top-k next tokens, by descending log-prob"),
        Field("topk_logprobs", logprob_dtype, (p, top_k), "teacher log-probs of topk_ids (full-vocabulary log_softmax)"),
        Field("label_logprob", "float32", (p,), "teacher log-prob of the label input_ids[t+1] (exact, float32)"),
    )


def schema_to_json(schema: tuple[Field, ...]) -> list[dict]:
    return [f.to_json() for f in schema]


def schema_from_json(items: list[dict]) -> tuple[Field, ...]:
    return tuple(Field(d["name"], d["dtype"], tuple(d["shape"]), d.get("doc", "")) for d in items)


def row_bytes(schema: tuple[Field, ...]) -> int:
    """Uncompressed bytes of one row."""
    return sum(f.row_bytes for f in schema)
