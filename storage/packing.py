"""Tokenize documents and pack them into fixed-length sequences: the code both stages share.

Stage one packs the finetuning set into the cache's rows; stage two rebuilds the same rows from raw
text (the online-teacher baseline, evaluation sets). Same documents + same tokenizer + same seq_len
give the same rows, byte for byte.

Packing: every document is encoded with the tokenizer's own special tokens (BOS where the
tokenizer adds one) and ends with EOS (appended if the tokenizer did not); documents are
concatenated in order and cut into rows of `seq_len` tokens; the last row is padded and its
`length` says how many tokens are real. `doc_offsets[d]` is where document d starts in the
concatenated stream (row r covers stream[r*seq_len : (r+1)*seq_len]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .documents import Documents, read_documents


@dataclass
class Packed:
    input_ids: np.ndarray  # (R, T) int64, padding after `lengths`
    lengths: np.ndarray  # (R,) int32
    doc_offsets: np.ndarray  # (D + 1,) int64: start of each document in the stream, then the total

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_predictions(self) -> int:
        """Positions with a next-token label: length - 1 per row."""
        return int(np.maximum(self.lengths - 1, 0).sum())


def encode_documents(texts: list[str], tokenizer, batch_size: int = 256) -> list[list[int]]:
    """Token ids of each document, with the tokenizer's special tokens and a final EOS."""
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], add_special_tokens=True, verbose=False)["input_ids"]
        for ids in enc:
            ids = list(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            out.append(ids)
    return out


def pack(docs: list[list[int]], seq_len: int, pad_id: int = 0) -> Packed:
    """Concatenate token lists and cut them into rows of `seq_len`, the last one padded."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (one input and one label), got {seq_len}")
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    stream = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=total)
    rows = -(-total // seq_len)
    padded = np.full(rows * seq_len, pad_id, dtype=np.int64)
    padded[:total] = stream
    row_lengths = np.full(rows, seq_len, dtype=np.int32)
    if rows and total % seq_len:
        row_lengths[-1] = total % seq_len
    return Packed(padded.reshape(rows, seq_len), row_lengths, offsets)


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def build_sequences(source, tokenizer, seq_len: int, text_field: str = "text", split: str = "train") -> tuple[Packed, Documents]:
    """Read, tokenize and pack a data source: the one entry point both stages use."""
    documents = read_documents(source, text_field=text_field, split=split)
    packed = pack(encode_documents(documents.texts, tokenizer), seq_len, pad_id_of(tokenizer))
    return packed, documents
