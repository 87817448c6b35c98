"""`manifest.json`: the contract between the two stages, written last. Its keys are declared here:
`build_manifest` assembles it from what the writer wrote and the metadata the writing stage gives
(`CacheMetadata`); `load_manifest` reads and checks it. docs/FORMAT.md describes every key.

The manifest carries its own sha256 (over its canonical JSON without that key), so a hand-edited
manifest is detected like a corrupted shard.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .schema import FORMAT_NAME, READABLE_SCHEMA_VERSIONS, Field, layout_of, schema_version_of, value_semantics
from .validate import DOCUMENTS, ManifestError, read_manifest_json, validate_manifest

MANIFEST = "manifest.json"
REQUIRED_KEYS = (
    "format_name", "schema_version", "format", "values", "schema", "model", "tokenizer", "vocab_size",
    "top_k", "seq_len", "data", "config", "shards", "num_sequences", "num_tokens", "bytes_per_token",
)


DOCUMENTS_NOTE = ("documents.npy: int64 start offset of each document in the packed token stream (see packing for "
                  "how rows are cut from it), then the total")


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
    packing: dict  # storage.packing.packing_description
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
        "values": value_semantics(manifest.pop("logprob_dtype"), layout_of(schema)),
        "schema": [f.to_json() for f in schema],
        "data": {"documents_note": DOCUMENTS_NOTE, **meta.data, "documents_file": documents_file},
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


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON under a temporary name, fsync, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_manifest(folder: Path, manifest: dict) -> dict:
    """Stamp the format name, the schema version (2 once a field is encoded, see schema.py) and the
    manifest's own sha256, then write it atomically."""
    manifest = {**manifest, "format_name": FORMAT_NAME, "schema_version": schema_version_of(manifest.get("schema", []))}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def load_manifest(folder: Path) -> dict:
    """Read and validate `folder/manifest.json`; raise ManifestError naming the problem.

    The manifest is untrusted input (anyone can edit it and recompute its sha256): after the checks of format,
    version and self-checksum, validate.validate_manifest checks every key this version reads (types, ranges,
    the schema against cache_schema, shard names and row counts). See storage/validate.py.
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
    validate_manifest(manifest, path)
    return manifest
