"""The cache format: schema, encodings, backends, manifest, writer, reader and validation.

Public API:
    open_cache(folder, verify="lazy") -> Cache     # validated, per-sequence tensors by index
    Cache.manifest (a typed Manifest) / len(cache) / cache[i] / cache.verify() / cache.read_rows(a, b)
    CacheWriter(folder, fmt=..., schema=..., identity=...)  # shards, then finish(CacheMetadata, ...) writes the manifest
    store_rows(arrays, schema)                     # rows given at every position -> the fields a shard stores
    register_backend(cls)                          # a storage backend (backends.Backend) beside zarr and arrow
This package knows nothing of transformers, of documents or of how rows are made (that is mft_cache.rows).
"""
from .backends import FORMATS, CorruptShardError, register_backend
from .manifest import CacheMetadata, Manifest, ManifestError, load_manifest
from .reader import Cache, open_cache
from .schema import SCHEMA_VERSION, Field, cache_schema, id_dtype, store_rows
from .writer import CacheWriter

__all__ = [
    "FORMATS", "SCHEMA_VERSION", "Cache", "CacheMetadata", "CacheWriter", "CorruptShardError", "Field", "Manifest",
    "ManifestError",
    "cache_schema", "id_dtype", "load_manifest", "open_cache", "register_backend", "store_rows",
]
