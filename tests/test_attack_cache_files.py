"""A cache folder someone hands you is untrusted input. A manifest carries its own sha256, so anyone can edit it and
re-sign it; most cases here re-sign what they edit (shards and manifest, tests/helpers.py) so that only the reader's
own checks stand between the edit and training: files outside the cache folder, hangs, floods of memory, tracebacks,
and values that describe no distribution. A property-based test mutates manifests at random. Then the damage nobody
re-signed (flipped, truncated, missing or swapped shards, a hand-edited manifest), found by `mft inspect --verify`
and `mft train`; and no code path evaluates what it reads."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SMALL_CACHE, deadline, read_manifest, resign, rewrite_field, rewrite_shard, write_legacy_copy
from mft_cache.cli import main
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.storage import CorruptShardError, ManifestError, open_cache, store_rows
from mft_cache.storage.backends import BACKENDS, checksum, size_on_disk
from mft_cache.storage.reader import expand_positions
from mft_cache.storage.manifest import manifest_digest

SEQ, K = 32, 8
SECONDS = 20  # every check here takes well under a second: a hang fails the test instead of stalling the suite
SECRET = b"sentinel outside the cache: never read, never reported "
SECRET_SIZE = 7919  # an unusual size, so an error that reports it is recognised


# -- helpers ---------------------------------------------------------------------------------------------------
def release(fifo: Path) -> None:
    """Unblock anything still waiting to read a FIFO (a writer opens and closes it), so no thread outlives a test."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting
        pass


def bounded(call, fifo: Path, seconds: int = SECONDS) -> BaseException | None:
    """Run call() in a thread and return what it raised (None if nothing). If it is still blocked after `seconds`
    (opening a FIFO inside C code, which SIGALRM does not interrupt), release the FIFO so the thread ends, and fail."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 (handed to the test, which checks its type)
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        release(fifo)
        thread.join(seconds)
        pytest.fail(f"still blocked after {seconds} s: the FIFO was opened")
    return raised[0] if raised else None


@pytest.fixture(scope="module")
def built(llama, docs_jsonl, tmp_path_factory):
    """build(fmt, logprob_dtype) -> a finished cache folder of that kind, built once for the module; never modified."""
    made: dict[tuple[str, str], Path] = {}

    def build(fmt: str = "arrow", dtype: str = "float16") -> Path:
        if (fmt, dtype) not in made:
            out = tmp_path_factory.mktemp(f"hostile-{fmt}-{dtype}") / "cache"
            build_cache(CacheConfig(model=str(llama), data=str(docs_jsonl), out=str(out), seq_len=SEQ, top_k=K,
                                    format=fmt, logprob_dtype=dtype, shard_mb=0.05, batch_size=4))
            made[fmt, dtype] = out
        return made[fmt, dtype]

    return build


def fresh(built, tmp_path: Path, fmt: str = "arrow", dtype: str = "float16") -> Path:
    """A copy of a built cache to damage, at tmp_path/cache."""
    folder = tmp_path / "cache"
    shutil.copytree(built(fmt, dtype), folder)
    return folder


def sentinel(tmp_path: Path) -> Path:
    """A file beside the cache folder that no cache may reach."""
    path = tmp_path / "sentinel"
    path.write_bytes((SECRET * (SECRET_SIZE // len(SECRET) + 1))[:SECRET_SIZE])
    return path


def never_reported(message: str, path: Path) -> None:
    """The message names neither the content, the size nor a hash prefix of the outside file."""
    data = path.read_bytes()
    assert SECRET.decode()[:20] not in message and str(len(data)) not in message
    assert hashlib.sha256(data).hexdigest()[:8] not in message


def first_trained(arrays: dict, trained: np.ndarray, label_in_topk: bool) -> tuple[int, int]:
    """(row, position) of the first trained position whose label is (or is not) among its top-k ids."""
    hit = (arrays["topk_ids"] == arrays["input_ids"][:, 1:, None]).any(-1)
    found = np.argwhere(trained & (hit if label_in_topk else ~hit))
    assert len(found), "the tiny cache has no such position"
    return int(found[0][0]), int(found[0][1])


def read_everything(folder: Path, verify: str = "full") -> dict:
    with deadline():
        cache = open_cache(folder, verify=verify)
        return cache.read_rows(0, len(cache))


# -- files outside the folder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_shard_named_outside_the_folder_is_refused_before_anything_is_read(how, built, tmp_path, capsys, reliability):
    folder, outside = fresh(built, tmp_path), sentinel(tmp_path)
    name = "../sentinel" if how == "relative" else str(outside)
    resign(folder, lambda m: m["shards"][0].update(name=name, bytes=SECRET_SIZE,
                                                   sha256=hashlib.sha256(outside.read_bytes()).hexdigest()))
    with pytest.raises(ManifestError, match=re.escape("shards[0].name")) as e:
        open_cache(folder, verify="none")
    assert str(folder / "manifest.json") in str(e.value)
    assert main(["inspect", str(folder), "--verify"]) == 3
    assert main(["train", "--cache", str(folder), "--out", str(tmp_path / "run"), "--steps", "1"]) == 3
    err = capsys.readouterr().err
    assert err.count("shards[0].name") == 2
    never_reported(err, outside)
    reliability("security", f"a re-signed manifest naming a shard `{'../x' if how == 'relative' else '/abs/path'}` "
                "outside the cache folder", "refused when the cache is opened (`ManifestError` naming the manifest and "
                "`shards[0].name`; `mft inspect --verify` and `mft train` exit 3); the file is never opened, its size "
                "and hash never reported")


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_a_symlink_in_a_shard_leading_outside_is_refused(fmt, built, tmp_path, reliability):
    folder = fresh(built, tmp_path, fmt=fmt)
    shard = folder / read_manifest(folder)["shards"][0]["name"]
    victim = shard if fmt == "arrow" else shard / "length" / "zarr.json"  # the whole shard, or a file inside one
    moved = tmp_path / "elsewhere"
    shutil.move(victim, moved)
    victim.symlink_to(moved)  # same bytes: the sha256 and sizes still match, nothing re-signed
    with pytest.raises(CorruptShardError, match=re.escape(shard.name) + ".*symbolic link"):
        open_cache(folder, verify="none")
    reliability("security", f"a {fmt} shard {'replaced by' if fmt == 'arrow' else 'holding'} a symbolic link to a file "
                "outside the cache folder (same bytes, so the checksums match)",
                "refused when the cache is opened, naming the shard; the link is never followed")


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_a_fifo_in_a_shard_never_hangs(fmt, built, tmp_path, reliability):
    folder = fresh(built, tmp_path, fmt=fmt)
    shard = folder / read_manifest(folder)["shards"][0]["name"]
    victim = shard if fmt == "arrow" else shard / "length" / "zarr.json"
    victim.unlink()
    digest, size = (hashlib.sha256(b"").hexdigest(), 0) if fmt == "arrow" else (checksum(shard), size_on_disk(shard))
    resign(folder, lambda m: m["shards"][0].update(sha256=digest, bytes=size))  # what the old checksum saw: no file
    os.mkfifo(victim)
    try:
        error = bounded(lambda: open_cache(folder, verify="full")[0], victim)
    finally:
        release(victim)
    assert isinstance(error, CorruptShardError) and re.search(re.escape(shard.name) + ".*FIFO", str(error)), error
    reliability("hostile input", f"a FIFO as {'a shard' if fmt == 'arrow' else 'a file inside a zarr shard'} "
                "(manifest re-signed to match)", "refused when the cache is opened (not a regular file), never opened: "
                "no hang")


@pytest.mark.parametrize("how", ["fifo", "huge", "dev-zero"])
def test_a_hostile_documents_file_is_refused_before_it_is_read(how, built, tmp_path, reliability):
    folder = fresh(built, tmp_path)
    docs = folder / "documents.npy"
    docs.unlink()
    if how == "fifo":
        os.mkfifo(docs)
    elif how == "huge":
        with open(docs, "wb") as f:
            f.truncate(2**34)  # sparse: 16 GiB that read_bytes would pull into memory
    else:
        docs.symlink_to("/dev/zero")  # endless
    try:
        with deadline():
            with pytest.raises(CorruptShardError, match="documents.npy"):
                open_cache(folder, verify="none")  # sizes and kinds are checked on open, before anything is read
            with pytest.raises(CorruptShardError, match="documents.npy"):
                open_cache(folder, verify="full")
    finally:
        if how == "fifo":
            release(docs)
    what = {"fifo": "a FIFO", "huge": "a 16 GiB sparse file", "dev-zero": "a symbolic link to /dev/zero"}[how]
    reliability("hostile input", f"`documents.npy` replaced by {what}", "refused when the cache is opened, from its "
                "metadata alone (kind, place, size); never read: no hang, no memory flood")


# -- counts ----------------------------------------------------------------------------------------------------
def test_num_sequences_beyond_the_shards_rows_is_refused(built, tmp_path, reliability):
    folder = fresh(built, tmp_path)
    resign(folder, lambda m: m.update(num_sequences=m["num_sequences"] + 5))
    with deadline(), pytest.raises(ManifestError, match="'num_sequences'.*sum of the shards' rows"):
        open_cache(folder, verify="none")
    reliability("hostile input", "a re-signed manifest whose `num_sequences` exceeds the shards' rows",
                "`ManifestError` naming `num_sequences` when the cache is opened (the reader would loop forever)")


def test_reading_past_the_last_shard_raises_instead_of_looping(built, tmp_path, reliability):
    folder = fresh(built, tmp_path)
    cache = open_cache(folder, verify="none")
    # changed after the checks: the reader's own guard must hold
    cache.manifest = dataclasses.replace(cache.manifest, num_sequences=cache.manifest.num_sequences + 5)
    with deadline(3), pytest.raises(ManifestError, match="past the end of the last shard"):
        cache.read_rows(0, len(cache))
    reliability("hostile input", "a manifest whose row count exceeds its shards after it was checked (in memory)",
                "`read_rows` raises `ManifestError` on the first row past the last shard: it never loops")


def test_a_shard_holding_other_rows_than_the_manifest_says_is_refused(built, tmp_path, reliability):
    folder = fresh(built, tmp_path)
    cache = open_cache(folder, verify="none")
    s, name = cache.shards[1], cache.shards[1].name
    rows = s.rows
    stored = cache.read_rows(s.first_row, s.first_row + rows, raw=True)
    arrays = {k: np.array(v)[:-1] for k, v in expand_positions(stored, cache.schema).items()}
    path = folder / name
    BACKENDS["arrow"].write(path, cache.schema, store_rows(arrays, cache.schema))  # its last row dropped, the
    # manifest's rows kept
    resign(folder, lambda m: m["shards"][1].update(sha256=checksum(path), bytes=size_on_disk(path)))
    with deadline(), pytest.raises(CorruptShardError, match=re.escape(name) + f".*holds {rows - 1} rows, the manifest says"):
        open_cache(folder, verify="full")
    reliability("hostile input", "a re-signed shard holding fewer rows than the manifest says",
                "refused when the shard is verified (its row count read through the backend), naming it")


# -- types, nesting and encoding parameters --------------------------------------------------------------------
def _set(path: str, value):
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        target = m
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        target[int(last) if isinstance(target, list) else last] = value
    return edit


@pytest.mark.parametrize("path, value, key", [
    ("top_k", "8", "top_k"),
    ("shards", {}, "shards"),
    ("seq_len", {}, "seq_len"),
    ("vocab_size", 300.0, "vocab_size"),
    ("num_sequences", True, "num_sequences"),
    ("schema", "fields", "schema"),
    ("schema.3.shape", "31x8", "schema[3].shape"),
    ("model", [], "model"),
    ("tokenizer.fingerprint", None, "tokenizer.fingerprint"),
    ("data.documents_file.bytes", "376", "data.documents_file.bytes"),
    ("shards.0.rows", "3", "shards[0].rows"),
    ("packing.bos_token_id", "1", "packing.bos_token_id"),
    ("format", 5, "format"),
    ("values", ["x"], "values"),
])
def test_a_field_of_the_wrong_type_is_refused_naming_it(path, value, key, built, tmp_path, reliability):
    folder = fresh(built, tmp_path)
    resign(folder, _set(path, value))
    with pytest.raises(ManifestError, match=re.escape(f"key '{key}'")) as e:
        read_everything(folder)
    assert str(folder / "manifest.json") in str(e.value)
    reliability("hostile input", f"a re-signed manifest whose `{path}` is {json.dumps(value)}",
                f"`ManifestError` naming the manifest and `{key}` when the cache is opened; no traceback")


@pytest.mark.parametrize("how", ["100,000 levels, unsigned", "200 levels, re-signed"])
def test_a_deeply_nested_manifest_is_refused(how, built, tmp_path, reliability):
    folder = fresh(built, tmp_path)
    if how.startswith("100"):
        (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        deep: list = []
        for _ in range(200):
            deep = [deep]
        resign(folder, lambda m: m["config"].update(deep=deep))
    with pytest.raises(ManifestError, match="nests"):
        open_cache(folder, verify="none")
    reliability("hostile input", f"a manifest nested {how}", "`ManifestError` (no RecursionError)")


@pytest.mark.parametrize("gap_max", [-1.0, 1e6])
def test_q8_parameters_out_of_range_are_refused(gap_max, built, tmp_path, reliability):
    folder = fresh(built, tmp_path, fmt="zarr", dtype="q8")

    def edit(m: dict) -> None:
        enc = next(f for f in m["schema"] if f["name"] == "topk_logprobs")["encoding"]
        enc["gap_max"] = gap_max
        if gap_max > 0:
            enc["scale"] = enc["levels"] / math.sqrt(gap_max)  # consistent: only the range is wrong

    resign(folder, edit)
    with pytest.raises(ManifestError, match=re.escape("schema[5].encoding.gap_max' must be a finite number in (0, 64]")):
        read_everything(folder)
    reliability("hostile input", f"a re-signed q8 cache with `gap_max` {gap_max:g}",
                "`ManifestError` naming `schema[5].encoding.gap_max` when the cache is opened")


# -- values that describe no distribution, or that no teacher can produce --------------------------------------
def _sum_to_eight(arrays, trained):
    r, t = first_trained(arrays, trained, label_in_topk=False)
    if "top1_logprob" in arrays:  # q8: every gap 0 below a top-1 of log 1
        arrays["top1_logprob"][r, t], arrays["topk_logprobs"][r, t] = 0.0, 0
    else:
        arrays["topk_logprobs"][r, t] = 0.0
    arrays["label_logprob"][r, t] = -30.0


def _unsorted(arrays, trained):
    r, t = first_trained(arrays, trained, label_in_topk=False)
    lp = arrays["topk_logprobs"]
    lp[r, t, 0] = lp[r, t, -1] - 1.0


def _duplicate_ids(arrays, trained):
    r, t = first_trained(arrays, trained, label_in_topk=False)
    arrays["topk_ids"][r, t, 1] = arrays["topk_ids"][r, t, 0]


def _label_disagrees(arrays, trained):
    r, t = first_trained(arrays, trained, label_in_topk=False)
    arrays["topk_ids"][r, t, 0] = arrays["input_ids"][r, t + 1]  # the label becomes the top-1...
    arrays["label_logprob"][r, t] = math.log(0.9)  # ...with another probability than its column's


def _label_above_kth(arrays, trained):
    r, t = first_trained(arrays, trained, label_in_topk=False)
    p = np.exp(arrays["topk_logprobs"][r, t].astype(np.float64))
    assert p.sum() < 0.5 and p[-1] < 0.2  # room for a label of 0.45 that breaks only this rule
    arrays["label_logprob"][r, t] = math.log(0.45)


@pytest.mark.parametrize("kind, edit, field, message", [
    ("arrow/float16", _sum_to_eight, "topk_logprobs", "probabilities summing to 8"),
    ("zarr/q8", _sum_to_eight, "topk_logprobs", "probabilities summing to 8"),
    ("arrow/float16", _unsorted, "topk_logprobs", "not sorted descending"),
    ("arrow/float16", _duplicate_ids, "topk_ids", "the same id twice"),
    ("arrow/float16", _label_disagrees, "label_logprob", "differs from the label's top-k column"),
    ("arrow/float16", _label_above_kth, "label_logprob", "above the k-th top-k probability"),
])
def test_values_that_describe_no_distribution_are_refused(kind, edit, field, message, built, tmp_path, reliability):
    fmt, dtype = kind.split("/")
    folder = fresh(built, tmp_path, fmt=fmt, dtype=dtype)
    name = rewrite_shard(folder, edit)
    expected = re.escape(name) + ".*" + re.escape(repr(field)) + ".*" + re.escape(message) + r".*\(row \d+ of the shard\)"
    with deadline(), pytest.raises(CorruptShardError, match=expected):
        open_cache(folder, verify="full")
    with deadline(), pytest.raises(CorruptShardError, match=expected):
        open_cache(folder)[0]  # lazy: checked when the shard is first read
    reliability("hostile input", f"a re-signed {kind} cache whose values at one trained position have {message}",
                f"`CorruptShardError` naming `{name}`, `{field}`, the problem and the row, on first read and by `verify`")


@pytest.mark.parametrize("field, edit, message", [
    ("topk_logprobs", lambda a: a.__setitem__((1, 3, 0), np.nan), "NaN"),
    ("label_logprob", lambda a: a.__setitem__((0, 5), np.inf), "+inf"),
    ("topk_logprobs", lambda a: a.__setitem__((0, 0, 0), 2.5), "positive"),
    ("topk_ids", lambda a: a.__setitem__((2, 1, 1), 299 + 1), "outside [0, 300)"),
    ("input_ids", lambda a: a.__setitem__((0, 0), 65535), "outside [0, 300)"),
    ("length", lambda a: a.__setitem__(0, 10_000), "outside [0, 48]"),
])
def test_impossible_values_in_a_cache_are_refused(field, edit, message, llama, docs_jsonl, tmp_path, reliability):
    folder = tmp_path / "c"
    build_cache(CacheConfig(model=str(llama), data=str(docs_jsonl), out=str(folder), seq_len=48, top_k=4, format="arrow"))
    name = rewrite_field(folder, field, edit)
    open_cache(folder, verify="none")[0]  # checksums and manifest are consistent: only the values are wrong
    with pytest.raises(CorruptShardError, match=re.escape(name) + ".*" + re.escape(field) + ".*" + re.escape(message)):
        open_cache(folder)[0]
    with pytest.raises(CorruptShardError, match=name):
        open_cache(folder, verify="full")
    reliability("hostile input", f"a re-signed cache whose `{field}` holds {message} values",
                f"refused on first read and by `verify`, naming `{name}`, the field and the row; never reaches a loss")


def test_a_checksum_mismatch_does_not_report_the_files_hash(built, tmp_path, reliability):
    folder = fresh(built, tmp_path)
    shard = folder / read_manifest(folder)["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=re.escape(shard.name) + ".*sha256 does not match") as e:
        open_cache(folder, verify="full")
    assert hashlib.sha256(bytes(data)).hexdigest()[:8] not in str(e.value)
    reliability("security", "a shard whose sha256 does not match the manifest",
                "refused naming the shard; the message says only that it does not match (no hash of what is there)")


# -- damage nobody re-signed: flipped, truncated, missing, swapped shards; an edited manifest ---------------------
def _shard_file(cache: Path, index: int) -> Path:
    name = json.loads((cache / "manifest.json").read_text())["shards"][index]["name"]
    p = cache / name
    return max((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size) if p.is_dir() else p


def _flip(cache: Path):
    f = _shard_file(cache, 1)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x40
    f.write_bytes(bytes(b))


def _truncate(cache: Path):
    f = _shard_file(cache, 1)
    f.write_bytes(f.read_bytes()[:-7])


def _remove(cache: Path):
    shutil.rmtree(cache / json.loads((cache / "manifest.json").read_text())["shards"][1]["name"])


def _edit_manifest(cache: Path):
    m = json.loads((cache / "manifest.json").read_text())
    m["top_k"] = 4
    (cache / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case, damage, names", [
    ("a flipped byte in a shard", _flip, "shard-00001"),
    ("a truncated shard", _truncate, "shard-00001"),
    ("a missing shard", _remove, "shard-00001"),
    ("a hand-edited manifest", _edit_manifest, "manifest.json"),
])
def test_corruption_is_detected_naming_the_file(case, damage, names, fault_cache, tmp_path, capsys, reliability):
    cache = tmp_path / "cache"
    shutil.copytree(fault_cache, cache)
    damage(cache)
    assert main(["inspect", str(cache), "--verify"]) == 3
    assert names in capsys.readouterr().err
    rows = json.loads((fault_cache / "manifest.json").read_text())["num_sequences"]
    steps = str(rows // 4 + 1)  # one epoch: every shard is read, and checked when first read
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--steps", steps, "--save-every", "0"]) == 3
    assert names in capsys.readouterr().err and not (tmp_path / "run" / "summary.json").exists()
    reliability("corruption", case, f"`mft inspect --verify` exits 3 naming `{names}`; `mft train` exits 3 naming it "
                "when it opens the cache (missing, truncated, manifest) or first reads the shard (flipped bytes)")


def test_shard_copied_from_another_cache_is_detected(llama, fault_docs, fault_cache, tmp_path, capsys, reliability):
    other = tmp_path / "other"
    build_cache(CacheConfig(model=str(llama), data=str(fault_docs["other"]), out=str(other), **SMALL_CACHE))
    cache = tmp_path / "cache"
    shutil.copytree(fault_cache, cache)
    name = json.loads((cache / "manifest.json").read_text())["shards"][2]["name"]
    shutil.rmtree(cache / name)
    shutil.copytree(other / name, cache / name)  # same name, same schema, same size class: another cache's rows
    assert main(["inspect", str(cache), "--verify"]) == 3
    assert name in capsys.readouterr().err
    reliability("corruption", "a shard copied in from another cache (same name and schema)",
                f"`mft inspect --verify` exits 3 naming `{name}` (its sha256 is not the manifest's)")


def test_inspect_verify_names_the_bad_shard(llama, docs_jsonl, tmp_path, capsys):
    assert main(["cache", "--model", str(llama), "--data", str(docs_jsonl), "--out", str(tmp_path / "c"),
                 "--format", "arrow", "--shard-mb", "0.02"]) == 0
    shard = sorted((tmp_path / "c").glob("shard-*.arrow"))[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c"), "--verify"]) == 3
    assert shard.name in capsys.readouterr().err


# -- mft inspect --json ----------------------------------------------------------------------------------------
def test_inspect_json_is_valid_json_with_non_finite_statistics(built, tmp_path, capsys, reliability):
    folder = fresh(built, tmp_path)

    def label_of_probability_zero(arrays, trained):
        r, t = first_trained(arrays, trained, label_in_topk=False)
        arrays["label_logprob"][r, t] = -np.inf  # legal (probability 0): the mean label log-prob is -inf

    rewrite_shard(folder, label_of_probability_zero)
    assert main(["inspect", str(folder), "--json", "--verify"]) == 0

    def strict(constant: str):
        raise ValueError(f"{constant} is not JSON")

    stats = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert stats["mean_label_logprob"] is None and stats["top1_accuracy"] >= 0
    from mft_cache.pipeline.inspect import format_stats, json_safe, stats_json

    assert json_safe({"a": [float("nan"), np.float32("inf"), 1.5, np.int64(3)]}) == {"a": [None, None, 1.5, 3]}
    assert json.loads(stats_json({"x": float("nan")})) == {"x": None}
    assert "mean label log-prob" in format_stats(stats)
    reliability("hostile input", "`mft inspect --json` on a cache whose statistics are not finite (a label of "
                "probability 0: mean label log-prob -inf; NaN)", "valid JSON: null for each non-finite number")


# -- every kind this code writes still reads -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "q8"])
def test_caches_of_every_kind_pass_every_check(fmt, dtype, built, tmp_path):
    m = read_manifest(built(fmt, dtype))
    assert m["schema_version"] == 3
    rows = read_everything(built(fmt, dtype))
    assert len(rows["input_ids"]) == m["num_sequences"] and np.isfinite(rows["topk_logprobs"]).any()
    if dtype != "q8":  # the same cache as an earlier version wrote it (schema version 1): the same rows
        write_legacy_copy(built(fmt, dtype), tmp_path / "old")
        old = read_everything(tmp_path / "old")
        assert read_manifest(tmp_path / "old")["schema_version"] == 1 and old.keys() == rows.keys()
        assert all(np.array_equal(old[k], rows[k]) for k in rows)


# -- property: any single mutation of a manifest reads the same rows or is refused -----------------------------
def _places(value, prefix: tuple = ()) -> list[tuple]:
    """Every key, list item and leaf of a JSON value, as paths (the manifest's own digest aside)."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if prefix == () and k == "manifest_sha256":
            continue
        out.append(prefix + (k,))
        out += _places(v, prefix + (k,))
    return out


def _nested(depth: int):
    v: object = 1
    for _ in range(depth):
        v = [v]
    return v


def _hostile(outside: Path, fifo: Path):
    named = ["../x", "/etc/passwd", "..", ".", "", "../sentinel", str(outside), "../sentinel.fifo", str(fifo),
             "shard-00000.zarr", "shard-00001.arrow", "shard-00000.arrow", "documents.npy", "manifest.json", "/dev/zero"]
    words = ["q8", "float16", "float32", "uint8", "uint16", "int32", "zarr", "arrow", "npz", "concat", "bos-per-row",
             "topk_logprobs", "top1_logprob", "mft-cache"]
    numbers = [0, -1, 1, 2, 3, 7, 8, 31, 32, 255, 299, 300, 2**31, 2**63, -(2**63), 10**30, 0.5, -1.0, 1e6, 1e308,
               float("nan"), float("inf"), float("-inf"), True, False, None]
    return st.one_of(
        st.sampled_from(named + words + numbers), st.integers(), st.floats(), st.text(max_size=12),
        st.sampled_from([[], {}, [1, 2], {"a": 1}, {"name": "q8"}, "x" * 500]),
        st.integers(1, 40).map(_nested),  # both sides of the nesting cap
    )


@pytest.mark.parametrize("kind", ["zarr/q8", "arrow/float16"])
def test_any_single_manifest_mutation_reads_the_same_rows_or_is_refused(kind, built, tmp_path, reliability):
    fmt, dtype = kind.split("/")
    folder = fresh(built, tmp_path, fmt=fmt, dtype=dtype)
    outside, fifo = sentinel(tmp_path), tmp_path / "sentinel.fifo"
    os.mkfifo(fifo)  # anything that opens it to read would block: the deadline turns that into a failure
    original = read_manifest(folder)
    expected = read_everything(folder)
    places = _places(original)
    outcomes: dict[str, int] = {"read": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(op=st.sampled_from(["replace", "replace", "nudge", "delete", "add"]),
           place=st.one_of(st.sampled_from([p for p in places if len(p) == 1]), st.sampled_from(places)),
           value=_hostile(outside, fifo), delta=st.sampled_from([-1, 1, -8, 8, 2**20]))
    def check(op, place, value, delta):
        m = copy.deepcopy(original)
        *parents, last = place
        parent = m
        for p in parents:
            parent = parent[p]
        old = parent[last]
        if op == "nudge" and type(old) in (int, float):  # a plausible number, off by a little or a lot
            parent[last] = old + delta
        elif op == "nudge" and isinstance(old, str):  # a plausible text: a name, a path, another key's value
            parent[last] = value if isinstance(value, str) else old + "x"
        elif op in ("replace", "nudge"):
            parent[last] = value
        elif op == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last]["added"] = value
        elif isinstance(parent[last], list):
            parent[last].append(value)
        else:
            parent["added" if isinstance(parent, dict) else last] = value
        m["manifest_sha256"] = manifest_digest(m)
        (folder / "manifest.json").write_text(json.dumps(m))
        try:
            got = read_everything(folder)
        except (ManifestError, CorruptShardError) as e:
            never_reported(str(e), outside)
            outcomes["refused"] += 1
        else:
            assert sorted(got) == sorted(expected)
            for k, a in expected.items():
                assert got[k].dtype == a.dtype and np.array_equal(got[k], a, equal_nan=True), k
            outcomes["read"] += 1

    try:
        check()
    finally:
        release(fifo)
    assert outcomes["read"] and outcomes["refused"]
    reliability("hostile input", f"hypothesis: one key or value of a {kind} manifest replaced (other types, null, "
                "huge or negative numbers, NaN, `../x`, `/etc/passwd`, a file and a FIFO outside the folder, deep "
                "nesting), nudged (a number off by 1, 8 or 2**20), deleted or added, then re-signed (150 examples)", "`open_cache(verify='full')` and reading "
                "every row give the original rows or raise `ManifestError`/`CorruptShardError`, within 20 s; no "
                "message reports the outside file; the FIFO is never opened")


# -- nothing read is code ---------------------------------------------------------------------------------------
def test_nothing_read_is_evaluated_as_code(reliability):
    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("mft_cache", "pipeline", "rows", "storage", "trainer") for p in (root / d).rglob("*.py")]
    assert len(sources) > 20
    import re

    # yaml.load only with mft_cache/config.py's SafeLoader subclass (it bounds the nesting as it composes)
    banned = re.compile(r"(?<![.\w])(eval|exec)\(|pickle\.loads?\(|allow_pickle=True|weights_only=False|marshal\.|"
                        r"yaml\.(unsafe_load|full_load|load_all)\(|yaml\.load\((?![^\n]*Loader=_yaml_loader\(\)\))")
    hits = [(p.name, m.group(0)) for p in sources for m in banned.finditer(p.read_text())]
    assert not hits, hits
    reliability("security", "code paths that could evaluate data (eval, exec, pickle, allow_pickle, weights_only=False)",
                "none in the package: manifests are JSON, shards Zarr/Arrow, documents.npy loads with allow_pickle=False")
