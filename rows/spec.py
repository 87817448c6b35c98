"""Rows of every data format, the same for both stages: plain text, chat and prompt-completion, packed by
concatenation or as whole documents.

`RowSpec` says how rows are made: the rows' format (documents.DocumentStream decides it), what is trained
(chat.TRAIN_ON) and the packing:
- "concat" of text: packing.stream_rows (BOS per row where the tokenizer adds one); the trained positions follow
  from the rows' BOS rule (mft_cache.masks.label_mask).
- "document" (any format): every document rendered (chat.render; text with the tokenizer's special tokens and a
  final EOS, every label trained) and packed whole by doc_packing.iter_rows: it attends only to itself, its
  positions restart at 0, only its own trained labels are trained. A conversation or prompt-completion row longer
  than a row is dropped, cut or refused as `long_rows` says (rows/long_rows.py); what was done is logged, and
  counted in a LongRows. A text document longer than a row is cut into row-sized windows (rows/windows.py), each
  packed as a document of its own: every token is trained once, and nothing is dropped.
- "concat" of chat or prompt-completion rows: the rendered documents concatenated and cut into rows (no BOS is
  inserted), each label trained as its document says; every token of a row attends to those before it.
Rows come with their label mask; documents packed whole also with their segment ids (1, 2, ... per document, 0 for
the padding).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from mft_cache.masks import label_mask, real_tokens

from .chat import TRAIN_ON, RowTooLong, fit_conversation, render
from .doc_packing import iter_rows
from .documents import ChatRow, DocumentError, DocumentStream, first_row_format
from .long_rows import DEFAULT_LONG_ROWS, LONG_ROWS, SPLIT, LongRows
from .packing import (ENCODE_BATCH, Packed, StreamPacker, bos_rule, encode_documents, packing_description,
                      pad_id_of, stream_rows)
from .windows import text_windows

log = logging.getLogger(__name__)

PACKINGS = ("auto", "document", "concat")
ROW_BATCH = 64  # rows of whole documents gathered before they are handed on


@dataclass(frozen=True)
class RowSpec:
    """How rows are made: format ("text", "chat", "prompt-completion"), train_on ("completion" or "all"; text:
    "all"), packing ("document" or "concat"), seq_len, and what becomes of a conversation or prompt-completion row
    longer than a row (long_rows, one of long_rows.LONG_ROWS; documents packed whole only)."""

    format: str
    train_on: str
    packing: str
    seq_len: int
    long_rows: str = DEFAULT_LONG_ROWS

    @property
    def streamed_text(self) -> bool:
        """Plain text concatenated and cut into rows: its trained positions follow from the BOS rule."""
        return self.format == "text" and self.packing == "concat"

    @property
    def windowed_text(self) -> bool:
        """Plain text packed as documents: one longer than a row is cut into windows (rows/windows.py)."""
        return self.format == "text" and self.packing == "document"

    @property
    def long_rows_rule(self) -> str | None:
        """What becomes of a document longer than a row: None where rows are cut from a stream (concat), SPLIT for
        plain text packed as documents, else the --long-rows policy."""
        if self.packing != "document":
            return None
        return SPLIT if self.windowed_text else self.long_rows


def resolve_spec(fmt: str, train_on: str, packing: str, seq_len: int,
                 long_rows: str = DEFAULT_LONG_ROWS) -> RowSpec:
    """The spec for rows of format `fmt`: train_on "auto" is "completion" for chat and prompt-completion and "all"
    for text (where it can be nothing else); packing "auto" is "document" for chat and prompt-completion and
    "concat" for text."""
    if long_rows not in LONG_ROWS:
        raise ValueError(f"--long-rows must be one of {LONG_ROWS}; got {long_rows!r}")
    if packing not in PACKINGS:
        raise ValueError(f"--packing must be one of {PACKINGS}; got {packing!r}")
    if train_on not in ("auto", *TRAIN_ON):
        raise ValueError(f"--train-on must be one of {TRAIN_ON}; got {train_on!r}")
    if fmt == "text":
        train_on = "all"
    elif train_on == "auto":
        train_on = "completion"
    if packing == "auto":
        packing = "concat" if fmt == "text" else "document"
    return RowSpec(fmt, train_on, packing, seq_len, long_rows)


def format_of(source, data_format: str = "auto", *, text_field: str = "text", split: str = "train",
              what: str = "--data", prompt_field: str = "prompt", completion_field: str = "completion") -> str:
    """The format of `source`'s rows: `data_format` where it is forced, else read from the source's first row."""
    if data_format != "auto":
        return data_format
    return first_row_format(source, text_field, split, what=what, prompt_field=prompt_field,
                            completion_field=completion_field)


def spec_for(source, seq_len: int, *, data_format: str = "auto", train_on: str = "auto", packing: str = "auto",
             text_field: str = "text", split: str = "train", what: str = "--data", prompt_field: str = "prompt",
             completion_field: str = "completion", long_rows: str = DEFAULT_LONG_ROWS) -> RowSpec:
    """How `source` becomes rows: its format (format_of), what is trained, the packing and what becomes of a
    document longer than a row (resolve_spec)."""
    fmt = format_of(source, data_format, text_field=text_field, split=split, what=what, prompt_field=prompt_field,
                    completion_field=completion_field)
    return resolve_spec(fmt, train_on, packing, seq_len, long_rows)


def packing_record(spec: RowSpec, bos_id: int | None) -> dict:
    """The manifest's "packing": the rule that formed rows made as `spec` says, so a reader never has to guess; `bos_id`
    is packing.bos_rule of the tokenizer (text concatenated: the BOS every row starts with; text packed as
    documents: the BOS every continuation window starts with)."""
    if spec.streamed_text:
        return packing_description(bos_id)
    if spec.windowed_text:
        start = f"BOS (id {bos_id})" if bos_id is not None else "the token before it"
        how = ("text documents (with the tokenizer's special tokens and a final EOS) packed whole, greedily, in order, "
               "into rows of seq_len tokens, the rest of a row padding; a document longer than a row is cut into "
               f"windows: its first seq_len tokens, then each next window is {start} + the next seq_len - 1 tokens; "
               "each document or window attends only to itself (segment_ids) and its position ids restart at 0; "
               "label_mask trains every label but a window's first token, so each token of a document is trained once")
        return {"rule": "document", "bos_token_id": bos_id, "description": how}
    if spec.packing == "document":
        how = ("documents rendered whole (chat template; prompt + completion; text with the tokenizer's special "
               "tokens and a final EOS) and packed greedily, in order, into rows of seq_len tokens, the rest of a row "
               "padding; each document attends only to itself (segment_ids) and its position ids restart at 0; "
               "label_mask trains only a document's own completion labels")
    else:
        how = ("documents rendered whole and concatenated into one stream, cut into rows of seq_len tokens (no BOS "
               "inserted); every token attends to those before it in its row; label_mask trains only completion "
               "labels, never a document's first token")
    return {"rule": spec.packing, "bos_token_id": None, "description": how}


def documents_note(spec: RowSpec) -> str:
    """What the offsets of each document (documents.npy in a cache) count, for rows made as `spec` says."""
    if spec.windowed_text:
        return ("documents.npy: int64 position of each document's first token (its first window's) in the rows (row * "
                "seq_len + position in the row), then num_sequences * seq_len")
    if spec.packing == "document":
        return ("documents.npy: int64 position of each document's first token in the rows (row * seq_len + "
                "position in the row), then num_sequences * seq_len")
    return ("documents.npy: int64 start offset of each document in the packed token stream (see packing for "
            "how rows are cut from it), then the total")


def stream_batches(stream: DocumentStream, tokenizer, spec: RowSpec, long_rows: LongRows | None = None):
    """Rows of a stream as they complete, a Packed batch at a time, each with its label mask (`trained`) and under
    "document" its segment ids; `doc_offsets` holds where each document of the batch starts (in the token stream
    under "concat", row * T + position under "document"), and those of the last batch end with the total (the
    stream's tokens, or rows * T; under "document", a text document cut into windows starts where its first window
    does). Under "document", `long_rows` (a LongRows of spec.long_rows, or None) counts the conversations and
    prompt-completion rows longer than a row that were dropped or cut; they are named in a warning once the stream
    ends."""
    if spec.streamed_text:
        bos_id = bos_rule(tokenizer)
        for rows, lengths, offsets in stream_rows(stream, tokenizer, spec.seq_len):
            yield Packed(rows, lengths, offsets, trained=label_mask(rows, lengths, bos_id))
    elif spec.packing == "document":
        yield from _document_batches(stream, tokenizer, spec, long_rows or LongRows(spec.long_rows))
    else:
        yield from _concat_batches(stream, tokenizer, spec)


def _documents(stream: DocumentStream, tokenizer, spec: RowSpec, long_rows: LongRows | None = None,
               split: list[int] | None = None):
    """(ids, trained, opens) of each document, `opens` False for the windows after a text document's first; with
    `long_rows` (documents packed whole), a conversation or prompt-completion row longer than a row is refused, left
    out or cut as spec.long_rows says, and counted there. Text (packed as documents: spec.windowed_text) is cut into
    row-sized windows (rows/windows.py); `split`, where given, counts [documents cut, windows they gave]."""
    batch: list[str] = []
    limit = spec.seq_len if long_rows is not None else None
    bos_id = bos_rule(tokenizer) if spec.format == "text" else None

    def texts():
        for ids in encode_documents(batch, tokenizer, ENCODE_BATCH):
            windows = text_windows(ids, spec.seq_len, bos_id)
            if split is not None and len(windows) > 1:
                split[0], split[1] = split[0] + 1, split[1] + len(windows)
            for i, window in enumerate(windows):
                yield window, [True] * len(window), i == 0

    for item in stream:
        if isinstance(item, ChatRow):
            kept = _chat_document(item, stream, tokenizer, spec, limit, long_rows)
            if kept is not None:
                yield (*kept, True)
            continue
        batch.append(item)
        if len(batch) == ENCODE_BATCH:
            yield from texts()
            batch = []
    if batch:
        yield from texts()


def _chat_document(item: ChatRow, stream: DocumentStream, tokenizer, spec: RowSpec, limit: int | None,
                   long_rows: LongRows | None):
    """(ids, trained) of a chat or prompt-completion row, or None where it is longer than a row and left out."""
    try:
        return render(item.fields, tokenizer, stream.format, spec.train_on, where=item.where, max_tokens=limit)
    except RowTooLong:
        if long_rows is None or spec.long_rows == "refuse":
            raise
    index = stream.num_documents - 1  # the stream counts a row before it gives it
    kept = None
    if spec.long_rows == "truncate" and stream.format == "chat":  # a completion cut would train half an answer
        try:
            kept = fit_conversation(item.fields, tokenizer, spec.train_on, where=item.where, max_tokens=limit)
        except RowTooLong:  # a template whose shorter conversation renders longer: nothing fits
            kept = None
    if kept is None:
        long_rows.drop(index, item.where)
    else:
        long_rows.cut(index, item.where)
    return kept


def _document_batches(stream: DocumentStream, tokenizer, spec: RowSpec, long_rows: LongRows):
    t = spec.seq_len
    rows: list = []
    num_rows = 0
    opens: deque[bool] = deque()  # of each document (or window) given to iter_rows and not yet in a gathered row
    split = [0, 0]  # text documents cut into windows, and the windows they gave

    def documents():
        for ids, trained, first in _documents(stream, tokenizer, spec, long_rows, split):
            opens.append(first)
            yield ids, trained

    def gather(rows: list, first: int) -> Packed:
        flags = [[opens.popleft() for _ in row.starts] for row in rows]  # iter_rows keeps the documents' order
        offsets = np.array([(first + r) * t + s for r, row in enumerate(rows) for s, o in zip(row.starts, flags[r])
                            if o], dtype=np.int64)
        return Packed(np.stack([r.input_ids for r in rows]), np.array([r.length for r in rows], dtype=np.int32),
                      offsets, trained=np.stack([r.label_mask for r in rows]),
                      segment_ids=np.stack([r.segment_ids for r in rows]).astype(np.int64))

    for row in iter_rows(documents(), t, pad_id_of(tokenizer)):
        rows.append(row)
        if len(rows) == ROW_BATCH:
            yield gather(rows, num_rows)
            num_rows += len(rows)
            rows = []
    long_rows.warn(stream.where, t)
    if split[0]:
        log.info("%s: %s documents longer than a row (--seq-len %d) cut into %s windows, each packed as a document",
                 stream.where, f"{split[0]:,}", t, f"{split[1]:,}")
    if not (num_rows or rows) and long_rows.dropped:
        raise DocumentError(f"{stream.where}: every row ({long_rows.dropped:,}) is longer than a row holds (--seq-len "
                            f"{t}) and was dropped (--long-rows {long_rows.policy}), so nothing is left; raise "
                            "--seq-len")
    last = gather(rows, num_rows) if rows else Packed(np.empty((0, t), np.int64), np.empty(0, np.int32),
                                                    np.empty(0, np.int64), trained=np.empty((0, t - 1), bool),
                                                    segment_ids=np.empty((0, t), np.int64))
    last.doc_offsets = np.concatenate([last.doc_offsets, [(num_rows + len(rows)) * t]])
    yield last


def _concat_batches(stream: DocumentStream, tokenizer, spec: RowSpec):
    t = spec.seq_len
    ids_packer, flags_packer = StreamPacker(t, pad_id_of(tokenizer)), StreamPacker(t, 0)

    def batch(ids, lengths, flags, offsets) -> Packed:
        real = real_tokens(lengths, t)  # (n, T)
        mask = flags[:, 1:].astype(bool) & real[:, 1:]  # (n, T-1): the label at t+1 is trained, and real
        return Packed(ids, lengths, offsets, trained=mask)

    docs: list = []

    def flush():
        ids, lengths, offsets = ids_packer.add([d for d, _ in docs])
        flags, _, _ = flags_packer.add([[int(x) for x in m] for _, m in docs])
        return batch(ids, lengths, flags, offsets)

    for ids, trained, _ in _documents(stream, tokenizer, spec):
        docs.append((ids, trained))
        if len(docs) == ENCODE_BATCH:
            yield flush()
            docs = []
    if docs:
        yield flush()
    ids, lengths = ids_packer.finish()
    flags, _ = flags_packer.finish()
    yield batch(ids, lengths, flags, np.array([ids_packer.total], dtype=np.int64))


def build_rows(source, tokenizer, seq_len: int, *, text_field: str = "text", split: str = "train",
               what: str = "--data", data_format: str = "auto", prompt_field: str = "prompt",
               completion_field: str = "completion", train_on: str = "auto", packing: str = "auto",
               long_rows: str = DEFAULT_LONG_ROWS, spec_of=None) -> tuple[Packed, DocumentStream]:
    """Read, render and pack a source into memory, its format detected from its first row unless forced: text
    packed by concatenation gives exactly packing.build_sequences' rows; anything else carries its label mask, and
    documents packed whole their segment ids. `spec_of` (format -> RowSpec) overrides resolve_spec(format,
    train_on, packing, seq_len, long_rows), e.g. to follow a cache."""
    fmt = format_of(source, data_format, text_field=text_field, split=split, what=what, prompt_field=prompt_field,
                    completion_field=completion_field)
    spec = spec_of(fmt) if spec_of is not None else resolve_spec(fmt, train_on, packing, seq_len, long_rows)
    stream = DocumentStream(source, text_field, split, what=what, data_format=spec.format, prompt_field=prompt_field,
                            completion_field=completion_field)
    parts = list(stream_batches(stream, tokenizer, spec))
    ids = np.concatenate([p.input_ids for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    if spec.streamed_text:  # the mask follows from the BOS rule: not held
        return Packed(ids, lengths, np.concatenate([p.doc_offsets for p in parts]), bos_rule(tokenizer)), stream
    segments = np.concatenate([p.segment_ids for p in parts]) if spec.packing == "document" else None
    return Packed(ids, lengths, trained=np.concatenate([p.trained for p in parts]), segment_ids=segments), stream
