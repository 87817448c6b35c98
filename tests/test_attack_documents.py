"""Input documents (--data and the evaluation sets) are untrusted: each hostile one is refused with a clean error
(exit 2 from the CLI) naming the flag, the file and the row, before the tokenizer or the data fingerprint sees it;
legit long documents under the cap still read; random bytes in every format give documents or a clear error."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mft_cache.cli import main
from mft_cache.rows import read_documents

CAP_ENV = "MFT_MAX_DOCUMENT_MB"


def _refused(path: Path, *pieces: str, what: str = "--data", **kw) -> str:
    """read_documents(path) raises a ValueError (exit 2 in the CLI) whose message starts with the flag and the file
    and holds every piece."""
    with pytest.raises(ValueError) as info:
        read_documents(path, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{what} {path}: "), msg
    for piece in pieces:
        assert piece in msg, (piece, msg)
    return msg


def _csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text"], *rows])
    return path


def test_csv_cell_over_128_kib_reads_and_a_cell_over_the_cap_is_refused(tmp_path, monkeypatch, reliability):
    long = "a long legit document, " * 14_000  # 322 KB: over csv's default 128 KiB field limit, far under the cap
    path = _csv(tmp_path / "d.csv", [["0", "short one"], ["1", long], ["2", "multi\nline"]])
    assert read_documents(path).texts == ["short one", long, "multi\nline"]
    monkeypatch.setenv(CAP_ENV, "0.25")  # 256 KiB
    _refused(path, "line 3: ", "256 KiB", CAP_ENV)  # the header is line 1
    assert csv.field_size_limit() == 131072  # the process-wide limit is put back after reading
    reliability("hostile input", "a CSV cell of 322 KB (over csv's 128 KiB field limit); one over the document cap",
                "the first reads; the second refused naming the file, `line 3`, the size and the cap (exit 2)")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_is_refused(suffix, tmp_path, reliability):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "x", "meta": ' + deep + "}\n")
        _refused(path, "line 2: ", "nested")
    else:
        path.write_text('[{"text": "fine"}, {"text": "x", "meta": ' + deep + "}]")
        _refused(path, "nested")
    reliability("hostile input", f"JSON nested 100,000 deep in a {suffix} file (RecursionError in the parser)",
                "refused naming the file" + (" and `line 2`" if suffix == ".jsonl" else "") + " (exit 2)")


def test_json_number_too_long_for_python_is_refused(tmp_path, reliability):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "x", "n": ' + "9" * 5000 + "}\n")
    _refused(path, "line 2: ", "not valid JSON")
    reliability("hostile input", "a 5,000-digit number in a .jsonl row (Python's int digit limit)",
                "refused naming the file and `line 2` (exit 2)")


def test_lone_surrogate_is_refused_before_the_tokenizer_and_fingerprint(llama, tmp_path, capsys, reliability):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "half a pair \\ud800 here"}\n')
    _refused(path, "line 2: ", "surrogate", "U+D800")
    (tmp_path / "d.json").write_text('[{"text": "fine"}, {"text": "\\udfff"}]')
    _refused(tmp_path / "d.json", "index 1: ", "surrogate")
    code = main(["cache", "--model", str(llama), "--data", str(path), "--out", str(tmp_path / "c"), "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--data {path}: line 2: " in err and "surrogate" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "manifest.json").exists()
    reliability("hostile input", "a lone surrogate (JSON `\\ud800`) in a document",
                "refused naming the file and `line 2` / `index 1` before tokenizing or fingerprinting; `mft cache` "
                "exits 2, no cache")


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], 3, True])
def test_non_string_text_field_is_refused_naming_the_row(value, tmp_path, reliability):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    kind = type(value).__name__
    _refused(path, "line 2: ", f"field 'text' holds {kind}")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "fine"}, {"text": value}]))
    _refused(tmp_path / "d.json", "index 1: ", f"field 'text' holds {kind}")
    reliability("hostile input", f"a `text` field holding {kind} ({json.dumps(value)})",
                "refused naming the file and `line 2` / `index 1` (exit 2); null stays an empty document, skipped")


def test_over_cap_document_in_txt_is_refused_before_reading(tmp_path, monkeypatch, reliability):
    monkeypatch.setenv(CAP_ENV, "0.0625")  # 64 KiB = 65,536 bytes
    ok, big = tmp_path / "ok.txt", tmp_path / "big.txt"
    ok.write_text("x" * 65_536)
    big.write_text("x" * 65_537)
    assert read_documents(ok).texts == ["x" * 65_536]
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole before its size was checked"))
    _refused(big, "65,537 bytes", "64 KiB", CAP_ENV, "split")
    reliability("hostile input", "a .txt document over the per-document cap (cap lowered to 64 KiB)",
                "refused from its size on disk, before it is read, naming the file, its size and the cap (exit 2)")


def test_over_cap_document_in_jsonl_and_other_formats_is_refused(tmp_path, monkeypatch, reliability):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv(CAP_ENV, "0.0625")  # 64 KiB = 65,536 bytes of UTF-8
    at_cap, over = "é" * 32_768, "é" * 32_768 + "x"  # 65,536 and 65,537 bytes (32,768 and 32,769 characters)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": at_cap}) + "\n")
    assert read_documents(path).texts == [at_cap]
    path.write_text(json.dumps({"text": at_cap}) + "\n" + json.dumps({"text": over}) + "\n")
    _refused(path, "line 2: ", "65,537 bytes", "64 KiB", CAP_ENV)
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"text": "y" * 300_000}) + "\n")
    _refused(path, "line 3: ", "300,")  # a line far over the cap: refused before it is read whole
    (tmp_path / "d.json").write_text(json.dumps([{"text": "fine"}, {"text": over}]))
    _refused(tmp_path / "d.json", "index 1: ", "65,537 bytes")
    pq.write_table(pa.table({"text": ["fine", over]}), tmp_path / "d.parquet")
    _refused(tmp_path / "d.parquet", "row 1: ", "65,537 bytes")
    _csv(tmp_path / "d.csv", [["0", "fine"], ["1", over]])
    _refused(tmp_path / "d.csv", "line 3: ", "65,537 bytes")
    monkeypatch.setenv(CAP_ENV, "lots")
    with pytest.raises(ValueError, match=f"{CAP_ENV}='lots'"):
        read_documents(tmp_path / "d.csv")
    reliability("hostile input", "a document one byte over the per-document cap (lowered to 64 KiB) in .jsonl, .json, "
                ".parquet, .csv; one exactly at it", "the one at the cap reads; each over it is refused naming the "
                "file, the row, its size and the cap and how to lift it (exit 2)")


_PROBE = """
import resource, sys, time
from mft_cache.rows import read_documents
for path in sys.argv[1:]:  # peak memory only grows: the .txt first, then the .jsonl
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    try:
        read_documents(path)
        print("READ")
    except ValueError as e:
        print("REFUSED", e)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"seconds {time.perf_counter() - t:.3f} extra_mb {(after - before) / 1024:.1f}")
"""


def test_a_45_mb_single_line_is_refused_quickly_with_little_memory(tmp_path, reliability):
    """The real cap (8 MiB): a 45 MB one-line document, as .txt and as .jsonl, in a fresh process."""
    words = "word " * 9_000_000
    files = [tmp_path / "big.txt", tmp_path / "big.jsonl"]
    files[0].write_text(words)
    files[1].write_text(json.dumps({"text": words}) + "\n")
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    extras = []
    for path, (verdict, numbers) in zip(files, zip(*[iter(r.stdout.splitlines())] * 2)):
        assert verdict.startswith(f"REFUSED --data {path}: "), verdict
        assert "45,000,0" in verdict and "8 MiB" in verdict and "split" in verdict, verdict
        seconds, extra = float(numbers.split()[1]), float(numbers.split()[3])
        assert seconds < 2, numbers
        assert extra < 45, numbers  # never the whole 45 MB line: at most the longest line a document may take (4 x 8 MiB)
        extras.append(extra)
    reliability("hostile input", "a 45 MB single-line document as .txt and .jsonl (default 8 MiB cap)",
                "refused in well under a second, never read whole (peak memory grows by "
                f"{max(extras):.0f} MB at most), naming the file, the size and the cap (exit 2)")


def test_huge_line_and_empty_documents(tmp_path, reliability):
    big = "word " * 400_000
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": big}) + "\n" + json.dumps({"text": ""}) + "\n")
    docs = read_documents(tmp_path / "d.jsonl")
    assert len(docs.texts) == 1 and docs.num_empty == 1
    reliability("hostile input", "a 2 MB single-line document and an empty document", "read; the empty one skipped "
                "and counted in the manifest")


# -- random bytes in every format -------------------------------------------------------------------------------
SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
_FUZZ_CASES: set[str] = set()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from(SUFFIXES), payload=st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=50), st.dictionaries(st.text(max_size=5), st.text(max_size=20))),
             max_size=20).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
))
def test_random_bytes_in_any_format_give_documents_or_a_clear_error(suffix, payload, tmp_path):
    _FUZZ_CASES.add(suffix)
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(payload)
    try:
        docs = read_documents(path)
    except (ValueError, FileNotFoundError) as e:
        assert str(path) in str(e) or "--data" in str(e), e  # names the file or the flag
    else:
        assert docs.texts and all(isinstance(t, str) and t.strip() for t in docs.texts)


def test_fuzzing_covered_every_format(reliability):
    """Runs after the fuzz test (file order): its examples reached every reader."""
    if not _FUZZ_CASES:
        pytest.skip("the fuzz test was not selected")
    assert _FUZZ_CASES == set(SUFFIXES)
    reliability("hostile input", "hypothesis: random bytes, text and JSON rows as .txt/.jsonl/.json/.csv/.parquet "
                "(60 examples)", "documents or a ValueError naming the file; no hang, no crash")
