"""Reading text documents for both stages: local files, folders, `save_to_disk` folders, hub datasets.

Order is deterministic: files of a folder are taken in sorted order of their relative paths, rows in
file order. A `.txt` file is one document. Empty documents (only whitespace) are skipped and counted.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
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


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "convert the file to UTF-8") from None


def _field(row, field: str, where: str):
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with a {field!r} field, got {type(row).__name__}")
    if field not in row:
        raise ValueError(f"{where}: no field {field!r} (fields: {sorted(row)[:10]}); choose one with --text-field")
    value = row[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} holds {type(value).__name__}, expected text")
    return value


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [_decode(path.read_bytes(), path)]
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(_decode(path.read_bytes(), path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(_field(row, field, f"{path}:{n}"))
        return out
    if suffix == ".json":
        try:
            data = json.loads(_decode(path.read_bytes(), path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get(field), list):  # column-oriented
            return [_field({field: v}, field, f"{path}[{i}]") for i, v in enumerate(data[field])]
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects with a {field!r} field")
        return [_field(row, field, f"{path}[{i}]") for i, row in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        if field not in schema.names:
            raise ValueError(f"{path}: no column {field!r} (columns: {schema.names[:10]}); choose one with --text-field")
        col = pq.read_table(path, columns=[field]).column(field)
        return [_field({field: v}, field, f"{path} row {i}") for i, v in enumerate(col.to_pylist())]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_decode(path.read_bytes(), path), newline=""))
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise ValueError(f"{path}: no column {field!r} (columns: {reader.fieldnames}); choose one with --text-field")
        return [row[field] or "" for row in reader]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}")


def _from_datasets(ds, field: str, where: str, split: str) -> list[str]:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"{where}: no split {split!r} (splits: {list(ds)}); choose one with --split")
        ds = ds[split]
    if field not in ds.column_names:
        raise ValueError(f"{where}: no field {field!r} (fields: {ds.column_names[:10]}); choose one with --text-field")
    return [_field({field: v}, field, f"{where} row {i}") for i, v in enumerate(ds[field])]


def read_documents(source: str | Path, text_field: str = "text", split: str = "train") -> Documents:
    """Read documents from a file, a folder of files, a `datasets.save_to_disk` folder, or a hub dataset id.

    Raises FileNotFoundError / ValueError naming the file, field or flag; never returns zero documents.
    """
    src = str(source)
    path = Path(src).expanduser()
    files: list[Path]
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                          or (path / "state.json").exists()):
        from datasets import load_from_disk

        texts, nfiles = _from_datasets(load_from_disk(str(path)), text_field, src, split), 1
    elif path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"--data {src}: folder holds no {'/'.join(SUFFIXES)} files")
        texts = [t for f in files for t in _read_file(f, text_field)]
        nfiles = len(files)
    elif path.is_file():
        texts, nfiles = _read_file(path, text_field), 1
    elif path.suffix.lower() in SUFFIXES or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--data {src}: no such file or folder")
    else:  # a hub dataset id
        try:
            from datasets import load_dataset

            ds = load_dataset(src, split=split)
        except Exception as e:
            raise ValueError(f"--data {src}: no such local file or folder, and loading it as a hub dataset failed: "
                             f"{type(e).__name__}: {str(e)[:300]}") from None
        texts, nfiles = _from_datasets(ds, text_field, src, split), 0
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise ValueError(f"--data {src}: no non-empty documents in field {text_field!r} ({len(texts)} rows read)")
    if len(kept) < len(texts):
        log.info("skipped %d empty documents of %d in %s", len(texts) - len(kept), len(texts), src)
    return Documents(kept, src, text_field, nfiles, len(texts) - len(kept))
