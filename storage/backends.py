"""The on-disk encodings of a shard (backends), all built from the one schema declaration, and their registry.

A backend is a class with a `name` (the `--format` value), a file-name `suffix`, a static
`write(path, schema, arrays)` that writes a whole shard from numpy arrays, and an instance made with
`(path, schema)` whose `read(field, start, stop)` gives rows back as numpy arrays (`Backend` below).
`register_backend` adds one; shard names, the detection of foreign files in a cache folder and the
`--format` choices all come from the registry. Two are built in:

- zarr: a Zarr v3 group per shard, one array per field, zstd-compressed, with the sharding codec so
  each field is one file and a single row is read without decompressing its neighbours.
- arrow: an Arrow IPC stream file per shard (the format `datasets` uses on disk: readable with
  `datasets.Dataset.from_file`), uncompressed, memory-mapped on read (zero-copy).

Fields along the axis "position" (schema.py) hold one entry per trained position of the
shard, row after row: a Zarr array of their own length; in Arrow, a list column holding each row's positions.
`read(field, start, stop)` indexes rows for row fields and positions for these.

"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import pyarrow as pa

from .schema import Field, position_counts

_CHUNK_BYTES = 64 * 1024  # target uncompressed bytes of one zarr inner chunk


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def shard_files(path: Path) -> list[tuple[str | None, Path, int]]:
    """The files of a shard, without opening any: [(None, path, size)] for a file, or for a folder
    [(relative name, path, size)] of every file below it, sorted by name.

    Only regular files and folders are accepted, never followed through a link: a symbolic link, FIFO, socket or
    device anywhere in a shard could lead outside the cache, block a reader forever or never end.
    Raises CorruptShardError naming the shard.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CorruptShardError(path, "missing") from None
    if stat.S_ISREG(st.st_mode):
        return [(None, path, st.st_size)]
    if not stat.S_ISDIR(st.st_mode):
        raise CorruptShardError(path, "is not a regular file or folder (a FIFO, socket or device)")
    files, folders = [], [Path(path)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for e in entries:
                rel = Path(e.path).relative_to(path).as_posix()
                if e.is_symlink():
                    raise CorruptShardError(path, f"holds a symbolic link ({rel}); a shard holds only files and folders")
                if e.is_dir(follow_symlinks=False):
                    folders.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    files.append((rel, Path(e.path), e.stat(follow_symlinks=False).st_size))
                else:
                    raise CorruptShardError(path, f"holds {rel}, which is not a regular file (a FIFO, socket or device)")
    return sorted(files, key=lambda f: f[0])


def _hash_file(h, path: Path, shard: Path) -> None:
    """Feed a regular file to `h` in 1 MiB blocks; opened without blocking, so a FIFO swapped in never hangs."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptShardError(shard, "changed into something other than a regular file while it was read")
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def checksum(path: Path) -> str:
    """sha256 of a shard: of the file, or of every file of a folder (relative name and bytes, sorted)."""
    h = hashlib.sha256()
    for rel, p, _ in shard_files(path):
        if rel is not None:
            h.update(rel.encode() + b"\0")
        _hash_file(h, p, path)
    return h.hexdigest()


def size_on_disk(path: Path) -> int:
    """Bytes of a shard's files (shard_files), from their metadata only."""
    return sum(size for _, _, size in shard_files(path))


def _check_arrays(schema: tuple[Field, ...], arrays: dict[str, np.ndarray]) -> int:
    rows = {arrays[f.name].shape[0] for f in schema if not f.per_position}
    assert len(rows) == 1, f"fields disagree on the row count: { {k: v.shape for k, v in arrays.items()} }"
    n = rows.pop()
    counts = position_counts(schema, arrays)
    positions = None if counts is None else int(counts.sum())
    for f in schema:
        a = arrays[f.name]
        lead = positions if f.per_position else n
        assert a.shape == (lead, *f.shape) and a.dtype == np.dtype(f.dtype), (f.name, a.shape, a.dtype, f)
    return n


class ZarrBackend:
    name = "zarr"
    suffix = ".zarr"

    @staticmethod
    def write(path: Path, schema: tuple[Field, ...], arrays: dict[str, np.ndarray]) -> None:
        import zarr
        from zarr.codecs import ZstdCodec

        _check_arrays(schema, arrays)
        group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
        for f in schema:
            n = arrays[f.name].shape[0]  # rows, or trained positions
            chunk_rows = max(1, min(n, _CHUNK_BYTES // max(1, f.row_bytes)))
            shard_rows = -(-max(n, 1) // chunk_rows) * chunk_rows  # a multiple of the inner chunk, >= n
            arr = group.create_array(
                f.name,
                shape=(n, *f.shape),
                dtype=f.dtype,
                chunks=(chunk_rows, *f.shape),
                shards=(shard_rows, *f.shape),  # one file per field, rows addressable inside it
                compressors=ZstdCodec(level=3),
                fill_value=0,
            )
            arr[...] = arrays[f.name]
        _fsync_tree(path)

    def __init__(self, path: Path, schema: tuple[Field, ...]):
        import zarr

        self.path = path
        self.schema = {f.name: f for f in schema}
        try:
            self.group = zarr.open_group(store=str(path), mode="r", zarr_format=3)
            self.arrays = {name: self.group[name] for name in self.schema}
            stored = {name: (np.dtype(a.dtype), tuple(a.shape)) for name, a in self.arrays.items()}
        except Exception as e:  # zarr raises a zoo of types for a damaged store
            raise CorruptShardError(path, f"cannot open as a Zarr v3 group ({type(e).__name__}: {e})") from e
        _check_stored(path, schema, stored)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(self.arrays[name][start:stop])
        except Exception as e:
            raise CorruptShardError(self.path, f"cannot read field {name!r} rows {start}:{stop} ({type(e).__name__}: {e})") from e


def _check_stored(path: Path, schema: tuple[Field, ...], stored: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    """The arrays a shard declares must be the schema's fields, with one row count: a declared shape is what a
    reader allocates, so a shard that disagrees with its manifest is refused before any value is read."""
    for f in schema:
        dtype, shape = stored[f.name]
        if dtype != np.dtype(f.dtype) or shape[1:] != f.shape:
            raise CorruptShardError(path, f"field {f.name!r} is stored as {dtype} rows of shape {list(shape[1:])}, the "
                                    f"manifest's schema says {f.dtype} rows of shape {list(f.shape)}")
    for per_position in (False, True):
        if len({stored[f.name][1][0] for f in schema if f.per_position == per_position}) > 1:
            raise CorruptShardError(path, f"its fields hold different numbers of {'positions' if per_position else 'rows'}")


def _arrow_type(f: Field) -> pa.DataType:
    t = pa.from_numpy_dtype(np.dtype(f.dtype))
    for size in reversed(f.shape):
        t = pa.list_(t, size)
    return pa.list_(t) if f.per_position else t  # a row's positions: a list of variable length


class ArrowBackend:
    name = "arrow"
    suffix = ".arrow"

    @staticmethod
    def write(path: Path, schema: tuple[Field, ...], arrays: dict[str, np.ndarray]) -> None:
        _check_arrays(schema, arrays)
        counts = position_counts(schema, arrays)
        columns, fields = [], []
        for f in schema:
            a = np.ascontiguousarray(arrays[f.name])
            col: pa.Array = pa.array(a.reshape(-1))
            for size in reversed(f.shape):
                col = pa.FixedSizeListArray.from_arrays(col, size)
            if f.per_position:  # the positions of row r are entries offsets[r]:offsets[r+1]
                offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
                col = pa.ListArray.from_arrays(pa.array(offsets), col)
            columns.append(col)
            metadata = {"doc": f.doc}
            if f.encoding is not None:  # so a reader of the bare file (datasets) sees the values are codes
                metadata["encoding"] = json.dumps(f.encoding, sort_keys=True)
            fields.append(pa.field(f.name, _arrow_type(f), nullable=False, metadata=metadata))
        table = pa.Table.from_arrays(columns, schema=pa.schema(fields))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        _fsync_tree(path)

    def __init__(self, path: Path, schema: tuple[Field, ...]):
        self.path = path
        self.fields = {f.name: f for f in schema}
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
            self.columns = {}
            for name, f in self.fields.items():
                if table.schema.field(name).type != _arrow_type(f):  # same size, other shape: reshape would not notice
                    raise CorruptShardError(path, f"field {name!r} is stored as {table.schema.field(name).type}, the "
                                            f"manifest's schema says {_arrow_type(f)}")
                col = table.column(name).combine_chunks()
                for _ in range(len(f.shape) + f.per_position):
                    col = col.flatten()
                lead = len(col) // max(1, int(np.prod(f.shape, dtype=np.int64))) if f.per_position else table.num_rows
                self.columns[name] = col.to_numpy(zero_copy_only=True).reshape(lead, *f.shape)
        except CorruptShardError:
            raise
        except (pa.ArrowException, KeyError, ValueError, OSError) as e:
            raise CorruptShardError(path, f"cannot read as an Arrow IPC stream ({type(e).__name__}: {e})") from e

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.columns[name][start:stop]


class Backend(Protocol):
    """What a storage backend provides (see the module docstring)."""

    name: ClassVar[str]
    suffix: ClassVar[str]

    @staticmethod
    def write(path: Path, schema: tuple[Field, ...], arrays: dict[str, np.ndarray]) -> None: ...

    def __init__(self, path: Path, schema: tuple[Field, ...]) -> None: ...

    def read(self, name: str, start: int, stop: int) -> np.ndarray: ...


BACKENDS: dict[str, type[Backend]] = {}
_SHARD = re.compile(r"^shard-(\d{5})(\..+)$")


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Add a backend to the registry (usable as a class decorator); its name and suffix must be new."""
    if cls.name in BACKENDS or any(b.suffix == cls.suffix for b in BACKENDS.values()):
        raise ValueError(f"a backend named {cls.name!r} or with the suffix {cls.suffix!r} is registered already")
    if not re.fullmatch(r"\.[a-z0-9]+", cls.suffix):
        raise ValueError(f"backend suffix {cls.suffix!r}: expected a dot and lower-case letters or digits")
    BACKENDS[cls.name] = cls
    return cls


def formats() -> tuple[str, ...]:
    """The registered backend names: the choices of --format."""
    return tuple(BACKENDS)


def get_backend(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ValueError(f"--format must be one of {formats()}, got {name!r}")
    return BACKENDS[name]


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:05d}{get_backend(fmt).suffix}"


def parse_shard_name(name: str) -> tuple[int, str] | None:
    """(index, backend name) of a shard's file name, or None if no registered backend writes that name."""
    m = _SHARD.match(name)
    if m is None:
        return None
    fmt = next((b.name for b in BACKENDS.values() if b.suffix == m.group(2)), None)
    return None if fmt is None else (int(m.group(1)), fmt)


register_backend(ZarrBackend)
register_backend(ArrowBackend)
FORMATS = formats()  # the built-in ones; the registry may hold more


class CorruptShardError(ValueError):
    """A shard is missing, truncated, altered or unreadable. The message names the shard."""

    def __init__(self, path: Path, why: str):
        self.path = Path(path)
        super().__init__(f"corrupt cache shard {self.path}: {why}")
