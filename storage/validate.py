"""A cache is untrusted input. The manifest carries its own sha256, which catches accidents (a flipped byte, a
hand edit) but not intent: anyone can edit a manifest and recompute it. So everything a manifest says is checked
before it is used, and nothing it names is opened unless it is a plain member of the cache folder:

- `read_manifest_json`: the manifest file is a regular file of at most MAX_MANIFEST_BYTES, valid UTF-8 JSON
  without NaN/Infinity, nested at most MAX_DEPTH deep (no RecursionError from a hostile nesting).
- `validate_manifest`: every key the readers use has the type and range this version writes; the schema is
  exactly the fields `cache_schema` declares for the manifest's vocab_size, top_k, seq_len and log-prob
  storage; q8 parameters are in range; shard names are the ones the backend registry gives shard i; row
  counts add up (first_row contiguous from 0, sum of rows == num_sequences, ...).
- `member_path` (and backends.shard_files): a file the manifest names resolves (symlinks included) inside the
  cache folder and is a regular file, or a folder holding only regular files and folders (no symlink, FIFO,
  socket or device anywhere). The reader checks sizes before anything is read, hashes before anything is parsed.

Every error names the manifest (or the file) and the key, and never echoes the size or content of a file
outside the cache folder.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from mft_cache.provenance import COUNTS as PROVENANCE_COUNTS, FORMAT as PROVENANCE_FORMAT
from mft_cache.provenance import MAX_TEXT as PROVENANCE_MAX_TEXT, NUMBERS as PROVENANCE_NUMBERS
from mft_cache.provenance import TEXT as PROVENANCE_TEXT

from .backends import BACKENDS, CorruptShardError, shard_name
from .encoding import Q8, Q8_LEVELS
from .schema import (ENCODINGS, LOGPROB_DTYPES, POSITION, READABLE_SCHEMA_VERSIONS, SEGMENTS_FIELD,
                     SCHEMA_VERSION, cache_schema, legacy_schema, schema_version_of)

MAX_MANIFEST_BYTES = 64 * 2**20  # a shard entry is ~200 bytes: room for 300k shards, and never a flood of memory
MAX_DEPTH = 32  # our manifests nest 4 deep (manifest > schema > field > encoding); 32 leaves room, not a stack overflow
MAX_VOCAB = 2**32  # every id fits uint32 (id_dtype); a larger vocabulary is no teacher's, only a way to force uint64 ids
MAX_SEQ_LEN = 2**24  # 16M tokens a row: far beyond any context length, small enough that shapes stay int64-safe
MAX_Q8_GAP = 64.0  # nats: e^-64 is 1.6e-28, below float32's resolution next to any probability that matters
DOCUMENTS = "documents.npy"  # the one auxiliary file; data.documents_file.name may hold nothing else
NPY_HEADER_MAX = 4096  # np.save writes a 128-byte header for a 1-D array; 4 KiB is generous
LONG_ROWS = ("drop", "truncate", "refuse")  # data.long_rows.policy: rows/long_rows.py (storage imports no rows)
MAX_LONG_ROWS_FIRST = 100  # indices in data.long_rows.first_*: this version keeps 5, a later one may keep more
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ABSENT = object()


class ManifestError(ValueError):
    """The manifest is missing, unreadable, of another version, altered, or describes an impossible cache.
    (Declared here, where manifests are checked; storage.manifest re-exports it.)"""


# -- reading the file ------------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (JSON has no NaN or Infinity)")


def json_depth(obj) -> int:
    """How deep lists and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:  # no need to walk further: it is refused
            return deepest
        stack.extend((c, depth + 1) for c in children)
    return deepest


def read_manifest_json(path: Path, max_bytes: int = MAX_MANIFEST_BYTES):
    """The parsed manifest file. It must be a regular file of at most `max_bytes` (opened without blocking, so a
    FIFO or a device never hangs or floods the reader), strict JSON, nested at most MAX_DEPTH deep.

    Raises ManifestError naming `path`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ManifestError(f"{path} cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise ManifestError(f"{path} is larger than {max_bytes} bytes: not a manifest this code writes")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ManifestError(f"{path} is larger than {max_bytes} bytes: not a manifest this code writes")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ManifestError(f"{path} is not a manifest: its JSON nests too deep to read") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, NaN, ints of more than 4300 digits
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if json_depth(value) > MAX_DEPTH:
        raise ManifestError(f"{path} is not a manifest: its JSON nests more than {MAX_DEPTH} deep")
    return value


# -- typed access to the manifest --------------------------------------------------------------------------------
def _what(value) -> str:
    """A value's JSON type, and the value itself when short, for an error message."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else ""
    return f"{kind} {text}" if text and len(text) <= 40 else kind


class _Object:
    """One JSON object of the manifest, read key by key: each getter checks a type and a range and raises
    ManifestError naming the manifest and the dotted key (e.g. `shards[3].first_row`)."""

    def __init__(self, path: Path, value, key: str):
        self.path, self.prefix = path, f"{key}." if key else ""
        if not isinstance(value, dict):
            self.fail(key, f"must be an object, got {_what(value)}", prefix="")
        self.value = value

    def fail(self, key: str, why: str, prefix: str | None = None):
        raise ManifestError(f"{self.path}: key {(self.prefix if prefix is None else prefix) + key!r} {why}")

    def raw(self, key: str, required: bool):
        value = self.value.get(key, _ABSENT)
        if value is _ABSENT and required:
            self.fail(key, "is missing")
        return value

    def int(self, key: str, lo: int, hi: int, *, required: bool = True, nullable: bool = False):
        """An integer in [lo, hi] (booleans are not integers here)."""
        value = self.raw(key, required)
        if value is _ABSENT or (value is None and nullable):
            return None
        if type(value) is not int or not lo <= value <= hi:
            self.fail(key, f"must be an integer in [{lo}, {hi}]{' or null' if nullable else ''}, got {_what(value)}")
        return value

    def number(self, key: str, lo: float, hi: float, *, required: bool = True, nullable: bool = False):
        """A finite number in [lo, hi]."""
        value = self.raw(key, required)
        if value is _ABSENT or (value is None and nullable):
            return None
        if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
            self.fail(key, f"must be a finite number in [{lo}, {hi}]{' or null' if nullable else ''}, got {_what(value)}")
        return float(value)

    def str(self, key: str, *, required: bool = True, nullable: bool = False, choices: tuple | None = None):
        value = self.raw(key, required)
        if value is _ABSENT or (value is None and nullable):
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string{' or null' if nullable else ''}, got {_what(value)}")
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {list(choices)}, got {_what(value)}")
        return value

    def bool(self, key: str, *, required: bool = True, nullable: bool = False):
        value = self.raw(key, required)
        if value is _ABSENT or (value is None and nullable):
            return None
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false{' or null' if nullable else ''}, got {_what(value)}")
        return value

    def exact(self, key: str, expected: int, why: str) -> int:
        """An integer that must equal `expected` (a count the rest of the manifest fixes)."""
        value = self.int(key, 0, 2**62)
        if value != expected:
            self.fail(key, f"is {value}, expected {expected}: {why}")
        return value

    def sha256(self, key: str):
        value = self.str(key)
        if not _SHA256.match(value):
            self.fail(key, "must be 64 lower-case hex digits (a sha256)")
        return value

    def obj(self, key: str, *, required: bool = True) -> _Object | None:
        value = self.raw(key, required)
        return None if value is _ABSENT else _Object(self.path, value, self.prefix + key)

    def list(self, key: str) -> list:
        value = self.raw(key, True)
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {_what(value)}")
        return value

    def strings(self, key: str, *, required: bool = True) -> None:
        """An object whose values are all strings (the manifest's prose: values, ...)."""
        o = self.obj(key, required=required)
        for k in (o.value if o else ()):
            o.str(k)


# -- the schema --------------------------------------------------------------------------------------------------
def logprob_storage(schema: list, top: _Object) -> str:
    """How the stored `topk_logprobs` field says its log-probs are kept: "float16", "float32" or "q8"."""
    field = next((f for f in schema if isinstance(f, dict) and f.get("name") == "topk_logprobs"), None)
    if field is None:
        top.fail("schema", "lacks the field 'topk_logprobs'")
    encoding = field.get("encoding")
    if encoding is not None:
        name = encoding.get("name") if isinstance(encoding, dict) else encoding
        if name not in ENCODINGS:
            top.fail("schema", f"field 'topk_logprobs' has the unknown encoding {repr(name)[:40]} (this mft-cache decodes "
                     f"{ENCODINGS}); use the mft-cache version that wrote it")
        return name
    dtype = field.get("dtype")
    if dtype not in LOGPROB_DTYPES or dtype == Q8:
        top.fail("schema", f"field 'topk_logprobs' has dtype {_what(dtype)}; stored log-probs are float16 or float32 "
                 "(or uint8 with the q8 encoding)")
    return dtype


def check_q8_encoding(enc: _Object, *, top1_field: str) -> None:
    """q8 parameters a decoder can trust: gap_max a finite number in (0, MAX_Q8_GAP], levels 255, scale equal to
    levels / sqrt(gap_max) (to float precision), the top-1 field the schema holds, float32 decoded values."""
    enc.str("name", choices=(Q8,))
    gap_max = enc.raw("gap_max", True)
    if type(gap_max) not in (int, float) or not (math.isfinite(gap_max) and 0 < gap_max <= MAX_Q8_GAP):
        enc.fail("gap_max", f"must be a finite number in (0, {MAX_Q8_GAP:g}], got {_what(gap_max)}")
    enc.int("levels", Q8_LEVELS, Q8_LEVELS)
    scale = enc.number("scale", 0.0, math.inf)
    if not math.isclose(scale, Q8_LEVELS / math.sqrt(gap_max), rel_tol=1e-9):
        enc.fail("scale", f"must be levels / sqrt(gap_max) = {Q8_LEVELS / math.sqrt(gap_max)!r}, got {scale!r}")
    enc.str("top1_field", choices=(top1_field,))
    enc.str("decoded_dtype", choices=("float32",))
    for k in ("stored", "decode", "error_bound"):
        enc.str(k, required=False)


def check_schema(top: _Object, *, vocab_size: int, top_k: int, seq_len: int) -> None:
    """The stored fields must be exactly those `cache_schema` (schema version 3, with or without segment_ids) or
    `legacy_schema` (versions 1 and 2) declares for this vocabulary, k, sequence length and log-prob storage, in
    order (name, dtype, shape; docs are prose), and only `topk_logprobs` may be encoded."""
    items = top.list("schema")
    fields = [_Object(top.path, item, f"schema[{i}]") for i, item in enumerate(items)]
    for f in fields:
        f.str("name"), f.str("dtype"), f.list("shape"), f.str("doc", required=False)
        f.str("axis", required=False, choices=("row", POSITION))
        for j, n in enumerate(f.value["shape"]):
            if type(n) is not int or n < 0:
                f.fail("shape", f"must be a list of non-negative integers, got {_what(n)} at position {j}")
    storage = logprob_storage(items, top)
    version = top.value["schema_version"]
    if version != schema_version_of(items):
        top.fail("schema_version", f"is {version}, which does not match its fields (encoded fields need version 2, "
                 "fields per trained position version 3)")
    if version == SCHEMA_VERSION:
        segments = any(isinstance(d, dict) and d.get("name") == SEGMENTS_FIELD for d in items)
        expected = cache_schema(vocab_size=vocab_size, top_k=top_k, seq_len=seq_len, logprob_dtype=storage,
                                segments=segments)
    else:
        expected = legacy_schema(vocab_size=vocab_size, top_k=top_k, seq_len=seq_len, logprob_dtype=storage)
    got = [(f.value["name"], f.value["dtype"], tuple(f.value["shape"]), f.value.get("axis", "row")) for f in fields]
    want = [(e.name, e.dtype, e.shape, e.axis) for e in expected]
    if got != want:
        i = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        seen = f"{got[i][0]!r} {got[i][1]} {list(got[i][2])} per {got[i][3]}" if i < len(got) else "nothing"
        wanted = f"{want[i][0]!r} {want[i][1]} {list(want[i][2])} per {want[i][3]}" if i < len(want) else "nothing"
        top.fail(f"schema[{i}]" if i < len(got) else "schema",
                 f"is {seen}; a cache of vocab_size {vocab_size}, top_k {top_k}, seq_len {seq_len} with {storage} "
                 f"log-probs holds {wanted} there")
    for f, e in zip(fields, expected):
        encoding = f.value.get("encoding")
        if e.encoding is None:
            if encoding is not None:
                f.fail("encoding", f"must be absent: field {e.name!r} is stored as it is")
        else:
            check_q8_encoding(f.obj("encoding"), top1_field="top1_logprob")


# -- shards and counts -------------------------------------------------------------------------------------------
def check_shards(top: _Object, *, fmt: str, seq_len: int) -> None:
    """Each shard's name is the one the registry gives shard i (so never a path), rows are contiguous from row 0
    and add up to num_sequences, and the counts derived from them are possible."""
    shards = [_Object(top.path, s, f"shards[{i}]") for i, s in enumerate(top.list("shards"))]
    first = 0
    for i, s in enumerate(shards):
        name = s.str("name")
        if name != shard_name(i, fmt):
            s.fail("name", f"is {_what(name)}: shard {i} of a {fmt} cache is named {shard_name(i, fmt)!r} (a shard "
                   "name is fixed by its position and format, so it can never point outside the cache folder)")
        rows = s.int("rows", 1, 2**40)
        s.exact("first_row", first, "shards hold consecutive rows from row 0 (first_row = previous first_row + rows)")
        s.int("bytes", 0, 2**62)
        s.sha256("sha256")
        first += rows
    num_sequences = top.exact("num_sequences", first, "the sum of the shards' rows")
    top.int("num_tokens", 0, num_sequences * (seq_len - 1))
    top.int("num_input_tokens", 0, num_sequences * seq_len, required=False)
    per_shard = top.int("rows_per_shard", 1, 2**40, required=False)
    if per_shard is not None:
        for s in shards[:-1]:
            s.exact("rows", per_shard, "every shard but the last holds rows_per_shard rows")
        if shards:
            shards[-1].int("rows", 1, per_shard)
    if "shard_bytes" in top.value:
        top.exact("shard_bytes", sum(s.value["bytes"] for s in shards), "the sum of the shards' bytes")
    top.number("bytes_per_token", 0.0, math.inf, nullable=True)


def check_trained_from(record: _Object | None) -> None:
    """model.trained_from (mft_cache.provenance): its format, and each key it may hold of its type and bounds."""
    if record is None:
        return
    record.int("format", PROVENANCE_FORMAT, PROVENANCE_FORMAT)
    for k in PROVENANCE_TEXT:
        if len(record.str(k, required=False, nullable=True) or "") > PROVENANCE_MAX_TEXT:
            record.fail(k, f"is longer than {PROVENANCE_MAX_TEXT} characters")
    for k in PROVENANCE_NUMBERS:
        record.number(k, 0.0, math.inf, required=False, nullable=True)
    for k in PROVENANCE_COUNTS:
        record.int(k, 0, 2**53, required=False, nullable=True)


def check_long_rows(record: _Object | None) -> None:
    """data.long_rows (rows/long_rows.py): the policy, the counts of documents dropped and cut, and the indices of the
    first of each: at most MAX_LONG_ROWS_FIRST of them, no more than their count, increasing; a policy never drops
    or cuts what it does not (refuse: nothing; drop: nothing is cut)."""
    if record is None:
        return
    policy = record.str("policy", choices=LONG_ROWS)
    for count, first in (("dropped", "first_dropped"), ("truncated", "first_truncated")):
        n = record.int(count, 0, 2**40)
        if n and policy == "refuse":
            record.fail(count, f"is {n}, but --long-rows refuse leaves no document out and cuts none")
        if n and policy == "drop" and count == "truncated":
            record.fail(count, f"is {n}, but --long-rows drop cuts no document")
        items = record.list(first)
        if len(items) > min(n, MAX_LONG_ROWS_FIRST):
            record.fail(first, f"holds {len(items)} indices; at most {min(n, MAX_LONG_ROWS_FIRST)} (its count "
                        f"{count} is {n}, and at most {MAX_LONG_ROWS_FIRST} are kept)")
        previous = -1
        for i, index in enumerate(items):
            if type(index) is not int or not previous < index <= 2**40:
                record.fail(f"{first}[{i}]", f"must be a document index in [{previous + 1}, {2**40}] (increasing), got "
                            f"{_what(index)}")
            previous = index


def check_documents(data: _Object) -> None:
    """`data`: what the trainer reads (source, split, fingerprint) as strings where present (a storage-only writer
    may leave `data` empty), the counts as counts, long_rows (check_long_rows) where present, and documents.npy named
    exactly so, of at most the size np.save gives for num_documents + 1 int64 offsets."""
    for k in ("source", "split", "text_field", "fingerprint", "documents_note", "prompt_field", "completion_field",
              "chat_template_fingerprint"):
        data.str(k, required=False)
    data.str("format", required=False, choices=("text", "chat", "prompt-completion"))
    data.str("train_on", required=False, choices=("completion", "all"))
    num_documents = data.int("num_documents", 0, 2**40, required=False)
    data.int("num_empty_skipped", 0, 2**40, required=False)
    check_long_rows(data.obj("long_rows", required=False))
    docs = data.obj("documents_file", required=False)
    if docs is None:
        return
    docs.str("name", choices=(DOCUMENTS,))
    docs.sha256("sha256")
    limit = 2**62 if num_documents is None else NPY_HEADER_MAX + 8 * (num_documents + 1)
    docs.int("bytes", 0, limit)


def validate_manifest(manifest: dict, path: Path) -> None:
    """Check every key this version reads against the types and ranges it writes (see the module docstring).

    Args:
        manifest: the parsed manifest (format_name and schema_version already known good).
        path: the manifest file, for messages.
    Raises:
        ManifestError naming `path` and the key.
    """
    top = _Object(path, manifest, "")
    top.int("schema_version", min(READABLE_SCHEMA_VERSIONS), max(READABLE_SCHEMA_VERSIONS))
    top.sha256("manifest_sha256")
    fmt = top.str("format")
    if fmt not in BACKENDS:
        top.fail("format", f"is the unknown format {_what(fmt)} (known: {tuple(BACKENDS)}); register its backend "
                 "before opening the cache")
    vocab_size = top.int("vocab_size", 1, MAX_VOCAB)
    top_k = top.int("top_k", 1, vocab_size)
    seq_len = top.int("seq_len", 2, MAX_SEQ_LEN)
    check_schema(top, vocab_size=vocab_size, top_k=top_k, seq_len=seq_len)
    top.strings("values")
    model = top.obj("model")
    model.str("id")
    for k in ("path", "architecture", "config_fingerprint", "weights_fingerprint", "dtype"):
        model.str(k, required=False, nullable=True)
    model.bool("tied_embeddings", required=False, nullable=True)
    check_trained_from(model.obj("trained_from", required=False))
    tokenizer = top.obj("tokenizer")  # a storage-only writer (bench/storage_io.py) may leave it empty
    tokenizer.str("fingerprint", required=False), tokenizer.str("class", required=False)
    tokenizer.int("bos_token_id", 0, MAX_VOCAB, required=False, nullable=True)
    tokenizer.int("eos_token_id", 0, MAX_VOCAB, required=False, nullable=True)
    check_documents(top.obj("data"))
    packing = top.obj("packing", required=False)
    if packing is not None:
        rule = packing.str("rule", choices=("concat", "bos-per-row", "document"))
        packing.int("bos_token_id", 0, vocab_size - 1, nullable=rule != "bos-per-row")
        segments = any(isinstance(d, dict) and d.get("name") == SEGMENTS_FIELD for d in top.value["schema"])
        if rule == "document" and not segments:
            packing.fail("rule", f"is {rule!r}, which a cache without segment_ids cannot hold (documents packed whole "
                         "say which document each token belongs to; schema version 3)")
        if rule == "bos-per-row" and segments:
            packing.fail("rule", f"is {rule!r}, which a cache of documents packed whole (segment_ids) cannot hold")
        packing.str("description", required=False)
    top.obj("config")
    top.obj("created_by", required=False)
    top.int("num_processes", 1, 2**20, required=False)
    check_shards(top, fmt=fmt, seq_len=seq_len)


# -- files the manifest names ------------------------------------------------------------------------------------
def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def member_path(folder: Path, name: str) -> Path:
    """`folder/name`, resolved, once it is sure to be a plain member of the cache folder: `name` is one path
    component (no separator, not `..`), the path resolves (symlinks followed) inside the folder, and what it
    resolves to is a regular file or a folder. Only lstat/stat: nothing is opened.

    Returns the resolved path. Raises CorruptShardError naming `folder/name` (never the outside target).
    """
    path = Path(folder) / name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        raise CorruptShardError(path, "is not a plain file name inside the cache folder")
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise CorruptShardError(path, "missing") from None
    except OSError as e:
        raise CorruptShardError(path, f"cannot be examined ({e.strerror})") from None
    resolved = os.path.realpath(path)
    if not _inside(resolved, os.path.realpath(folder)):
        raise CorruptShardError(path, "is a symbolic link that leads outside the cache folder")
    try:
        mode = os.stat(resolved).st_mode
    except OSError:
        raise CorruptShardError(path, "is a broken symbolic link") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CorruptShardError(path, "is not a regular file or folder (a FIFO, socket or device)")
    return Path(resolved)
