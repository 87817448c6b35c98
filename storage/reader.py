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

A cache stores the teacher's values at the trained positions only (schema.py); readers expand them, so every
consumer gets one per-row view: (T-1, K) arrays with zeros where nothing is trained, the row's `label_mask` (bool)
and, with documents packed whole, its `segment_ids`. Caches of schema versions 1 and 2 (every position stored) are
given the same view at open: their label mask follows from the rows' BOS rule (`upgrade_rows`).
"""
from __future__ import annotations

import bisect
import gc
import math
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .backends import CorruptShardError, checksum, get_backend, size_on_disk
from .encoding import Q8, Q8_GAP_MAX, Q8_LEVELS, decode_q8, q8_bad_rows
from mft_cache.masks import label_mask, real_tokens

from .manifest import MANIFEST, FileRecord, ManifestError, load_manifest
from .schema import MASK_FIELD, SEGMENTS_FIELD, Field, position_counts, row_bytes, stores_positions
from .validate import member_path

VERIFY_MODES = ("none", "lazy", "full")
_LOGPROB_SLACK = 1e-3  # log_softmax can round a hair above 0; anything more is not a log-probability
_VERIFY_BLOCK_BYTES = 16 * 2**20  # verification reads a shard this many uncompressed bytes at a time

# How far the stored values may stray from a distribution, in probability (absolute: a target's error is absolute).
# float16/float32: a stored log-prob is the teacher's float32 value rounded to float16, |error| <= 2**-11 |lp|, so
# each p_j moves by at most 2**-11 p_j |ln p_j|; over kept ids whose probabilities sum to at most 1 that is at most
# 2**-11 ln(K) (the entropy bound): 0.0054 for K = 65,536. 0.01 covers it and float32 rounding of the log_softmax.
MASS_TOLERANCE = 0.01


def q8_mass_tolerance(gap_max: float = Q8_GAP_MAX) -> float:
    """The tolerance for q8-decoded values. q8 decodes a gap g < gap_max with |error| <= sqrt(g)/scale + 1/(4 scale^2)
    nats (encoding.py), and sqrt(g)/scale <= sqrt(gap_max)/scale = gap_max/levels, so a decoded p_j is at most
    p_j * exp(gap_max/levels + gap_max/(4 levels^2)): a relative error of 0.0648 for gap_max 16 (<= 4/63.75 nats).
    MASS_TOLERANCE on top covers the float32 arithmetic and the gaps beyond gap_max that decode as gap_max (each
    such p_j raised to at most e^-16 p_max: under 1e-4 in all for K < 1,000): 0.0748 for gap_max 16."""
    return math.expm1(gap_max / Q8_LEVELS + gap_max / (4 * Q8_LEVELS**2)) + MASS_TOLERANCE


def check_distributions(arrays: dict[str, np.ndarray], logprobs: np.ndarray, trained: np.ndarray, tolerance: float,
                        bad) -> None:
    """Refuse top-k values that no distribution gives, at trained positions only (the others hold zeros).

    Args:
        arrays: input_ids (R, T), topk_ids (R, T-1, K), label_logprob (R, T-1) of some rows.
        logprobs: (R, T-1, K) the top-k log-probs as readers get them (q8 decoded), no NaN.
        trained: (R, T-1) bool, packing.label_mask.
        tolerance: in probability (MASS_TOLERANCE, q8_mass_tolerance).
        bad: bad(field, what, rows) raises, naming the first row where rows (R,) is set.
    Checks: log-probs sorted descending along k (ties and -inf allowed); ids unique at a position; the
    probabilities of the kept ids (the top-k, plus the label where it is not among them) sum to at most
    1 + tolerance; the label's probability equals its top-k column where the label is among the ids, and does not
    exceed the k-th probability where it is not (both within tolerance).
    """
    if not trained.any():
        return
    where = np.nonzero(trained)[0]  # (N,) the row of each trained position, ascending

    def rows(flags: np.ndarray) -> np.ndarray:  # (N,) -> (R,)
        out = np.zeros(len(trained), dtype=bool)
        out[where[flags]] = True
        return out

    lp = logprobs[trained].astype(np.float32, copy=False)  # (N, K)
    unsorted = (lp[:, 1:] > lp[:, :-1]).any(1)  # (N,)
    if unsorted.any():
        bad("topk_logprobs", "log-probabilities not sorted descending along k at a trained position", rows(unsorted))
    ids = arrays["topk_ids"][trained].astype(np.int64)  # (N, K)
    ordered = np.sort(ids, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)
    if repeated.any():
        bad("topk_ids", "the same id twice at one trained position", rows(repeated))
    labels = arrays["input_ids"][:, 1:][trained].astype(np.int64)  # (N,)
    hit = ids == labels[:, None]  # (N, K)
    in_topk = hit.any(1)
    p = np.exp(lp)  # (N, K)
    p_label = np.exp(arrays["label_logprob"][trained].astype(np.float32))  # (N,)
    mass = p.sum(1) + np.where(in_topk, 0.0, p_label)
    over = mass > 1 + tolerance
    if over.any():
        bad("topk_logprobs", f"probabilities summing to {mass[over][0]:.4g} at a trained position (the top-k, plus the "
            f"label where it is not among them), above 1 + {tolerance:.3g}", rows(over))
    differs = in_topk & (np.abs((p * hit).sum(1) - p_label) > tolerance)
    if differs.any():
        bad("label_logprob", f"a label probability that differs from the label's top-k column by more than {tolerance:.3g}",
            rows(differs))
    above = ~in_topk & (p_label > p[:, -1] + tolerance)
    if above.any():
        bad("label_logprob", f"a label probability above the k-th top-k probability (+ {tolerance:.3g}) although the "
            "label is not among the top-k ids", rows(above))


def validate_values(arrays: dict[str, np.ndarray], *, vocab_size: int, seq_len: int, path: Path,
                    schema: tuple[Field, ...] = (), bos_id: int | None = None, first_row: int = 0) -> None:
    """Refuse values no teacher can produce: ids outside the vocabulary, lengths outside [0, seq_len],
    NaN or +inf or positive log-probs (-inf is a legal log-prob: probability 0); then, at the trained
    positions, top-k values that describe no distribution (check_distributions).

    Args:
        arrays: the stored fields of some rows, as read (encoded fields not decoded).
        schema: the cache's fields; a field with an encoding is checked as that encoding stores it:
            q8 `topk_logprobs` codes must decode within [0, levels] with column 0 at 0, and its
            `top1_logprob` must be finite and not positive. Without a schema (or without
            `topk_logprobs` in `arrays`) only the first checks run.
        bos_id: the BOS the rows start with (Manifest.bos_id), which says which positions are trained.
        first_row: the row of the shard `arrays` starts at, for messages.
    Raises:
        CorruptShardError naming `path`, the field, the problem and the first bad row.
    """
    def bad(field: str, what: str, mask: np.ndarray):
        row = first_row + int(np.argwhere(mask)[0][0])
        raise CorruptShardError(path, f"field {field!r} holds {what} (row {row} of the shard)")

    length = arrays["length"]
    if ((length < 0) | (length > seq_len)).any():
        bad("length", f"a length outside [0, {seq_len}]", (length < 0) | (length > seq_len))
    trained = None
    if stores_positions(schema):  # the segments and the mask first: they place every other value
        trained = check_segments(arrays, length, seq_len, bad)
        arrays = expand_positions(arrays, schema)
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
    if not schema:
        return
    decoded = decode_rows(arrays, schema)["topk_logprobs"]  # (R, T-1, K) what readers get: codes checked above
    lp_field = next(f for f in schema if f.name == "topk_logprobs")
    tolerance = q8_mass_tolerance(lp_field.encoding["gap_max"]) if lp_field.encoding else MASS_TOLERANCE
    if trained is None:
        trained = label_mask(arrays["input_ids"], arrays["length"], bos_id)
    check_distributions(arrays, decoded, trained, tolerance, bad)


def check_segments(arrays: dict[str, np.ndarray], length: np.ndarray, seq_len: int, bad) -> np.ndarray:
    """The row fields that place the trained positions, checked: a label mask of 0s and 1s that trains only real
    labels and, where segment ids are stored, segment ids in [1, seq_len] on real tokens and 0 exactly on the
    padding, with every trained label of the same document as its position. Returns the mask (R, T-1) bool."""
    mask = arrays[MASK_FIELD]
    if (mask > 1).any():
        bad(MASK_FIELD, "values other than 0 and 1", (mask > 1).any(1))
    trained = mask.astype(bool)  # (R, T-1)
    real = real_tokens(length, mask.shape[1] + 1)  # (R, T)
    if SEGMENTS_FIELD not in arrays:
        stray = trained & ~real[:, 1:]
        if stray.any():
            bad(MASK_FIELD, "a trained position whose label is padding", stray.any(1))
        return trained
    seg = arrays[SEGMENTS_FIELD].astype(np.int64, copy=False)  # (R, T)
    wrong = (seg < 0) | (seg > seq_len) | ((seg == 0) == real)
    if wrong.any():
        bad(SEGMENTS_FIELD, "segment ids outside [1, seq_len] on real tokens or not 0 on the padding",
            wrong.any(1))
    stray = trained & ((seg[:, :-1] != seg[:, 1:]) | (seg[:, 1:] == 0))
    if stray.any():
        bad(MASK_FIELD, "a trained position whose label is padding or another document's token", stray.any(1))
    return trained


def expand_positions(arrays: dict[str, np.ndarray], schema: tuple[Field, ...]) -> dict[str, np.ndarray]:
    """Rows with their per-position fields (N, ...) expanded to (R, T-1, ...), zeros where label_mask is 0; the mask
    comes back as bool. Rows of schema versions 1 and 2 (every position stored) are returned as they are.

    Args:
        arrays: row fields of R rows and the per-position fields of their N trained positions, in row order.
        schema: the cache's fields.
    """
    counts = position_counts(schema, arrays)
    if counts is None:
        return arrays
    trained = arrays[MASK_FIELD].astype(bool)  # (R, T-1)
    out = dict(arrays)
    out[MASK_FIELD] = trained
    for f in schema:
        if not f.per_position or f.name not in arrays:  # (q8's top1_logprob is gone once decoded)
            continue
        a = arrays[f.name]
        assert len(a) == int(counts.sum()), f"{f.name}: {len(a)} positions for a label_mask of {int(counts.sum())}"
        dense = np.zeros((*trained.shape, *a.shape[1:]), dtype=a.dtype)  # (R, T-1, ...)
        dense[trained] = a
        out[f.name] = dense
    return out


def upgrade_rows(arrays: dict[str, np.ndarray], bos_id: int | None) -> dict[str, np.ndarray]:
    """Decoded rows of schema versions 1 and 2 in the view every cache gives: their label mask (R, T-1) bool follows
    from the rows' BOS rule (`bos_id`, Manifest.bos_id), and their values are already zero where it is False."""
    return {**arrays, MASK_FIELD: label_mask(arrays["input_ids"], arrays["length"], bos_id)}


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


MAX_OPEN_SHARDS = 8  # shard readers kept open at once by a Cache


class Cache:
    """A finished cache. `len(cache)` sequences; `cache[i]` -> dict of torch tensors for row i.

    Fields of a row: input_ids (T,), length (), label_mask (T-1,) bool, topk_ids (T-1, K), topk_logprobs (T-1, K),
    label_logprob (T-1,) (zeros where label_mask is False) and, with documents packed whole, segment_ids (T,). Ids come
    back as int64, values as stored, except encoded fields, which come back decoded (q8 `topk_logprobs`: float32
    log-probs).
    """

    def __init__(self, folder: Path, verify: str = "lazy"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)  # validated: types, ranges, schema, shard names, row counts
        self.format = self.manifest.format
        self.schema: tuple[Field, ...] = self.manifest.schema
        self.shards = self.manifest.shards
        self._starts = [s.first_row for s in self.shards]
        self._open: OrderedDict[int, object] = OrderedDict()  # the most recently read shards' readers
        self._offsets: dict[int, np.ndarray] = {}  # each open shard's (rows + 1,) position offsets
        self._positions = stores_positions(self.schema)  # False: schema versions 1 and 2, every position stored
        self._verified: set[int] = set()
        self._closed = 0  # shard readers closed so far
        self._lock = threading.Lock()
        self.verify_mode = verify
        for i, s in enumerate(self.shards):  # cheap structural check, metadata only: each a member of the folder, of its size
            self._member(f"shards[{i}]", s)
        docs = self.manifest.data.documents_file
        if docs:
            self._member("data.documents_file", docs, file=True)
        if verify == "full":
            self.verify()

    # -- metadata -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.num_sequences

    @property
    def top_k(self) -> int:
        return self.manifest.top_k

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    # -- integrity ------------------------------------------------------------------------------
    def _member(self, key: str, entry: FileRecord, file: bool = False) -> Path:
        """folder/entry.name once it is a plain member of the folder (validate.member_path) of the size the
        manifest's `key` records (a file only, if `file`), from metadata alone; raise CorruptShardError naming the
        file and the key, never echoing what is there."""
        path = self.folder / entry.name
        member_path(self.folder, entry.name)
        if file and not stat.S_ISREG(os.stat(path).st_mode):
            raise CorruptShardError(path, f"is not a regular file (manifest key {key!r})")
        if size_on_disk(path) != entry.bytes:
            raise CorruptShardError(path, f"its size differs from the {entry.bytes} bytes of the manifest's "
                                    f"{key}.bytes (truncated or replaced)")
        return path

    def _verified_reader(self, index: int):
        """Check one shard, then give its opened reader: where it is and its size (metadata), its sha256 against
        the manifest (before any parser reads it), its row count, then its values block by block."""
        s = self.shards[index]
        path = self._member(f"shards[{index}]", s)
        if checksum(path) != s.sha256:
            raise CorruptShardError(path, f"its sha256 does not match the manifest's shards[{index}].sha256 (altered, or "
                                    "copied from another cache)")
        reader = get_backend(self.format)(path, self.schema)
        found = len(reader.read("length", 0, s.rows + 1))
        if found != s.rows:
            raise CorruptShardError(path, f"holds {'more than ' if found > s.rows else ''}{min(found, s.rows)} rows, "
                                    f"the manifest says {s.rows} (shards[{index}].rows)")
        if self._positions:
            offsets = self._position_offsets(index, reader)
            for f in self.schema:
                found = len(reader.read(f.name, 0, int(offsets[-1]) + 1)) if f.per_position else None
                if f.per_position and found != offsets[-1]:
                    raise CorruptShardError(path, f"field {f.name!r} holds {found} trained positions, its rows' "
                                            f"label_mask {int(offsets[-1])}")
        block = max(1, _VERIFY_BLOCK_BYTES // max(1, row_bytes(self.schema)))
        for a in range(0, s.rows, block):
            b = min(s.rows, a + block)
            validate_values(self._read_block(index, reader, a, b), vocab_size=self.vocab_size,
                            seq_len=self.seq_len, path=path, schema=self.schema, bos_id=self.manifest.bos_id,
                            first_row=a)
        self._verified.add(index)
        return reader

    def _position_offsets(self, index: int, reader) -> np.ndarray:
        """(rows + 1,) where each row's trained positions start in shard `index`'s per-position fields."""
        if index not in self._offsets:
            mask = reader.read(MASK_FIELD, 0, self.shards[index].rows)
            counts = position_counts(self.schema, {MASK_FIELD: mask})
            self._offsets[index] = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        return self._offsets[index]

    def _read_block(self, index: int, reader, a: int, b: int) -> dict[str, np.ndarray]:
        """The stored fields of rows a..b-1 of shard `index` (per-position fields: those rows' trained positions)."""
        if not self._positions:
            return {f.name: reader.read(f.name, a, b) for f in self.schema}
        offsets = self._position_offsets(index, reader)
        p, q = int(offsets[a]), int(offsets[b])
        return {f.name: reader.read(f.name, p, q) if f.per_position else reader.read(f.name, a, b) for f in self.schema}

    def verify_shard(self, index: int) -> None:
        """Check one shard's place, size and sha256 against the manifest, then its row count and values (validate_values)."""
        self._verified_reader(index)

    def verify(self) -> None:
        """Check every shard's checksum and values, and the auxiliary files; raise CorruptShardError naming the first bad one."""
        for i in range(len(self.shards)):
            self.verify_shard(i)
        docs = self.manifest.data.documents_file
        if docs:
            path = self._member("data.documents_file", docs, file=True)
            if checksum(path) != docs.sha256:
                raise CorruptShardError(path, "its sha256 does not match the manifest's data.documents_file.sha256")

    # -- rows -----------------------------------------------------------------------------------
    def _shard(self, index: int):
        """The shard's reader; at most MAX_OPEN_SHARDS stay open (least recently read closed first), so that reading
        a cache of any size holds a bounded number of them (and of their memory maps)."""
        with self._lock:
            if index in self._open:
                self._open.move_to_end(index)
            else:
                if self.verify_mode != "none" and index not in self._verified:
                    self._open[index] = self._verified_reader(index)  # checksum before any parser touches the bytes
                else:
                    self._open[index] = get_backend(self.format)(self.folder / self.shards[index].name, self.schema)
                if len(self._open) > MAX_OPEN_SHARDS:
                    closed, _ = self._open.popitem(last=False)
                    self._offsets.pop(closed, None)
                    self._closed += 1
                    if self._closed % MAX_OPEN_SHARDS == 0:  # zarr's readers hold reference cycles (instance-local
                        gc.collect()  # lru_caches) that only a full collection frees; one (~0.1 s) per 8 closed
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
            label_logprob (R, T-1), label_mask (R, T-1) bool (the per-position values expanded, zeros where nothing
            is trained) and, with documents packed whole, segment_ids (R, T); with raw, the fields of the manifest's
            schema as stored (per-position fields: the rows' trained positions, (N, ...)).
        """
        parts: dict[str, list[np.ndarray]] = {f.name: [] for f in self.schema}
        row = start
        while row < stop:
            i, local = self.locate(row)
            n = min(stop - row, self.shards[i].rows - local)
            if n <= 0:  # load_manifest makes the rows add up; never loop on a manifest changed since
                raise ManifestError(f"{self.folder / MANIFEST}: row {row} lies past the end of the last shard "
                                    f"(num_sequences exceeds the shards' rows)")
            reader = self._shard(i)
            block = self._read_block(i, reader, local, local + n)
            for f in self.schema:
                a = block[f.name]
                if f.per_position:
                    parts[f.name].append(a)
                    continue
                if len(a) != n:
                    raise CorruptShardError(self.folder / self.shards[i].name, f"field {f.name!r} gave {len(a)} rows "
                                            f"for rows {local}:{local + n}; the manifest says the shard holds "
                                            f"{self.shards[i].rows}")
                parts[f.name].append(a)
            row += n
        arrays = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}
        if raw:
            return arrays
        if self.encoded:
            arrays = decode_rows(arrays, self.schema)
        if not self._positions:
            return upgrade_rows(arrays, self.manifest.bos_id)
        arrays = expand_positions(arrays, self.schema)
        if self.manifest.rule != "document":  # segment ids of concatenated rows (stored by earlier versions) say
            arrays.pop(SEGMENTS_FIELD, None)  # nothing the length does not
        return arrays

    def iter_shards(self, raw: bool = False):
        """Yield each shard's rows as numpy arrays (one shard in memory at a time); raw as in read_rows."""
        for s in self.shards:
            yield self.read_rows(s.first_row, s.first_row + s.rows, raw=raw)

    def take(self, rows) -> dict[str, np.ndarray]:
        """The given rows, in that order, as read_rows gives them (one row read at a time: any order, any shard)."""
        parts = [self.read_rows(r, r + 1) for r in rows]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

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
