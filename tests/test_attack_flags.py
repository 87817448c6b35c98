"""The command line: a flag naming a file that is missing or unreadable, a value out of range or not finite, a flag
that contradicts the cache. Each is refused with exit 2 naming the flag, no traceback, before anything is written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SMALL_CACHE, SMALL_RUN, cache_args, train_args
from mft_cache.cli import main

SEQ = SMALL_CACHE["seq_len"]


def _bad(tmp_path: Path, **files) -> Path:
    for name, content in files.items():
        p = tmp_path / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return tmp_path


@pytest.mark.parametrize("case, args, message", [
    ("missing file", ["--data", "{tmp}/nope.jsonl"], "nope.jsonl: no such file"),
    ("empty data", ["--data", "{tmp}/empty.jsonl"], "no non-empty documents"),
    ("missing field", ["--data", "{tmp}/docs.jsonl", "--text-field", "body"], "no field 'body'"),
    ("non-UTF-8", ["--data", "{tmp}/latin1.txt"], "latin1.txt: not valid UTF-8"),
    ("bad JSON line", ["--data", "{tmp}/broken.jsonl"], "broken.jsonl: line 2: not valid JSON"),
    ("k < 1", ["--top-k", "0"], "--top-k must be at least 1"),
    ("k > vocab", ["--top-k", "301"], "--top-k 301 exceeds the model's vocabulary size 300"),
    ("seq len < 2", ["--seq-len", "1"], "--seq-len must be at least 2"),
    ("seq len > max", ["--seq-len", "257"], "--seq-len 257 exceeds the model's maximum of 256"),
    ("missing model", ["--model", "{tmp}/no-model"], "no-model"),
])
def test_bad_input_gives_a_clear_error_and_no_cache(case, args, message, llama, tmp_path, capsys, reliability):
    _bad(tmp_path, **{"empty.jsonl": "", "docs.jsonl": json.dumps({"text": "hello"}) + "\n",
                      "latin1.txt": "caf\xe9 cr\xe8me".encode("latin-1"),
                      "broken.jsonl": '{"text": "a"}\n{"text": \n'})
    argv = ["cache", "--model", str(llama), "--data", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "out")]
    argv += [a.format(tmp=tmp_path) for a in args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse-level errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (case, err)
    assert message in err, (case, err)
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    reliability("hostile input", f"`mft cache` with {case}", f"exit 2: \"{message.split('{')[0]}\"; no cache")


def test_cli_error_has_no_traceback_in_a_real_process(llama, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mft_cache.cli", "cache", "--data", str(tmp_path / "missing.jsonl"),
                        "--model", str(llama), "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert "missing.jsonl: no such file" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mft_cache.cli", "cache", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert "holds no config.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["--eval-specialized", "--eval-general", "--replay"])
def test_a_missing_file_is_reported_under_its_own_flag(flag, llama, docs_jsonl, tmp_path, capsys, reliability):
    missing = tmp_path / "nope.jsonl"
    argv = ["train", "--teacher", "online", "--model", str(llama), "--data", str(docs_jsonl), "--seq-len", "16",
            "--objective", "ft", "--steps", "1", "--out", str(tmp_path / "run"), flag, str(missing)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{flag} {missing}: no such file" in err, err
    assert "--data" not in err and "Traceback" not in err
    reliability("hostile input", f"`mft train {flag}` naming a file that does not exist",
                f"exit 2: \"{flag} nope.jsonl: no such file or folder\" (not reported as --data)")


@pytest.mark.parametrize("stage, flag, value", [
    ("train", "--lr", "inf"), ("train", "--lr", "nan"), ("train", "--max-grad-norm", "-1"),
    ("train", "--max-grad-norm", "inf"), ("train", "--weight-decay", "-0.1"), ("train", "--lora-alpha", "inf"),
    ("cache", "--shard-mb", "inf"),
])
def test_non_finite_or_out_of_range_options_are_refused(stage, flag, value, llama, run_docs, run_cache, tmp_path,
                                                        capsys, reliability):
    out = tmp_path / "out"
    args = (train_args(run_cache, out, **SMALL_RUN) if stage == "train"
            else cache_args(llama, run_docs, out, **SMALL_CACHE))
    assert main([*args, flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and not out.exists()
    reliability("hostile input", f"`mft {stage} {flag} {value}`", f"refused (exit 2) naming `{flag}`; nothing written")


def test_other_data_or_seq_len_is_refused(fault_cache, fault_docs, tmp_path, capsys, reliability):
    base = ["train", "--cache", str(fault_cache), "--out", str(tmp_path / "r"), "--steps", "1", "--save-every", "0"]
    assert main([*base, "--data", str(fault_docs["other"])]) == 2
    assert "is not the data the cache" in capsys.readouterr().err
    assert main([*base, "--seq-len", str(SEQ * 2)]) == 2
    assert f"--seq-len {SEQ * 2} differs from the cache's {SEQ}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main([*base, "--data", str(fault_docs["train"])]) == 0  # the right data passes the same check
    reliability("mismatch", "`--data` or `--seq-len` other than the cache's", "refused (exit 2) naming the flag; "
                "the cache's own data passes")
