"""Reading a cache: `open_cache(path)` validates the manifest and gives per-sequence tensors by index.

Shards are opened lazily and read row by row (Zarr decompresses only the rows' chunks; Arrow is
memory-mapped), so a cache larger than memory is fine.

Integrity: opening checks the manifest (version, self-checksum) and that every shard exists with
its recorded size (cheap: catches missing and truncated shards). With `verify="lazy"` (the
default) each shard's sha256 and values (ids in the vocabulary, no NaN log-probs, ...) are checked
the first time it is read, so flipped bytes never reach training; `verify="full"` checks them all
up front; `verify="none"` trusts the files.

Encoded fields (`--logprob-dtype q8`, see encoding.py) are decoded on read: every consumer gets the
same fields whatever the encoding (`topk_logprobs` as float32 log-probs); `read_rows(..., raw=True)`
gives the stored fields.
"""
from __future__ import annotations

import bisect
import hashlib
import threading
from pathlib import Path

import numpy as np
import torch

from .backends import BACKENDS, CorruptShardError, checksum, get_backend, size_on_disk
from .manifest import ManifestError, load_manifest
from .encoding import Q8, decode_q8, q8_bad_rows
from .schema import Field, schema_from_json

VERIFY_MODES = ("none", "lazy", "full")
REQUIRED_FIELDS = ("input_ids", "length", "topk_ids", "topk_logprobs", "label_logprob")
_LOGPROB_SLACK = 1e-3  # log_softmax can round a hair above 0; anything more is not a log-probability


def validate_values(arrays: dict[str, np.ndarray], *, vocab_size: int, seq_len: int, path: Path,
                    schema: tuple[Field, ...] = ()) -> None:
    """Refuse values no teacher can produce: ids outside the vocabulary, lengths outside [0, seq_len],
    NaN or +inf or positive log-probs (-inf is a legal log-prob: probability 0).

    Args:
        arrays: the stored fields of some rows, as read (encoded fields not decoded).
        schema: the cache's fields; a field with an encoding is checked as that encoding stores it:
            q8 `topk_logprobs` codes must decode within [0, levels] with column 0 at 0, and its
            `top1_logprob` must be finite and not positive.
    Raises:
        CorruptShardError naming `path`, the field, the problem and the first bad row.
    """
    def bad(field: str, what: str, mask: np.ndarray):
        row = int(np.argwhere(mask)[0][0])
        raise CorruptShardError(path, f"field {field!r} holds {what} (row {row} of the shard)")

    length = arrays["length"]
    if ((length < 0) | (length > seq_len)).any():
        bad("length", f"a length outside [0, {seq_len}]", (length < 0) | (length > seq_len))
    for name in ("input_ids", "topk_ids"):
        a = arrays[name].astype(np.int64, copy=False)
        out = (a < 0) | (a >= vocab_size)
        if out.any():
            bad(name, f"ids outside [0, {vocab_size})", out.reshape(len(a), -1).any(1))
    encodings = {f.name: f.encoding["name"] for f in schema if f.encoding is not None}
    if encodings.get("topk_logprobs") == Q8:
        wrong = q8_bad_rows(arrays["topk_logprobs"])
        if wrong.any():
            bad("topk_logprobs", "q8 codes outside their range (a non-zero first column or a sum above the levels)", wrong)
        a = arrays["top1_logprob"]
        wrong = ~np.isfinite(a) | (a > _LOGPROB_SLACK)  # the argmax of a distribution is never -inf
        if wrong.any():
            bad("top1_logprob", "NaN, infinite or positive log-probabilities", wrong.reshape(len(a), -1).any(1))
        plain = ("label_logprob",)
    else:
        plain = ("topk_logprobs", "label_logprob")
    for name in plain:
        a = arrays[name].astype(np.float32, copy=False)
        wrong = np.isnan(a) | (a > _LOGPROB_SLACK)
        if wrong.any():
            bad(name, "NaN, +inf or positive log-probabilities", wrong.reshape(len(a), -1).any(1))


def decode_rows(arrays: dict[str, np.ndarray], schema: tuple[Field, ...]) -> dict[str, np.ndarray]:
    """Stored fields -> the fields every cache gives its readers: encoded fields decoded, and the fields
    only an encoding needs (q8: top1_logprob, which becomes topk_logprobs[..., 0]) dropped.

    Args:
        arrays: stored fields of rows, as read.
        schema: the cache's fields.
    Returns:
        input_ids, length, topk_ids, topk_logprobs, label_logprob (plus any other plain field).
    """
    out = dict(arrays)
    for f in schema:
        if f.encoding is None:
            continue
        if f.encoding["name"] == Q8:
            top1 = out.pop(f.encoding["top1_field"])
            out[f.name] = decode_q8(top1, out[f.name], gap_max=f.encoding["gap_max"])  # (R, T-1, K) float32
        else:  # load_manifest refuses unknown encodings; this is our own invariant
            raise AssertionError(f"no decoder for encoding {f.encoding['name']!r}")
    return out


class Cache:
    """A finished cache. `len(cache)` sequences; `cache[i]` -> dict of torch tensors for row i.

    Fields of a row (see `manifest["schema"]`): input_ids (T,), length (), topk_ids (T-1, K),
    topk_logprobs (T-1, K), label_logprob (T-1,). Ids come back as int64, values as stored, except
    encoded fields, which come back decoded (q8 `topk_logprobs`: float32 log-probs).
    """

    def __init__(self, folder: Path, verify: str = "lazy"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.format = self.manifest["format"]
        if self.format not in BACKENDS:
            raise ValueError(f"{self.folder / 'manifest.json'}: unknown format {self.format!r} (known: {tuple(BACKENDS)})")
        self.schema: tuple[Field, ...] = schema_from_json(self.manifest["schema"])
        missing = [f for f in REQUIRED_FIELDS if f not in {x.name for x in self.schema}]
        if missing:
            raise ManifestError(f"{self.folder / 'manifest.json'}: the schema lacks the fields {missing}")
        self.shards = self.manifest["shards"]
        self._starts = [s["first_row"] for s in self.shards]
        self._open: dict[int, object] = {}
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        self.verify_mode = verify
        for s in self.shards:  # cheap structural check: every shard present with its size
            path = self.folder / s["name"]
            if not path.exists():
                raise CorruptShardError(path, "missing")
            if size_on_disk(path) != s["bytes"]:
                raise CorruptShardError(path, f"size {size_on_disk(path)} bytes, manifest says {s['bytes']} (truncated or replaced)")
        if verify == "full":
            self.verify()

    # -- metadata -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    # -- integrity ------------------------------------------------------------------------------
    def verify_shard(self, index: int) -> None:
        """Check one shard's sha256 against the manifest, then its values (validate_values)."""
        s = self.shards[index]
        path = self.folder / s["name"]
        if not path.exists():
            raise CorruptShardError(path, "missing")
        got = checksum(path)
        if got != s["sha256"]:
            raise CorruptShardError(path, f"sha256 {got[:12]}... does not match the manifest's {s['sha256'][:12]}... (altered, or copied from another cache)")
        reader = get_backend(self.format)(path, self.schema)
        validate_values({f.name: reader.read(f.name, 0, s["rows"]) for f in self.schema},
                        vocab_size=self.vocab_size, seq_len=self.seq_len, path=path, schema=self.schema)
        self._verified.add(index)

    def verify(self) -> None:
        """Check every shard's checksum and values, and the auxiliary files; raise CorruptShardError naming the first bad one."""
        for i in range(len(self.shards)):
            self.verify_shard(i)
        docs = self.manifest["data"].get("documents_file")
        if docs:
            path = self.folder / docs["name"]
            if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != docs["sha256"]:
                raise CorruptShardError(path, "missing or its sha256 does not match the manifest")

    # -- rows -----------------------------------------------------------------------------------
    def _shard(self, index: int):
        with self._lock:
            if index not in self._open:
                if self.verify_mode != "none" and index not in self._verified:
                    self.verify_shard(index)  # checksum before any parser touches the bytes
                self._open[index] = get_backend(self.format)(self.folder / self.shards[index]["name"], self.schema)
            return self._open[index]

    def locate(self, row: int) -> tuple[int, int]:
        """(shard index, row within the shard) of a global row."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a cache of {len(self)} sequences")
        i = bisect.bisect_right(self._starts, row) - 1
        return i, row - self._starts[i]

    @property
    def encoded(self) -> bool:
        """Whether some stored field is encoded (read_rows decodes it unless raw)."""
        return any(f.encoding is not None for f in self.schema)

    def read_rows(self, start: int, stop: int, raw: bool = False) -> dict[str, np.ndarray]:
        """Rows [start, stop) of one shard or several, as numpy arrays keyed by field.

        Args:
            start, stop: global row range.
            raw: give the stored fields (q8: top1_logprob and the uint8 codes) instead of decoding them.
        Returns:
            input_ids (R, T), length (R,), topk_ids (R, T-1, K), topk_logprobs (R, T-1, K),
            label_logprob (R, T-1); with raw, the fields of the manifest's schema as stored.
        """
        parts: dict[str, list[np.ndarray]] = {f.name: [] for f in self.schema}
        row = start
        while row < stop:
            i, local = self.locate(row)
            n = min(stop - row, self.shards[i]["rows"] - local)
            reader = self._shard(i)
            for f in self.schema:
                parts[f.name].append(reader.read(f.name, local, local + n))
            row += n
        arrays = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}
        return arrays if raw or not self.encoded else decode_rows(arrays, self.schema)

    def iter_shards(self, raw: bool = False):
        """Yield each shard's rows as numpy arrays (one shard in memory at a time); raw as in read_rows."""
        for s in self.shards:
            yield self.read_rows(s["first_row"], s["first_row"] + s["rows"], raw=raw)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        arrays = self.read_rows(row, row + 1)
        return {k: _to_tensor(v[0]) for k, v in arrays.items()}


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind == "u":  # torch has no uint16/uint32 indexing: ids go to int64
        a = a.astype(np.int64)
    return torch.from_numpy(np.array(a, copy=True))


def open_cache(folder: str | Path, verify: str = "lazy") -> Cache:
    """Open a finished cache folder.

    Args:
        folder: a folder written by `mft cache`.
        verify: "lazy" (default; each shard's sha256 checked when first read), "full" (all now), "none".
    Returns:
        Cache. Raises FileNotFoundError, ManifestError (missing, altered, unknown schema version) or
        CorruptShardError (names the shard).
    """
    return Cache(Path(folder), verify=verify)
