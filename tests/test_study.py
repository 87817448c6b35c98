"""`mft study` end to end on a tiny model: every part's runs happen and the report holds every table."""
from __future__ import annotations

import pytest

import json

from conftest import make_texts, write_jsonl
from mft_cache.cli import main


@pytest.mark.slow  # about a minute: every part of mft study end to end (mft regime's tiny study runs in the default suite)
def test_study_runs_every_part_and_writes_the_report(llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_texts(8, seed=31))
    spec = write_jsonl(tmp_path / "spec.jsonl", make_texts(3, seed=32))
    pool = make_texts(12, seed=33, min_words=5, max_words=30)
    general = write_jsonl(tmp_path / "general.jsonl", pool[:4])  # validation: left out of replay
    source = write_jsonl(tmp_path / "general_all.jsonl", pool)
    report = tmp_path / "STUDIES.md"
    rc = main(["study", "--model", str(llama), "--data", str(train), "--out", str(tmp_path / "study"),
               "--seq-len", "32", "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--save-every", "0",
               "--eval-specialized", str(spec), "--eval-general", str(general), "--replay-source", str(source),
               "--replay-documents", "6", "--report", str(report)])
    assert rc == 0
    record = json.loads((tmp_path / "study" / "study.json").read_text())
    runs = record["runs"]
    expected = {"ft", "mft", "distill-partial", "corrective-ft", "mft-online", "mft-k16-renormalize", "mft-k16-drop",
                "mft-k32-q8",
                *(f"{o}-{m}" for o in ("ft", "mft") for m in ("lora", "dora", "ia3", "replay")),
                *(f"mft-k{k}" for k in (1, 4, 16, 64, 256)), *(f"mft-tau{t}" for t in ("0", "0.1", "0.5", "0.75", "1"))}
    assert set(runs) == expected
    assert runs["mft-online"]["teacher"] == "online" and runs["mft-k4"]["top_k"] == 4
    assert json.loads((tmp_path / "study" / "caches" / "k32-q8" / "manifest.json").read_text())["top_k"] == 32
    assert runs["mft-lora"]["peft"] == "lora" and runs["ft-replay"]["replay_fraction"] == 0.5
    replay = (tmp_path / "study" / "data" / "replay.jsonl").read_text()
    assert replay.count("\n") == 6 and not any(t in replay for t in (json.dumps(x) for x in pool[:4]))
    assert all(r["S"] is not None and r["DG"] is not None and r["steps"] == 2 for r in runs.values())
    text = report.read_text()
    for title in ("a) Objectives", "b) Compositions", "c) How many logits", "d) tau"):
        assert title in text
    assert text.count("| mft-k") >= 5 and "gap to online" in text
    # --report-only gathers the finished runs without training; a run missing is named as missing
    import shutil

    shutil.rmtree(tmp_path / "study" / "runs" / "mft-ia3")
    partial = tmp_path / "PARTIAL.md"
    assert main(["study", "--model", str(llama), "--data", str(train), "--out", str(tmp_path / "study"),
                 "--seq-len", "32", "--steps", "2", "--batch-size", "2", "--report", str(partial),
                 "--eval-specialized", str(spec), "--eval-general", str(general), "--report-only"]) == 0
    text = partial.read_text()
    assert "Partial: 25 of 26 runs finished" in text and "| mft-ia3 |" not in text and "| mft-lora |" in text
    # the study resumes: a second call trains only what is missing and gives the same record
    assert main(["study", "--model", str(llama), "--data", str(train), "--out", str(tmp_path / "study"),
                 "--seq-len", "32", "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--save-every", "0",
                 "--eval-specialized", str(spec), "--eval-general", str(general), "--replay-source", str(source),
                 "--replay-documents", "6", "--report", str(report)]) == 0
    assert json.loads((tmp_path / "study" / "study.json").read_text())["runs"]["mft"]["S"] == runs["mft"]["S"]
