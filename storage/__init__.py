"""The cache format (schema, backends, manifest, writer, reader) and the document packing both stages share.

Public API:
    open_cache(folder, verify="lazy") -> Cache     # validated, per-sequence tensors by index
    Cache.manifest / len(cache) / cache[i] / cache.verify() / cache.read_rows(a, b)
    CacheWriter(folder, fmt=..., schema=..., identity=...)  # shards, then finish(CacheMetadata, ...) writes the manifest
    register_backend(cls)                          # a storage backend (backends.Backend) beside zarr and arrow
    build_sequences(source, tokenizer, seq_len)    # the shared tokenize-and-pack path
This package knows nothing of transformers: the tokenizer is any object with `__call__`,
`eos_token_id` and `pad_token_id`.
"""
from .backends import FORMATS, CorruptShardError, register_backend
from .documents import Documents, read_documents
from .manifest import CacheMetadata, ManifestError, load_manifest
from .packing import Packed, build_sequences, encode_documents, pack
from .reader import Cache, open_cache
from .schema import SCHEMA_VERSION, Field, cache_schema, id_dtype
from .writer import CacheWriter

__all__ = [
    "FORMATS", "SCHEMA_VERSION", "Cache", "CacheMetadata", "CacheWriter", "CorruptShardError", "Documents", "Field", "ManifestError",
    "Packed", "build_sequences", "cache_schema", "encode_documents", "id_dtype", "load_manifest", "open_cache", "pack",
    "read_documents", "register_backend",
]
