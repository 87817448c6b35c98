"""Writing a cache folder: shards under temporary names, then renamed; the manifest last.

Folder life cycle:
- new: created with `.mft-cache-progress.json` (the build's identity: the resolved configuration; and the schema
  of its shards, so that a build is resumed only by a writer of the same schema).
- each shard: written to `.shard-NNNNN<suffix>.tmp-PID`, fsynced and checksummed; its record
  `.shard-NNNNN.json` is written; then the data is renamed to `shard-NNNNN<suffix>`. A shard is
  done only if both its data and its record exist, so a crash at any point loses at most the shard
  being written.
- finish: the shard records are gathered into `manifest.json` (written last, atomically), then the
  progress file and the records are removed.
Re-running the same build resumes (only missing shards are computed); a finished cache is never
rebuilt unless `overwrite`; a folder holding anything else is refused. Files are removed (by `overwrite`, or
as the debris of an unfinished start) only when every name in the folder is one a writer makes and the folder is
shown to be a cache by a writer's own record (an mft-cache manifest, or the progress file); nothing else is
ever deleted. `.mft-lock` (mft_cache/folder_lock.py) is the lock `mft cache` holds on the folder while it builds.

Several processes (one build on N processes, possibly N machines sharing the folder): one of them
prepares the folder (`prepare=True`) and finishes it; the others attach with `prepare=False` once it
has, and each writes only its own shards. Every file a shard owns is named after its index, so
processes never write the same file.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from mft_cache.faults import fault_point
from mft_cache.files import OwnedFolder, remove_member, write_bytes_atomic, write_json_atomic
from mft_cache.folder_lock import LOCK_FILE

from .backends import checksum, get_backend, parse_shard_name, shard_name, size_on_disk
from .manifest import MANIFEST, CacheMetadata, Manifest, ManifestError, build_manifest, load_manifest, save_manifest
from .schema import FORMAT_NAME, Field
from .validate import DOCUMENTS

log = logging.getLogger(__name__)

PROGRESS = ".mft-cache-progress.json"
SHARD_SCHEMA = "shard_schema"  # the progress file's record of the fields its shards hold, beside the build's identity
# what a writer puts in a folder besides the shards themselves: the manifest, the progress file, documents.npy,
# shard records (.shard-NNNNN.json) and anything under a temporary name (.NAME.tmp-PID)
_OURS = re.compile(r"^(manifest\.json|\.mft-cache-progress\.json|documents\.npy|\.shard-\d{5}\.json|\..+\.tmp-\d+)$")
_PROGRESS_TMP = re.compile(r"^\.\.mft-cache-progress\.json\.tmp-\d+$")  # write_json_atomic's name for it


def is_ours(name: str, scratch: tuple[str, ...] = ()) -> bool:
    """Whether a file name in a cache folder is one a writer of a registered backend makes, one of the build's
    `scratch` files, or the folder's lock."""
    return name == LOCK_FILE or name in scratch or bool(_OURS.match(name)) or parse_shard_name(name) is not None


# identity keys added since caches were first written, with the value an identity without them meant
_IDENTITY_DEFAULTS = {"packing": "concat", "data_format": "text", "train_on": "all"}
# identity keys added since, that an identity without them matches whatever their value: a cache of documents packed
# whole built before --long-rows holds every document whole (a longer one was refused), as every policy gives it
_IDENTITY_ANY = ("long_rows",)


def _identity(recorded: dict, current: dict | None = None) -> dict:
    """A recorded identity with the keys added since filled in; those of _IDENTITY_ANY from `current`, the identity
    it is compared with."""
    out = {**_IDENTITY_DEFAULTS, **recorded}
    for key in _IDENTITY_ANY:
        if key not in recorded and current is not None and key in current:
            out[key] = current[key]
    return out


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _read_json(path: Path, quiet: bool = False) -> dict:
    """A JSON object from one of the writer's own files; a damaged one is a clear error (or {} when `quiet`)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if quiet:
            return {}
        raise ValueError(f"{path} is damaged ({e}); pass --overwrite to start the cache again") from None
    if not isinstance(obj, dict):
        if quiet:
            return {}
        raise ValueError(f"{path} is damaged (not a JSON object); pass --overwrite to start the cache again")
    return obj


class CacheWriter:
    """Owns one cache folder during a build. `state` is "new", "resume" or "complete".

    Args:
        folder: the cache folder (created if missing).
        fmt: a registered backend's name (backends.formats()).
        schema: the fields of a row.
        identity: everything that determines the cache's content (the resolved config); a folder
            holding a cache or an unfinished build of another identity is refused unless `overwrite`.
        overwrite: remove an existing cache (ours only; a folder with foreign files is always refused).
        prepare: check (and if needed wipe) the folder and set `state`. False: attach to a folder another
            process of the same build has prepared; `state` is None and only `write_shard` is meant to be used.
        scratch: names of the files a build keeps in the folder until it finishes (its ingested rows): ours, kept
            when the folder is prepared, removed by `finish`; a readable JSON `scratch[0]` shows the folder is a
            build's.
    """

    def __init__(self, folder: Path, *, fmt: str, schema: tuple[Field, ...], identity: dict, overwrite: bool = False,
                 prepare: bool = True, scratch: tuple[str, ...] = ()):
        self.backend = get_backend(fmt)
        self.scratch = tuple(scratch)
        self.folder = Path(folder)
        self.owned = OwnedFolder(self.folder, lambda name: is_ours(name, self.scratch))
        self.fmt, self.schema, self.identity = fmt, schema, identity
        self.state = self.prepare(overwrite) if prepare else None

    # -- folder state -------------------------------------------------------------------------
    def check_folder(self) -> list[str]:
        """The folder's names (the lock left out), once it is shown to be a folder this build may use: new or
        empty, or holding only a writer's files and a writer's own record (refused otherwise, nothing removed).
        Needs no identity: a build checks it before reading its data."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--out {self.folder} is a file, not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        names = self.owned.names()  # the lock left out: held by this build
        foreign = self.owned.foreign(names)
        if foreign:
            raise ValueError(
                f"--out {self.folder} holds files that are not part of an mft-cache (e.g. {foreign[:3]}); "
                "nothing was removed; choose an empty or new folder"
            )
        if names and not self._provably_a_cache(names):
            raise ValueError(
                f"--out {self.folder} holds files named like a cache's ({names[:3]}) but no readable mft-cache "
                f"manifest.json or {PROGRESS}: it cannot be shown to be a cache, so nothing was removed; "
                "remove them by hand or choose another folder"
            )
        return names

    def finished_identity(self) -> dict | None:
        """The identity of the finished cache in the folder (None where there is none); raises where its manifest
        is damaged."""
        if not (self.folder / MANIFEST).exists():
            return None
        try:
            return _identity(load_manifest(self.folder).config)
        except ManifestError as e:
            raise ValueError(f"--out {self.folder} holds a damaged cache ({e}); pass --overwrite to rebuild it") from e

    def prepare(self, overwrite: bool) -> str:
        """Refuse, wipe or resume the folder for `identity`: its state, "new", "resume" or "complete"."""
        names = self.check_folder()
        old = None if overwrite else self.finished_identity()
        if old is not None:
            old = _identity(old, self.identity)
            if old == _identity(self.identity):
                # leftovers of a run stopped inside finish(), after the manifest was written: progress file, shard
                # records, *.tmp-PID, ingested rows (all ours)
                self.owned.remove([n for n in names if n.startswith(".")])
                return "complete"
            raise ValueError(
                f"--out {self.folder} holds a finished cache built with another configuration "
                f"(differs in {_diff(old, _identity(self.identity))}); pass --overwrite to replace it, or choose "
                "another folder"
            )
        progress = self.folder / PROGRESS
        if progress.exists() and not overwrite and MANIFEST not in names:
            recorded = _read_json(progress)
            shard_fields = recorded.pop(SHARD_SCHEMA, None)
            old = _identity(recorded, self.identity)
            if old != _identity(self.identity):
                raise ValueError(
                    f"--out {self.folder} holds an unfinished cache built with another configuration "
                    f"(differs in {_diff(old, self.identity)}); rerun that command to finish it, or pass --overwrite"
                )
            if shard_fields == self._schema_json():
                self.owned.remove([n for n in names if ".tmp-" in n])  # debris of the interrupted run
                return "resume"
            log.info("the unfinished build in %s wrote shards of another schema (an earlier mft-cache): starting it "
                     "again", self.folder)
        names = [n for n in names if n not in self.scratch]  # this build's rows, ingested before the folder was prepared
        if names:
            log.info("removing %s in %s", "the cache (--overwrite)" if overwrite else "an unfinished start", self.folder)
            self.owned.remove(names)
        write_json_atomic(progress, {**self.identity, SHARD_SCHEMA: self._schema_json()})
        return "new"

    def _schema_json(self) -> list[dict]:
        return [f.to_json() for f in self.schema]

    def _provably_a_cache(self, names: list[str]) -> bool:
        """Whether the folder is shown to be a cache by a writer's own records: a manifest whose format_name is
        mft-cache (damaged or not), or the progress file of an unfinished build (or its temporary name, left by a
        build stopped as it started). Only then may files named like ours be removed."""
        if MANIFEST in names:
            manifest = _read_json(self.folder / MANIFEST, quiet=True)
            if manifest.get("format_name") == FORMAT_NAME:
                return True
        if PROGRESS in names and _read_json(self.folder / PROGRESS, quiet=True):
            return True
        if self.scratch and self.scratch[0] in names and _read_json(self.folder / self.scratch[0], quiet=True):
            # a build stopped while reading its data
            return True
        return any(_PROGRESS_TMP.match(n) for n in names)

    # -- shards -------------------------------------------------------------------------------
    def _record_path(self, index: int) -> Path:
        return self.folder / f".shard-{index:05d}.json"

    def done_shards(self) -> dict[int, dict]:
        """Shards already complete: index -> record (name, rows, sha256, bytes)."""
        done = {}
        for p in self.folder.glob(".shard-*.json"):
            index = int(p.name[7:12])
            record = json.loads(p.read_text())
            data = self.folder / record["name"]
            if data.exists() and size_on_disk(data) == record["bytes"]:
                done[index] = record
        return done

    def recorded_shards(self) -> list[int]:
        """Indices of the shards whose record exists (done or about to be renamed): a cheap progress count."""
        return [int(p.name[7:12]) for p in self.folder.glob(".shard-*.json")]

    def write_shard(self, index: int, arrays: dict) -> dict:
        """Write one shard (numpy arrays keyed by field name) atomically; return its record."""
        name = shard_name(index, self.fmt)
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        remove_member(tmp)
        self.backend.write(tmp, self.schema, arrays)
        record = {"name": name, "rows": int(arrays[self.schema[0].name].shape[0]), "sha256": checksum(tmp), "bytes": size_on_disk(tmp)}
        write_json_atomic(self._record_path(index), record)
        fault_point("cache:shard-write")
        remove_member(self.folder / name)
        os.replace(tmp, self.folder / name)
        return {**record, "index": index}

    def write_file(self, name: str, data: bytes) -> dict:
        """An auxiliary file (e.g. documents.npy), atomically; returns {name, sha256, bytes}."""
        write_bytes_atomic(self.folder / name, data)
        return {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def finish(self, meta: CacheMetadata, num_shards: int, doc_offsets) -> Manifest:
        """Write documents.npy, then manifest.json (last) from the shard records and `meta`; clean up (the scratch
        files too); return it. `doc_offsets` is the int64 offsets, or an object whose `write_documents(path)`
        writes them as a .npy file and returns {sha256, bytes} (ingested rows on disk)."""
        done = self.done_shards()
        missing = [i for i in range(num_shards) if i not in done]
        assert not missing, f"finish() with shards still missing: {missing[:10]}"
        shards, first = [], 0
        for i in range(num_shards):
            shards.append({**done[i], "first_row": first})
            first += done[i]["rows"]
        if hasattr(doc_offsets, "write_documents"):
            tmp = self.folder / f".{DOCUMENTS}.tmp-{os.getpid()}"
            documents_file = doc_offsets.write_documents(tmp)
            os.replace(tmp, self.folder / DOCUMENTS)
            documents_file["name"] = DOCUMENTS
        else:
            buf = io.BytesIO()
            np.save(buf, np.asarray(doc_offsets, dtype=np.int64), allow_pickle=False)
            documents_file = self.write_file(DOCUMENTS, buf.getvalue())
        written = save_manifest(self.folder, build_manifest(meta, fmt=self.fmt, schema=self.schema, identity=self.identity,
                                                            shards=shards, documents_file=documents_file))
        manifest = Manifest.from_json(written, self.folder / MANIFEST)  # what every reader will see: checked here too
        for i in range(num_shards):
            remove_member(self._record_path(i))
        for name in self.scratch:
            remove_member(self.folder / name)
        remove_member(self.folder / PROGRESS)
        return manifest
