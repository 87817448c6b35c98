"""Documents into rows, the same for both stages: reading sources (documents.py), rendering chat and prompt-completion
rows (chat.py), packing by concatenation (packing.py) or whole documents (doc_packing.py; a text document longer
than a row in windows, windows.py), and streaming them to disk for a cache build (ingest.py). spec.py is the entry
point: `spec_for(source, ...)` says how a source becomes rows, `stream_batches(stream, tokenizer, spec)` gives them
as they complete and `build_rows(source, tokenizer, spec)` holds them in memory. This package knows nothing of the
cache format.
"""
from .documents import DATA_FORMATS, DocumentError, Documents, DocumentStream, data_fingerprint, read_documents
from .long_rows import DEFAULT_LONG_ROWS, LONG_ROWS
from .packing import Packed, bos_rule, build_sequences, encode_documents, pack
from .spec import PACKINGS, RowSpec, build_rows, resolve_spec, spec_for, stream_batches

__all__ = [
    "DATA_FORMATS", "DEFAULT_LONG_ROWS", "LONG_ROWS", "PACKINGS", "DocumentError", "DocumentStream", "Documents",
    "Packed", "RowSpec",
    "bos_rule", "build_rows", "build_sequences", "data_fingerprint", "encode_documents", "pack", "read_documents",
    "resolve_spec", "spec_for", "stream_batches",
]
