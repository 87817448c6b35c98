"""Plain text packed as documents (--packing document): a document longer than a row is cut into row-sized windows,
which are then packed whole like any document (doc_packing.iter_rows), so that no token attends across documents
and every token of every document is trained exactly once.

A document of n tokens d[0..n-1] (encoded with the tokenizer's special tokens and a final EOS, as
packing.encode_documents does) gives windows of at most `seq_len` tokens:

- the first is d[0:seq_len], the document's own start (its BOS first, where the tokenizer adds one);
- each next one is one context token c followed by the next seq_len - 1 tokens: c + d[p:p + seq_len - 1]. c is the
  BOS where the tokenizer adds one (packing.bos_rule: such a model was pretrained with BOS at position 0, as rows of
  concatenated text start with it under bos-per-row), else the token before the window, d[p - 1].

A window's first token is never a label in it and every other token is, so the windows' labels are d[1:], each
exactly once; a window's first label is predicted from its context token alone, like the first label of a
bos-per-row row that continues a document. Dropping each continuation window's first token gives the document back.
A document of at most seq_len tokens is one window: itself. Each window attends only to itself and its positions
restart at 0, as each document's do.
"""
from __future__ import annotations

from collections.abc import Sequence


def text_windows(ids: Sequence[int], seq_len: int, bos_id: int | None) -> list[list[int]]:
    """The windows of one document's token ids (see the module docstring): the first seq_len tokens, then the context
    token (`bos_id`, or the token before where `bos_id` is None) and the next seq_len - 1 tokens, until the end."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (one input and one label), got {seq_len}")
    ids = list(ids)
    out = [ids[:seq_len]]
    for p in range(seq_len, len(ids), seq_len - 1):
        out.append([bos_id if bos_id is not None else ids[p - 1], *ids[p:p + seq_len - 1]])
    return out
