"""`manifest.json`: the contract between the two stages, written last. Its keys are declared here:
`build_manifest` assembles it from what the writer wrote and the metadata the writing stage gives
(`CacheMetadata`); `load_manifest` reads and checks it into a `Manifest`, which every reader uses (attributes, never
dict lookups). docs/FORMAT.md describes every key.

The manifest carries its own sha256 (over its canonical JSON without that key), so a hand-edited
manifest is detected like a corrupted shard.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from mft_cache.files import write_json_atomic
from mft_cache.masks import BOS_PER_ROW, CONCAT

from .schema import (FORMAT_NAME, READABLE_SCHEMA_VERSIONS, Field, schema_from_json, schema_version_of,
                     value_semantics)
from .validate import ManifestError, read_manifest_json, validate_manifest

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileRecord:
    """A file of the cache folder: its name there, its size in bytes and its sha256."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Shard(FileRecord):
    """One shard: a FileRecord holding `rows` rows, from row `first_row` of the cache."""

    rows: int
    first_row: int


@dataclass(frozen=True)
class ModelInfo:
    """The teacher: its id (hub id or folder), local folder, architecture, fingerprints and the dtype of its pass."""

    id: str
    path: str | None = None
    architecture: str | None = None
    config_fingerprint: str | None = None
    weights_fingerprint: str | None = None
    dtype: str | None = None
    tied_embeddings: bool | None = None
    trained_from: dict | None = None  # the teacher folder's mft_checkpoint.json (mft_cache.provenance), if it had one


@dataclass(frozen=True)
class TokenizerInfo:
    """The teacher's tokenizer: its fingerprint, class name and special ids (a storage-only writer may give none)."""

    fingerprint: str | None = None
    class_name: str | None = None  # the manifest's key "class"
    bos_token_id: int | None = None
    eos_token_id: int | None = None


@dataclass(frozen=True)
class DataInfo:
    """The documents the rows were made from, and how: source, split, field names, fingerprint, row format, what is
    trained, counts, documents.npy (each document's offset) and what became of documents longer than a row."""

    source: str | None = None
    split: str | None = None
    text_field: str | None = None
    fingerprint: str | None = None
    format: str = "text"
    train_on: str = "all"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    chat_template_fingerprint: str | None = None
    documents_note: str | None = None
    num_documents: int | None = None
    num_empty_skipped: int | None = None
    documents_file: FileRecord | None = None
    long_rows: dict | None = None  # documents packed whole: what became of those longer than a row (policy, counts)


@dataclass(frozen=True)
class Packing:
    """The rule that formed the rows: "concat", "bos-per-row" (every row starts with `bos_token_id`) or "document"
    (documents packed whole)."""

    rule: str = CONCAT
    bos_token_id: int | None = None
    description: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A cache's manifest.json, validated. `from_json` is the only constructor readers use: it checks every key
    (validate.py) and raises ManifestError naming the key; `to_json()` gives the file's content as it was read."""

    format: str
    schema_version: int
    schema: tuple[Field, ...]
    vocab_size: int
    top_k: int
    seq_len: int
    model: ModelInfo
    tokenizer: TokenizerInfo
    data: DataInfo
    shards: tuple[Shard, ...]
    num_sequences: int
    num_tokens: int  # trained positions (tokens with a next-token label)
    bytes_per_token: float | None
    config: dict  # the build's identity: everything that determined the cache's content
    values: dict  # what the stored values mean, in words
    manifest_sha256: str
    packing: Packing | None = None  # None: a cache made before rows started with BOS (rule "concat")
    num_input_tokens: int | None = None
    rows_per_shard: int | None = None
    shard_bytes: int | None = None
    num_processes: int = 1
    created_by: dict | None = None
    _json: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rule(self) -> str:
        """How the rows were packed: "concat", "bos-per-row" or "document"."""
        return self.packing.rule if self.packing is not None else CONCAT

    @property
    def bos_id(self) -> int | None:
        """The BOS every row starts with (rule "bos-per-row"), or None."""
        return self.packing.bos_token_id if self.rule == BOS_PER_ROW else None

    def to_json(self) -> dict:
        """A copy of the manifest's JSON as it was read."""
        return copy.deepcopy(self._json)

    @classmethod
    def from_json(cls, obj, path: Path) -> Manifest:
        """The typed manifest of a parsed manifest.json (format_name and schema_version already known good); raises
        ManifestError naming `path` and the key of the first problem (validate.validate_manifest). Keeps `obj` as
        its JSON (to_json gives copies): the caller hands it over, and a manifest can be tens of MB."""
        validate_manifest(obj, path)
        data = dict(obj["data"])
        docs = data.pop("documents_file", None)
        tokenizer = dict(obj["tokenizer"])
        class_name = tokenizer.pop("class", None)
        return cls(
            format=obj["format"], schema_version=obj["schema_version"], schema=schema_from_json(obj["schema"]),
            vocab_size=obj["vocab_size"], top_k=obj["top_k"], seq_len=obj["seq_len"],
            model=_build(ModelInfo, obj["model"]), tokenizer=_build(TokenizerInfo, tokenizer, class_name=class_name),
            data=_build(DataInfo, data, documents_file=_build(FileRecord, docs) if docs else None),
            shards=tuple(_build(Shard, s) for s in obj["shards"]), num_sequences=obj["num_sequences"],
            num_tokens=obj["num_tokens"], bytes_per_token=obj["bytes_per_token"], config=copy.deepcopy(obj["config"]),
            values=dict(obj["values"]), manifest_sha256=obj["manifest_sha256"],
            packing=_build(Packing, obj["packing"]) if obj.get("packing") else None,
            num_input_tokens=obj.get("num_input_tokens"), rows_per_shard=obj.get("rows_per_shard"),
            shard_bytes=obj.get("shard_bytes"), num_processes=obj.get("num_processes", 1),
            created_by=copy.deepcopy(obj.get("created_by")), _json=obj)


def _build(cls, obj: dict, **extra):
    """An instance of the dataclass `cls` from a validated JSON object: its known keys (others are prose a later
    version may add, kept in the manifest's JSON), with `extra` on top; absent keys take their defaults."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in obj.items() if k in names}, **extra)


# the keys every manifest holds: the format name, and the typed manifest's fields without a default (its own sha256
# is checked on its own: a manifest without it "was modified after it was written")
REQUIRED_KEYS = ("format_name", *(f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING
                                  and f.name != "manifest_sha256"))


@dataclass(frozen=True)
class CacheMetadata:
    """What the stage that computed a cache knows about it; the writer adds what it wrote (format, schema,
    shards, sizes, documents.npy) and the build's identity."""

    model: dict  # id, path, architecture, fingerprints of config and weights, dtype
    tokenizer: dict  # fingerprint, class, bos_token_id, eos_token_id
    vocab_size: int
    top_k: int
    seq_len: int
    logprob_dtype: str
    data: dict  # source, text_field, split, fingerprint, num_documents, num_empty_skipped (chat and instruction
    #             data also: format, train_on, chat_template_fingerprint, prompt_field, completion_field, documents_note)
    packing: dict  # rule, bos_token_id, description (the rows' packing: docs/FORMAT.md)
    num_sequences: int
    num_tokens: int  # trained positions (tokens with a next-token label)
    num_input_tokens: int
    rows_per_shard: int
    num_processes: int  # of the run that finished the cache; not part of its identity
    created_by: dict  # versions


def build_manifest(meta: CacheMetadata, *, fmt: str, schema: tuple[Field, ...], identity: dict, shards: list[dict],
                   documents_file: dict) -> dict:
    """Every key of the manifest but the stamps save_manifest adds (format_name, schema_version, manifest_sha256)."""
    manifest = asdict(meta)
    total = sum(s["bytes"] for s in shards)
    manifest.update({
        "values": value_semantics(manifest.pop("logprob_dtype"), schema),
        "schema": [f.to_json() for f in schema],
        "data": {**meta.data, "documents_file": documents_file},
        "format": fmt,
        "config": identity,
        "shards": shards,
        "shard_bytes": total,
        "bytes_per_token": round(total / meta.num_tokens, 3) if meta.num_tokens else None,
    })
    missing = [k for k in REQUIRED_KEYS if k not in manifest and k not in ("format_name", "schema_version")]
    assert not missing, f"build_manifest lacks {missing}"
    return manifest


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


def save_manifest(folder: Path, manifest: dict) -> dict:
    """Stamp the format name, the schema version (2 once a field is encoded, see schema.py) and the
    manifest's own sha256, then write it atomically; return what was written."""
    manifest = {**manifest, "format_name": FORMAT_NAME, "schema_version": schema_version_of(manifest.get("schema", []))}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def load_manifest(folder: Path) -> Manifest:
    """Read and validate `folder/manifest.json` into a Manifest; raise ManifestError naming the problem.

    The manifest is untrusted input (anyone can edit it and recompute its sha256): after the checks of format,
    version and self-checksum, Manifest.from_json checks every key this version reads (types, ranges, the schema
    against cache_schema, shard names and row counts; storage/validate.py).
    """
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"cache folder {folder} does not exist")
    if not os.path.lexists(path):
        raise ManifestError(f"{path} not found: {folder} is not a finished mft-cache (unfinished or not a cache)")
    manifest = read_manifest_json(path)
    if not isinstance(manifest, dict) or manifest.get("format_name") != FORMAT_NAME:
        raise ManifestError(f"{path} is not an mft-cache manifest (format_name != {FORMAT_NAME!r})")
    version = manifest.get("schema_version")
    if type(version) is not int or version not in READABLE_SCHEMA_VERSIONS:
        raise ManifestError(
            f"{path}: unknown schema_version {version!r}; this mft-cache reads schema versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}. "
            "Rebuild the cache with this version, or use the mft-cache version that wrote it."
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest and k not in ("format_name", "schema_version")]
    if missing:
        raise ManifestError(f"{path} lacks required keys {missing}")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ManifestError(f"{path} was modified after it was written (manifest_sha256 does not match its content)")
    return Manifest.from_json(manifest, path)
