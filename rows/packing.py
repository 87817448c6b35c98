"""Tokenize documents and pack them into fixed-length sequences: the code both stages share.

Stage one packs the finetuning set into the cache's rows; stage two rebuilds the same rows from raw
text (the online-teacher baseline, evaluation sets). Same documents + same tokenizer + same seq_len
give the same rows, byte for byte.

Packing: every document is encoded with the tokenizer's own special tokens (BOS where the
tokenizer adds one) and ends with EOS (appended if the tokenizer did not); documents are
concatenated in order into one token stream, which is cut into rows of `seq_len` tokens; the last
row is padded and its `length` says how many tokens are real. `doc_offsets[d]` is where document d
starts in the stream.

Models whose tokenizer adds a BOS (Llama, Mistral, Gemma) predict badly without one at position 0,
so for them every row starts with BOS: a row that begins at a document's start is the next
`seq_len` stream tokens (the document's own BOS first); a row that continues a document is BOS
followed by the next `seq_len - 1` stream tokens. Removing those inserted BOS tokens from the rows
gives the stream back exactly. No position is trained to predict a BOS (`label_mask`). Whether the
tokenizer adds a BOS is read from what it produces (`bos_rule`), never from a flag.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from mft_cache.masks import BOS_PER_ROW, CONCAT, label_mask

from .documents import DocumentStream

@dataclass
class Packed:
    """Rows held in memory, of any format: token ids with padding after each row's length, which positions are
    trained and, for documents packed whole, which document each token belongs to."""

    input_ids: np.ndarray  # (R, T) int64, padding after `lengths`
    lengths: np.ndarray  # (R,) int32
    doc_offsets: np.ndarray | None = None  # (D + 1,) int64 where each document starts (rows/spec.py), then the total
    bos_id: int | None = None  # concatenated text: the BOS every row starts with (rule BOS_PER_ROW), or None (CONCAT)
    trained: np.ndarray | None = None  # (R, T-1) bool where rows carry their mask (chat, prompt-completion, documents packed whole)
    segment_ids: np.ndarray | None = None  # (R, T) int64 for documents packed whole: 1, 2, ... per document, 0 padding

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        return self.num_sequences

    def take(self, rows) -> dict[str, np.ndarray]:
        """The given rows' input_ids (n, T), length (n,), label_mask (n, T-1) and, for documents packed whole,
        segment_ids (n, T): the fields a cache's rows have besides the teacher's."""
        out = {"input_ids": self.input_ids[rows], "length": self.lengths[rows], "label_mask": self.mask_of(rows)}
        if self.segment_ids is not None:
            out["segment_ids"] = self.segment_ids[rows]
        return out

    @property
    def label_mask(self) -> np.ndarray:
        """(R, T-1) bool: the positions that are trained and evaluated (concatenated text: from the BOS rule)."""
        return self.trained if self.trained is not None else label_mask(self.input_ids, self.lengths, self.bos_id)

    def mask_of(self, rows) -> np.ndarray:
        """(n, T-1) bool: label_mask of the given rows only."""
        if self.trained is not None:
            return self.trained[rows]
        return label_mask(self.input_ids[rows], self.lengths[rows], self.bos_id)

    @property
    def num_predictions(self) -> int:
        """Positions with a trained next-token label."""
        return int(self.label_mask.sum())

    def truncate(self, n: int) -> None:
        """Keep the first n rows."""
        self.input_ids, self.lengths = self.input_ids[:n], self.lengths[:n]
        if self.trained is not None:
            self.trained = self.trained[:n]
        if self.segment_ids is not None:
            self.segment_ids = self.segment_ids[:n]


def bos_rule(tokenizer) -> int | None:
    """The BOS id every row must start with, or None: the tokenizer's BOS if encoding a text with special tokens
    puts it first (and without them does not), and it is not also the EOS (whose predictions must stay trained)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == getattr(tokenizer, "eos_token_id", None):
        return None
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if with_special and with_special[0] == bos and (not without or without[0] != bos):
        return int(bos)
    return None


def packing_description(bos_id: int | None) -> dict:
    """The manifest's "packing": the rule that formed the rows, so a reader never has to guess."""
    if bos_id is None:
        how = ("documents (with the tokenizer's special tokens and a final EOS) concatenated into one stream; "
               "row r is stream[r*seq_len:(r+1)*seq_len]")
    else:
        how = ("documents (each starting with the tokenizer's BOS, ending with EOS) concatenated into one stream; "
               "every row starts with BOS: a row starting at a document's start is the next seq_len stream tokens, "
               "a row continuing a document is BOS + the next seq_len - 1 stream tokens; positions whose label "
               "is the BOS are not trained (their values are 0, like padding)")
    return {"rule": CONCAT if bos_id is None else BOS_PER_ROW, "bos_token_id": bos_id, "description": how}


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


def pack(docs: list[list[int]], seq_len: int, pad_id: int = 0, bos_id: int | None = None) -> Packed:
    """Concatenate token lists and cut them into rows of `seq_len`, the last one padded; with `bos_id`,
    every row starts with it (see the module docstring; every document must start with it)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (one input and one label), got {seq_len}")
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    stream = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=total)
    if bos_id is None:
        rows = -(-total // seq_len)
        padded = np.full(rows * seq_len, pad_id, dtype=np.int64)
        padded[:total] = stream
        row_lengths = np.full(rows, seq_len, dtype=np.int32)
        if rows and total % seq_len:
            row_lengths[-1] = total % seq_len
        return Packed(padded.reshape(rows, seq_len), row_lengths, offsets)

    doc_start = np.zeros(total + 1, dtype=bool)
    doc_start[offsets[:-1]] = True
    assert all(d and d[0] == bos_id for d in docs), "every document must start with the BOS under this rule"
    starts, p = [], 0
    while p < total:
        starts.append(p)
        p += seq_len if doc_start[p] else seq_len - 1
    input_ids = np.full((len(starts), seq_len), pad_id, dtype=np.int64)
    row_lengths = np.empty(len(starts), dtype=np.int32)
    for r, p in enumerate(starts):
        if doc_start[p]:
            seg = stream[p: p + seq_len]
            input_ids[r, : len(seg)] = seg
            row_lengths[r] = len(seg)
        else:
            seg = stream[p: p + seq_len - 1]
            input_ids[r, 0] = bos_id
            input_ids[r, 1: 1 + len(seg)] = seg
            row_lengths[r] = 1 + len(seg)
    return Packed(input_ids, row_lengths, offsets, bos_id)


class StreamPacker:
    """The rows `pack` makes, cut from documents given a batch at a time: only the tokens not yet in a complete row
    are held. `add(docs)` returns the rows its documents complete, `finish()` the last (padded) one; `doc_offsets`
    collects each document's start in the stream, as `pack` gives it."""

    def __init__(self, seq_len: int, pad_id: int = 0, bos_id: int | None = None):
        if seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2 (one input and one label), got {seq_len}")
        self.seq_len, self.pad_id, self.bos_id = seq_len, pad_id, bos_id
        self.buf = np.empty(0, dtype=np.int64)  # stream tokens from position `start` on, not yet in a row
        self.start = 0
        self.total = 0  # stream tokens given so far
        self.doc_starts: deque[int] = deque()  # starts of the documents at or after `start`

    def add(self, docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows (n, seq_len) int64, lengths (n,) int32, the documents' start offsets (len(docs),) int64)."""
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        offsets = self.total + np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(docs) else lengths
        if self.bos_id is not None:
            assert all(d and d[0] == self.bos_id for d in docs), "every document must start with the BOS under this rule"
            self.doc_starts.extend(int(o) for o in offsets)
        new = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=int(lengths.sum()))
        self.buf = np.concatenate((self.buf, new)) if len(self.buf) else new
        self.total += len(new)
        rows, row_lengths = self._rows(final=False)
        return rows, row_lengths, offsets.astype(np.int64)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows left (at most one without the BOS rule), the last one padded."""
        return self._rows(final=True)

    def _rows(self, final: bool) -> tuple[np.ndarray, np.ndarray]:
        t, buf = self.seq_len, self.buf
        if self.bos_id is None:  # plain slices: every complete row at once
            n = -(-len(buf) // t) if final else len(buf) // t
            rows = np.full((n, t), self.pad_id, dtype=np.int64)
            used = min(len(buf), n * t)
            rows.reshape(-1)[:used] = buf[:used]
            lengths = np.full(n, t, dtype=np.int32)
            if n and final and used % t:
                lengths[-1] = used % t
            self._consume(used)
            return rows, lengths
        out, lengths, p = [], [], 0  # p: offset in buf of the next row's start
        while p < len(buf):
            at = self.start + p
            while self.doc_starts and self.doc_starts[0] < at:
                self.doc_starts.popleft()
            opens = bool(self.doc_starts) and self.doc_starts[0] == at
            need = t if opens else t - 1
            if len(buf) - p < need and not final:
                break
            seg = buf[p: p + need]
            row = np.full(t, self.pad_id, dtype=np.int64)
            if opens:
                row[: len(seg)] = seg
            else:
                row[0] = self.bos_id
                row[1: 1 + len(seg)] = seg
            out.append(row)
            lengths.append(len(seg) + (not opens))
            p += len(seg)
        self._consume(p)
        rows = np.stack(out) if out else np.empty((0, t), dtype=np.int64)
        return rows, np.asarray(lengths, dtype=np.int32)

    def _consume(self, n: int) -> None:
        self.buf = self.buf[n:].copy() if n < len(self.buf) else np.empty(0, dtype=np.int64)
        self.start += n


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


ENCODE_BATCH = 256  # documents tokenized at a time


def stream_rows(stream: DocumentStream, tokenizer, seq_len: int, batch_size: int = ENCODE_BATCH):
    """Read, tokenize (a batch of documents at a time, with the fast tokenizer) and pack a document stream:
    yields (rows, lengths, document offsets) as rows complete; the offsets end with the stream's total. The rows are
    exactly those of `pack` over all the documents."""
    packer = StreamPacker(seq_len, pad_id_of(tokenizer), bos_rule(tokenizer))
    batch: list[str] = []
    for text in stream:
        batch.append(text)
        if len(batch) == batch_size:
            yield packer.add(encode_documents(batch, tokenizer, batch_size))
            batch = []
    if batch:
        yield packer.add(encode_documents(batch, tokenizer, batch_size))
    rows, lengths = packer.finish()
    yield rows, lengths, np.array([packer.total], dtype=np.int64)


def build_sequences(source, tokenizer, seq_len: int, text_field: str = "text", split: str = "train", *,
                    what: str = "--data") -> tuple[Packed, DocumentStream]:
    """Read, tokenize and pack a data source into memory (the rows only: documents are streamed): the entry point
    for the small sets stage two packs (evaluation, the online teacher's data, replay documents). `what` is the flag
    that named the source, for error messages. Stage one writes the same rows to disk as they complete
    (rows/ingest.py)."""
    stream = DocumentStream(source, text_field, split, what=what)
    parts = list(stream_rows(stream, tokenizer, seq_len))
    packed = Packed(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    np.concatenate([p[2] for p in parts]), bos_rule(tokenizer))
    return packed, stream
