"""Packing whole documents into rows without cross-talk: each document keeps to itself in its row.

Documents (token ids with the mask of their trained labels, e.g. from chat.render) are taken in order and put
whole into rows of `seq_len` tokens, greedily: a document that does not fit in the room left in the current row
starts a new row; the rest of a row is padding. Every document starts at position 0 of its own (position ids
restart at 0 at each document) and attends only to itself (segment ids; mft_cache.attention turns them into
the masks a model needs), so a packed row gives each document the logits it gets alone. The padding run at the
end of a row is one more segment (id 0) whose positions also restart at 0, so that it too attends only to
itself and never yields an all-masked attention row.

A row's label mask is True at position t (label input_ids[t+1]) iff t and t+1 lie in the same document and
the document trains that label: the last token of a document never predicts the next document's first token.
A document longer than `seq_len` is refused (too_long="error", a DocumentTooLong naming its index) or cut to its
first `seq_len` tokens (too_long="truncate"). Pure numpy; the same documents give the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from .documents import DocumentError

TOO_LONG = ("error", "truncate")


class DocumentTooLong(DocumentError):
    """A document longer than a row; `.index` is its index in the input (from 0), `.length` its tokens."""

    def __init__(self, message: str, index: int, length: int):
        super().__init__(message)
        self.index, self.length = index, length


@dataclass
class PackedRow:
    """One row: arrays of length seq_len (label_mask: seq_len - 1) and the documents it holds."""
    input_ids: np.ndarray  # (T,) int64, pad_id after `length`
    segment_ids: np.ndarray  # (T,) int32: 1..n for the row's documents in order, 0 for padding
    position_ids: np.ndarray  # (T,) int64: from 0 in each document (and in the padding run)
    label_mask: np.ndarray  # (T-1,) bool: position t is trained (its label is input_ids[t+1])
    length: int  # real tokens
    docs: list[int]  # index of each document in the input, in row order
    starts: list[int]  # where each starts in the row
    truncated: int  # how many of its documents were cut to seq_len


def _row(seq_len: int, pad_id: int, docs: list[tuple[int, np.ndarray, np.ndarray]], truncated: int) -> PackedRow:
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    seg = np.zeros(seq_len, dtype=np.int32)
    pos = np.empty(seq_len, dtype=np.int64)
    trained = np.zeros(seq_len, dtype=bool)  # trained[t]: the label at t is trained
    p, starts = 0, []
    for s, (_, d_ids, d_trained) in enumerate(docs, start=1):
        n = len(d_ids)
        ids[p:p + n], seg[p:p + n], pos[p:p + n], trained[p:p + n] = d_ids, s, np.arange(n), d_trained
        starts.append(p)
        p += n
    pos[p:] = np.arange(seq_len - p)
    label_mask = (seg[:-1] == seg[1:]) & (seg[1:] != 0) & trained[1:]
    return PackedRow(ids, seg, pos, label_mask, p, [d for d, _, _ in docs], starts, truncated)


def iter_rows(docs: Iterable[tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int = 0,
              too_long: str = "error") -> Iterator[PackedRow]:
    """Pack (ids, trained) documents in order into rows (see the module docstring), yielding each row as soon as
    it is full: for streaming. `trained[t]` says whether token t is a trained label; trained[0] is ignored (a
    document's first token has nothing before it in the row). Raises DocumentTooLong (too_long="error") or
    DocumentError (an empty document, a mask of another length) naming the document's index."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (one input and one label), got {seq_len}")
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}; got {too_long!r}")
    row: list[tuple[int, np.ndarray, np.ndarray]] = []
    used = truncated = 0
    for d, (ids, trained) in enumerate(docs):
        ids = np.asarray(ids, dtype=np.int64)
        trained = np.asarray(trained, dtype=bool)
        if ids.ndim != 1 or ids.shape != trained.shape:
            raise DocumentError(f"document {d}: {ids.shape} token ids but a trained mask of {trained.shape}")
        n = len(ids)
        if n == 0:
            raise DocumentError(f"document {d} has no tokens")
        cut = n > seq_len
        if cut:
            if too_long == "error":
                raise DocumentTooLong(f"document {d} has {n:,} tokens, more than a row holds (--seq-len {seq_len}); "
                                      "shorten it or raise --seq-len", d, n)
            ids, trained, n = ids[:seq_len], trained[:seq_len], seq_len
        if used + n > seq_len:
            yield _row(seq_len, pad_id, row, truncated)
            row, used, truncated = [], 0, 0
        row.append((d, ids, trained))
        used += n
        truncated += cut
    if row:
        yield _row(seq_len, pad_id, row, truncated)
