"""Reading text documents for both stages: local files, folders, `save_to_disk` folders, hub datasets.

Documents are read as a stream (DocumentStream), one at a time, so that a corpus of any size is read in bounded
memory; `read_documents` holds them all, for small sources. A hub dataset is loaded with `streaming=True`.

Order is deterministic: files of a folder are taken in sorted order of their relative paths, rows in
file order. A `.txt` file is one document. Empty documents (only whitespace) are skipped and counted.

Hostile input is refused with a DocumentError (a ValueError: `mft` exits 2) whose message starts with the flag and
the file and names the row: `line N` (from 1) in .jsonl and .csv, `index N` (from 0) in .json, `row N` (from 0) in
.parquet and datasets. Refused: invalid UTF-8; invalid or too deeply nested JSON; a text field that is not a string
(null is an empty document); a lone surrogate (half a UTF-16 pair, e.g. a JSON `"\\ud800"`), which is not text and
which neither the tokenizer nor the data fingerprint could take; and a document over the cap (MAX_DOCUMENT_MB, 8 MiB) of
UTF-8 (tokenizing one document takes about 200 bytes of memory per byte of it), which the environment variable
MFT_MAX_DOCUMENT_MB raises or lowers. A .txt file is refused from its size before it is read; .jsonl and .csv files
are read line by line, and a line over LINE_FACTOR times the cap (room for JSON escapes and CSV quotes) is refused
without being held whole; CSV fields may be as long as the cap (csv's own limit is 128 KiB). A .json file is parsed
whole.

Chat and instruction rows (rows/chat.py's formats): with `data_format` "chat" or "prompt-completion" (or "auto",
decided by the first row's fields and then required of every row) the stream yields `ChatRow`s, the fields a
format reads (`messages`, or `prompt` and `completion` from --prompt-field / --completion-field) with the row's
place for messages, from .jsonl, .json, .parquet, `datasets` sources (and prompt/completion strings from .csv);
their fingerprint is over the canonical JSON of those fields. A row's canonical JSON is capped like a document.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
DATA_FORMATS = ("auto", "text", "chat", "prompt-completion")


@dataclass
class ChatRow:
    """A chat or prompt-completion row: the fields its format reads, under their canonical names ("messages", or
    "prompt" and "completion"), and where it was read (e.g. `--data chats.jsonl: line 3`), for messages."""

    fields: dict
    where: str

    def canonical(self) -> bytes:
        """The fields as canonical JSON (sorted keys, UTF-8): what the data fingerprint hashes."""
        return json.dumps(self.fields, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass
class Documents:
    texts: list[str]
    source: str
    text_field: str
    num_files: int
    num_empty: int

    @property
    def fingerprint(self) -> str:
        """sha256 of the documents' text, in order (independent of file names and formats)."""
        h = hashlib.sha256()
        for t in self.texts:
            b = t.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
        return h.hexdigest()


MAX_DOCUMENT_MB = 8  # the default cap on one document, in MiB of UTF-8; MFT_MAX_DOCUMENT_MB overrides it
CAP_ENV = "MFT_MAX_DOCUMENT_MB"
LINE_FACTOR = 4  # a .jsonl/.csv line may hold this many times the cap: JSON escapes (json.dumps writes "é", 2 bytes
#                  of UTF-8, as the 6 bytes \u00e9), CSV quotes, other fields
_CHUNK = 1 << 20
_BATCH_ROWS = 1024  # rows read at a time from Parquet and `datasets` sources
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # the place after a CR that ends a line on its own
_CR_HINT = (" (this file seems to end its lines with a lone CR, old Mac style, which is read in bounded memory only "
            "up to that size: convert its line ends to LF)")


class DocumentError(ValueError):
    """A document source that cannot be read as documents; the message names the flag, the file and the row."""


def max_document_bytes() -> int:
    """The cap on one document in bytes of UTF-8: MFT_MAX_DOCUMENT_MB (MiB) if set, else MAX_DOCUMENT_MB."""
    raw = os.environ.get(CAP_ENV, "").strip()
    if not raw:
        return MAX_DOCUMENT_MB << 20
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    if not 0 < mib < 1 << 30:  # also refuses NaN and inf
        raise DocumentError(f"{CAP_ENV}={raw!r}: expected a positive number of MiB (the cap on one document, "
                            f"default {MAX_DOCUMENT_MB})")
    return max(1, int(mib * (1 << 20)))


def _size(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n:,} bytes"


def _lift(cap: int) -> str:
    return (f"split it into smaller documents, or raise the cap with the environment variable {CAP_ENV} "
            f"(MiB, now {cap / (1 << 20):.3g}); tokenizing one document takes about 200 times its size in memory")


def _too_big(where: str, size: int, cap: int, what: str = "a document") -> DocumentError:
    return DocumentError(f"{where}: {what} of {size:,} bytes of UTF-8, over the {_size(cap)} cap on one document; "
                         + _lift(cap))


def _decode(raw: bytes, where: str, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {offset + e.start}); "
                            "convert the file to UTF-8") from None


def _text(text: str, where: str, cap: int) -> str:
    """The text, if it is valid Unicode (no lone surrogate) of at most `cap` bytes of UTF-8."""
    if text.isascii():  # O(1) in CPython
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise DocumentError(
                f"{where}: the text holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} (half "
                "of a UTF-16 pair, e.g. a JSON \\ud800 escape), which is not text; fix or drop the document") from None
    if size > cap:
        raise _too_big(where, size, cap)
    return text


def _field(row, field: str, where: str, cap: int) -> str:
    if not isinstance(row, dict):
        raise DocumentError(f"{where}: expected an object with a {field!r} field, got {type(row).__name__}")
    if field not in row:
        raise DocumentError(f"{where}: no field {field!r} (fields: {sorted(row)[:10]}); choose one with --text-field")
    value = row[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DocumentError(f"{where}: field {field!r} holds {type(value).__name__}, expected text")
    return _text(value, where, cap)


def _lines(path: Path, where: str, limit: int):
    """(line number from 1, byte offset, bytes) of each line of a file, its end included (LF, CRLF or a lone CR); a
    line of more than `limit` bytes is refused, and the rest of it counted without being held."""
    with open(path, "rb") as f:
        n = offset = 0  # lines given so far, and where the next one starts
        while True:
            line = f.readline(_CHUNK)
            if not line:
                return
            if len(line) == _CHUNK and not line.endswith(b"\n"):  # a long line: gather it, up to the limit
                buf, piece = bytearray(line), line
                while piece and not piece.endswith(b"\n") and len(buf) <= limit:
                    piece = f.readline(_CHUNK)
                    buf += piece
                size = len(buf) - buf.endswith(b"\n")
                if size > limit:
                    cr = _LONE_CR.search(buf) is not None
                    del buf
                    while piece and not piece.endswith(b"\n"):
                        piece = f.readline(_CHUNK)
                        size += len(piece) - piece.endswith(b"\n")
                    cap = limit // LINE_FACTOR
                    raise DocumentError(f"{where}: line {n + 1}: a line of {size:,} bytes, more than {LINE_FACTOR} "
                                        f"times the {_size(cap)} cap on one document; refused without reading it "
                                        "whole: " + _lift(cap) + (_CR_HINT if cr else ""))
                line = buf
            for part in (_LONE_CR.split(line) if b"\r" in line else (line,)):
                if part:
                    n += 1
                    yield n, offset, part
                    offset += len(part)


def _json(text: str, where: str, whole_file: bool = False):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f" at line {e.lineno}" if whole_file else ""
        raise DocumentError(f"{where}: not valid JSON ({e.msg}{at})") from None
    except RecursionError:
        raise DocumentError(f"{where}: JSON nested too deeply to parse (over about {sys.getrecursionlimit()} levels); "
                            "no document needs that") from None
    except ValueError as e:  # e.g. a number longer than Python's int digit limit
        raise DocumentError(f"{where}: not valid JSON ({str(e)[:200]})") from None


class _Picker:
    """What a row gives the stream: its text (format "text": `_field`) or a ChatRow (the other formats).
    With "auto" the first row decides the format; every later row must then have its fields."""

    def __init__(self, fmt: str, text_field: str, prompt_field: str, completion_field: str, cap: int):
        if fmt not in DATA_FORMATS:
            raise DocumentError(f"--data-format must be one of {DATA_FORMATS}; got {fmt!r}")
        self.format, self.text_field, self.cap = fmt, text_field, cap
        self.prompt_field, self.completion_field = prompt_field, completion_field

    def needs(self, fmt: str) -> tuple[str, ...]:
        return {"chat": ("messages",), "prompt-completion": (self.prompt_field, self.completion_field),
                "text": (self.text_field,)}[fmt]

    def decide(self, names, where: str) -> str:
        """The format, from the first row's field (or column) names when it is still "auto"."""
        if self.format == "auto":
            names = set(names)
            fmt = next((f for f in ("chat", "prompt-completion", "text") if set(self.needs(f)) <= names), None)
            if fmt is None:
                if "conversations" in names:
                    raise DocumentError(f"{where}: a `conversations` field (ShareGPT's from/value turns) is not read; "
                                        "convert it to `messages`, a list of {'role', 'content'}")
                if self.prompt_field in names or self.completion_field in names:
                    raise DocumentError(f"{where}: a prompt-completion row needs both {self.prompt_field!r} and "
                                        f"{self.completion_field!r} (fields: {sorted(names)[:10]}); name them with "
                                        "--prompt-field / --completion-field")
                fmt = "text"  # the text reader says which field is missing, as it always has
            self.format = fmt
            log.info("%s: %s rows (from the first row's fields)", where.split(": ")[0], fmt)
        return self.format

    def columns(self, names, where: str) -> list[str]:
        """The columns a columnar source (Parquet, datasets) must give, its format decided from `names`."""
        fmt = self.decide(names, where)
        if fmt == "text":  # checked by the text reader, as it always has been
            return [self.text_field]
        missing = [c for c in self.needs(fmt) if c not in names]
        if missing:
            raise DocumentError(f"{where}: {fmt} rows need the column(s) {missing} (columns: {list(names)[:10]})")
        return list(self.needs(fmt))

    def __call__(self, row, where: str):
        if self.format == "text":
            return _field(row, self.text_field, where, self.cap)
        if not isinstance(row, dict):
            raise DocumentError(f"{where}: expected an object with fields, got {type(row).__name__}")
        fmt = self.decide(row, where)
        if fmt == "text":
            return _field(row, self.text_field, where, self.cap)
        missing = [f for f in self.needs(fmt) if f not in row]
        if missing:
            raise DocumentError(f"{where}: a {fmt} row needs the field(s) {missing} (fields: {sorted(row)[:10]})")
        if fmt == "chat":
            fields = {"messages": row["messages"]}
        else:
            fields = {"prompt": row[self.prompt_field], "completion": row[self.completion_field]}
        item = ChatRow(fields, where)
        try:
            size = len(item.canonical())
        except UnicodeEncodeError as e:
            raise DocumentError(f"{where}: the row holds a lone surrogate (half of a UTF-16 pair, e.g. a JSON \\ud800 "
                                f"escape) at character {e.start} of its JSON, which is not text; fix or drop the row") from None
        except (TypeError, ValueError) as e:
            raise DocumentError(f"{where}: the row's fields are not plain JSON values ({e})") from None
        if size > self.cap:
            raise _too_big(where, size, self.cap, "a row")
        return item


def _read_csv(path: Path, pick: _Picker, where: str, cap: int):
    field = pick.text_field

    def text_lines():
        for n, offset, line in _lines(path, where, LINE_FACTOR * cap):
            yield _decode(line, f"{where}: line {n}", offset)

    old = csv.field_size_limit()
    csv.field_size_limit(min(cap, 2**31 - 1))  # csv counts characters; a field of more is over the cap in bytes too
    try:
        reader = csv.reader(text_lines())
        last = 0
        try:
            header = next(reader, None)
            if pick.format != "text" and header is not None:
                if pick.decide(header, where) == "chat":
                    raise DocumentError(f"{where}: a CSV file cannot hold a list of messages; write chat rows as "
                                        ".jsonl, .json or .parquet")
            if pick.format != "text":
                cols = pick.columns(header or [], where)  # may decide "text" (then read below, as text)
            if pick.format != "text":
                idx = [len(header) - 1 - header[::-1].index(c) for c in cols]
            elif header is None or field not in header:
                raise DocumentError(f"{where}: no column {field!r} (columns: {header}); choose one with --text-field")
            else:
                col = len(header) - 1 - header[::-1].index(field)  # the last of equal names wins, as in csv.DictReader
            last = reader.line_num
            for row in reader:
                start, last = last + 1, reader.line_num
                if row:  # blank lines are no rows
                    at = f"{where}: line {start}" if start == last else f"{where}: lines {start}-{last}"
                    if pick.format != "text":
                        yield pick({c: row[i] if i < len(row) else None for c, i in zip(cols, idx)}, at)
                    else:
                        yield _text(row[col], at, cap) if col < len(row) else ""
        except csv.Error as e:
            if "field limit" in str(e):
                raise DocumentError(f"{where}: line {reader.line_num}: a field of more than {cap:,} characters, over "
                                    f"the {_size(cap)} cap on one document; {_lift(cap)}") from None
            raise DocumentError(f"{where}: line {reader.line_num}: not valid CSV ({e})") from None
    finally:
        csv.field_size_limit(old)


def _read_file(path: Path, pick: _Picker, what: str, cap: int):
    """The texts (or ChatRows) of one file, one at a time (a .json file is parsed whole; the others are read in
    bounded memory)."""
    suffix = path.suffix.lower()
    where = f"{what} {path}"
    field = pick.text_field
    if suffix == ".txt" and pick.format not in ("auto", "text"):
        raise DocumentError(f"{where}: a .txt file is one plain-text document, not {pick.format} rows; write them "
                            "as .jsonl, .json or .parquet")
    if suffix == ".txt":
        pick.format = "text"
        size = path.stat().st_size
        if size > cap:  # refused before it is read
            raise _too_big(where, size, cap, "a .txt document")
        yield _text(_decode(path.read_bytes(), where), where, cap)
    elif suffix == ".jsonl":
        for n, offset, line in _lines(path, where, LINE_FACTOR * cap):
            if not line.strip():
                continue
            at = f"{where}: line {n}"
            yield pick(_json(_decode(line, at, offset), at), at)
    elif suffix == ".json":
        data = _json(_decode(path.read_bytes(), where), where, whole_file=True)
        if pick.format in ("auto", "text") and isinstance(data, dict) and isinstance(data.get(field), list):  # columns
            pick.format = "text"
            for i, v in enumerate(data[field]):
                yield _field({field: v}, field, f"{where}: index {i}", cap)
            return
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DocumentError(f"{where}: expected a JSON list of objects with a {field!r} field")
        for i, row in enumerate(data):
            yield pick(row, f"{where}: index {i}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:
            raise DocumentError(f"{where}: not a readable Parquet file ({e})") from None
        names = parquet.schema_arrow.names
        columns = [field] if pick.format == "text" else pick.columns(names, where)  # (decides "auto")
        if pick.format == "text" and field not in names:
            raise DocumentError(f"{where}: no column {field!r} (columns: {names[:10]}); choose one with --text-field")
        i = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            if pick.format == "text":
                for v in batch.column(0).to_pylist():
                    yield _field({field: v}, field, f"{where}: row {i}", cap)
                    i += 1
                continue
            for row in batch.to_pylist():
                yield pick(row, f"{where}: row {i}")
                i += 1
    elif suffix == ".csv":
        yield from _read_csv(path, pick, where, cap)
    else:
        raise DocumentError(f"{where}: unsupported file type {suffix!r}; use one of {SUFFIXES}")


def _from_datasets(ds, pick: _Picker, where: str, split: str, cap: int):
    """The texts (or ChatRows) of a `datasets` Dataset (memory-mapped Arrow) or IterableDataset (streamed), in
    batches."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        if split not in ds:
            raise DocumentError(f"{where}: no split {split!r} (splits: {list(ds)}); choose one with --split")
        ds = ds[split]
    names = ds.column_names  # None for a streamed dataset whose features are not known before reading
    if pick.format == "auto" and names is not None:
        pick.decide(names, where)
    if pick.format != "text":
        yield from _rows_from_datasets(ds, names, pick, where)
        return
    field = pick.text_field
    if names is not None and field not in names:
        raise DocumentError(f"{where}: no field {field!r} (fields: {names[:10]}); choose one with --text-field")
    if names is not None:
        ds = ds.select_columns([field])
    i = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        if field not in batch:
            raise DocumentError(f"{where}: row {i}: no field {field!r} (fields: {sorted(batch)[:10]}); choose one "
                                "with --text-field")
        for v in batch[field]:
            yield _field({field: v}, field, f"{where}: row {i}", cap)
            i += 1


def _rows_from_datasets(ds, names, pick: _Picker, where: str):
    if names is not None:
        ds = ds.select_columns(pick.columns(names, where))
    i = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield pick(dict(zip(keys, values)), f"{where}: row {i}")
            i += 1


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


class DocumentStream:
    """The non-empty documents of a source, read one at a time in bounded memory (a .json file is parsed whole):
    a file, a folder of files, a `datasets.save_to_disk` folder (its memory-mapped Arrow), or a hub dataset id
    (loaded with `streaming=True`). Iterate it once; then `fingerprint` (the same value as Documents.fingerprint of
    the same documents), `num_documents`, `num_empty` and `num_files` describe what was read.

    The source is checked when the stream is made (a missing file raises FileNotFoundError, an empty folder a
    DocumentError); every other refusal (see the module docstring) comes when its row is read, and a source with
    no non-empty document raises at the end of the iteration.
    """

    def __init__(self, source: str | Path, text_field: str = "text", split: str = "train", *, what: str = "--data",
                 data_format: str = "text", prompt_field: str = "prompt", completion_field: str = "completion"):
        self.source, self.text_field, self.split, self.what = str(source), text_field, split, what
        self.where = f"{what} {self.source}"
        self.cap = max_document_bytes()
        self.pick = _Picker(data_format, text_field, prompt_field, completion_field, self.cap)
        self.path = Path(self.source).expanduser()
        self.files: list[Path] = []
        if _is_saved_dataset(self.path):
            self.kind = "saved"
        elif self.path.is_dir():
            self.kind = "folder"
            self.files = sorted((p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES),
                                key=lambda p: p.relative_to(self.path).as_posix())
            if not self.files:
                raise DocumentError(f"{self.where}: folder holds no {'/'.join(SUFFIXES)} files")
        elif self.path.is_file():
            self.kind, self.files = "file", [self.path]
        elif self.path.suffix.lower() in SUFFIXES or self.source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{self.where}: no such file or folder")
        else:
            self.kind = "hub"
        self.num_files = len(self.files) if self.files else int(self.kind == "saved")
        self.num_documents = self.num_empty = 0
        self._hash, self.complete = hashlib.sha256(), False

    def reopen(self) -> DocumentStream:
        """A new, unread stream of the same source with the same options."""
        return DocumentStream(self.source, self.text_field, self.split, what=self.what, data_format=self.pick.format,
                              prompt_field=self.pick.prompt_field, completion_field=self.pick.completion_field)

    def signature(self) -> dict | None:
        """What identifies the source's content without reading it: each file's path, size and modification time
        (a saved dataset's files included), or None for a hub dataset, which only reading can tell."""
        if self.kind == "hub":
            return None
        files = self.files if self.files else sorted(p for p in self.path.rglob("*") if p.is_file())
        signature = {"source": str(self.path.resolve()), "text_field": self.text_field, "split": self.split,
                     "files": [[p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
        if self.pick.format != "text":  # what else picks a row's fields
            signature.update(data_format=self.pick.format, prompt_field=self.pick.prompt_field,
                             completion_field=self.pick.completion_field)
        return signature

    @property
    def format(self) -> str:
        """The rows' format: "text", "chat" or "prompt-completion" ("auto" until a row has been read)."""
        return self.pick.format

    def _texts(self):
        if self.kind == "saved":
            from datasets import load_from_disk

            yield from _from_datasets(load_from_disk(str(self.path)), self.pick, self.where, self.split, self.cap)
        elif self.kind == "hub":
            yield from self._from_hub()
        else:
            for f in self.files:
                yield from _read_file(f, self.pick, self.what, self.cap)

    def _from_hub(self):
        from datasets import load_dataset

        try:
            ds = load_dataset(self.source, split=self.split, streaming=True)
            rows = _from_datasets(ds, self.pick, self.where, self.split, self.cap)
            first = next(rows, None)  # reading starts here: a missing dataset or split fails now
        except DocumentError:
            raise
        except Exception as e:
            raise DocumentError(f"{self.where}: no such local file or folder, and loading it as a hub dataset failed: "
                                f"{type(e).__name__}: {str(e)[:300]}") from None
        if first is not None:
            yield first
            yield from rows

    def __iter__(self):
        if self.complete or self.num_documents or self.num_empty:
            raise RuntimeError("a DocumentStream is read once")
        for text in self._texts():
            if isinstance(text, ChatRow):  # every chat row counts: a bad one is refused when it is rendered
                b = text.canonical()
            elif not text.strip():
                self.num_empty += 1
                continue
            else:
                b = text.encode("utf-8")
            self._hash.update(len(b).to_bytes(8, "little") + b)
            self.num_documents += 1
            yield text
        if not self.num_documents:
            what = f"in field {self.text_field!r}" if self.format in ("auto", "text") else f"{self.format} rows"
            raise DocumentError(f"{self.where}: no non-empty documents {what} ({self.num_empty} rows read)")
        if self.num_empty:
            log.info("skipped %d empty documents of %d in %s", self.num_empty, self.num_empty + self.num_documents,
                     self.source)
        self.complete = True

    @property
    def fingerprint(self) -> str:
        """sha256 of the documents' text, in order: Documents.fingerprint, computed as they are read."""
        if not self.complete:
            raise RuntimeError("the fingerprint is known once the stream has been read to its end")
        return self._hash.hexdigest()


def data_fingerprint(source: str | Path, text_field: str = "text", split: str = "train", *, what: str = "--data",
                     progress=None, **options) -> str:
    """The data fingerprint of a source (Documents.fingerprint for text), its rows streamed, never held. `progress`
    wraps the iteration (e.g. tqdm); `options` are DocumentStream's (data_format, prompt_field, completion_field)."""
    stream = DocumentStream(source, text_field, split, what=what, **options)
    for _ in (progress(stream) if progress else stream):
        pass
    return stream.fingerprint


def first_row_format(source: str | Path, text_field: str = "text", split: str = "train", *, what: str = "--data",
                  prompt_field: str = "prompt", completion_field: str = "completion") -> str:
    """The format of a source's rows ("text", "chat" or "prompt-completion"), from its first row (a .txt file, or
    a source whose first row is empty, is text); reads nothing more."""
    stream = DocumentStream(source, text_field, split, what=what, data_format="auto", prompt_field=prompt_field,
                            completion_field=completion_field)
    rows = stream._texts()
    try:
        next(rows, None)
    finally:
        rows.close()
    return "text" if stream.format == "auto" else stream.format


def read_documents(source: str | Path, text_field: str = "text", split: str = "train", *,
                   what: str = "--data") -> Documents:
    """Read every document of a source into memory (DocumentStream, held whole): for small sources.

    Raises FileNotFoundError / ValueError (DocumentError) naming `what` (the flag that gave the source), the file,
    the row and the field; never returns zero documents.
    """
    stream = DocumentStream(source, text_field, split, what=what)
    texts = list(stream)
    return Documents(texts, stream.source, text_field, stream.num_files, stream.num_empty)
