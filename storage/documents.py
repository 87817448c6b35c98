"""Reading text documents for both stages: local files, folders, `save_to_disk` folders, hub datasets.

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


def _read_csv(path: Path, field: str, where: str, cap: int) -> list[str]:
    def text_lines():
        for n, offset, line in _lines(path, where, LINE_FACTOR * cap):
            yield _decode(line, f"{where}: line {n}", offset)

    old = csv.field_size_limit()
    csv.field_size_limit(min(cap, 2**31 - 1))  # csv counts characters; a field of more is over the cap in bytes too
    try:
        reader = csv.reader(text_lines())
        out, last = [], 0
        try:
            header = next(reader, None)
            if header is None or field not in header:
                raise DocumentError(f"{where}: no column {field!r} (columns: {header}); choose one with --text-field")
            col = len(header) - 1 - header[::-1].index(field)  # the last of equal names wins, as in csv.DictReader
            last = reader.line_num
            for row in reader:
                start, last = last + 1, reader.line_num
                if row:  # blank lines are no rows
                    at = f"{where}: line {start}" if start == last else f"{where}: lines {start}-{last}"
                    out.append(_text(row[col], at, cap) if col < len(row) else "")
        except csv.Error as e:
            if "field limit" in str(e):
                raise DocumentError(f"{where}: line {reader.line_num}: a field of more than {cap:,} characters, over "
                                    f"the {_size(cap)} cap on one document; {_lift(cap)}") from None
            raise DocumentError(f"{where}: line {reader.line_num}: not valid CSV ({e})") from None
        return out
    finally:
        csv.field_size_limit(old)


def _read_file(path: Path, field: str, what: str, cap: int) -> list[str]:
    suffix = path.suffix.lower()
    where = f"{what} {path}"
    if suffix == ".txt":
        size = path.stat().st_size
        if size > cap:  # refused before it is read
            raise _too_big(where, size, cap, "a .txt document")
        return [_text(_decode(path.read_bytes(), where), where, cap)]
    if suffix == ".jsonl":
        out = []
        for n, offset, line in _lines(path, where, LINE_FACTOR * cap):
            if not line.strip():
                continue
            at = f"{where}: line {n}"
            out.append(_field(_json(_decode(line, at, offset), at), field, at, cap))
        return out
    if suffix == ".json":
        data = _json(_decode(path.read_bytes(), where), where, whole_file=True)
        if isinstance(data, dict) and isinstance(data.get(field), list):  # column-oriented
            return [_field({field: v}, field, f"{where}: index {i}", cap) for i, v in enumerate(data[field])]
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DocumentError(f"{where}: expected a JSON list of objects with a {field!r} field")
        return [_field(row, field, f"{where}: index {i}", cap) for i, row in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as e:
            raise DocumentError(f"{where}: not a readable Parquet file ({e})") from None
        if field not in schema.names:
            raise DocumentError(f"{where}: no column {field!r} (columns: {schema.names[:10]}); choose one with --text-field")
        col = pq.read_table(path, columns=[field]).column(field)
        return [_field({field: v}, field, f"{where}: row {i}", cap) for i, v in enumerate(col.to_pylist())]
    if suffix == ".csv":
        return _read_csv(path, field, where, cap)
    raise DocumentError(f"{where}: unsupported file type {suffix!r}; use one of {SUFFIXES}")


def _from_datasets(ds, field: str, where: str, split: str, cap: int) -> list[str]:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DocumentError(f"{where}: no split {split!r} (splits: {list(ds)}); choose one with --split")
        ds = ds[split]
    if field not in ds.column_names:
        raise DocumentError(f"{where}: no field {field!r} (fields: {ds.column_names[:10]}); choose one with --text-field")
    return [_field({field: v}, field, f"{where}: row {i}", cap) for i, v in enumerate(ds[field])]


def read_documents(source: str | Path, text_field: str = "text", split: str = "train", *,
                   what: str = "--data") -> Documents:
    """Read documents from a file, a folder of files, a `datasets.save_to_disk` folder, or a hub dataset id.

    Raises FileNotFoundError / ValueError (DocumentError) naming `what` (the flag that gave the source), the file,
    the row and the field; never returns zero documents.
    """
    src = str(source)
    where = f"{what} {src}"
    path = Path(src).expanduser()
    cap = max_document_bytes()
    files: list[Path]
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                          or (path / "state.json").exists()):
        from datasets import load_from_disk

        texts, nfiles = _from_datasets(load_from_disk(str(path)), text_field, where, split, cap), 1
    elif path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DocumentError(f"{where}: folder holds no {'/'.join(SUFFIXES)} files")
        texts = [t for f in files for t in _read_file(f, text_field, what, cap)]
        nfiles = len(files)
    elif path.is_file():
        texts, nfiles = _read_file(path, text_field, what, cap), 1
    elif path.suffix.lower() in SUFFIXES or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{where}: no such file or folder")
    else:  # a hub dataset id
        try:
            from datasets import load_dataset

            ds = load_dataset(src, split=split)
        except Exception as e:
            raise DocumentError(f"{where}: no such local file or folder, and loading it as a hub dataset failed: "
                                f"{type(e).__name__}: {str(e)[:300]}") from None
        texts, nfiles = _from_datasets(ds, text_field, where, split, cap), 0
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise DocumentError(f"{where}: no non-empty documents in field {text_field!r} ({len(texts)} rows read)")
    if len(kept) < len(texts):
        log.info("skipped %d empty documents of %d in %s", len(texts) - len(kept), len(texts), src)
    return Documents(kept, src, text_field, nfiles, len(texts) - len(kept))
