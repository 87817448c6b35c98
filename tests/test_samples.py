"""Samples to read (--samples, docs/USAGE.md): greedy continuations at each evaluation in samples.md and the model
card, the base model's beside the checkpoint's; bounded; text a model writes cannot break the Markdown."""
from __future__ import annotations

import json

import pytest

from helpers import tiny_flags
from mft_cache.cli import main
from mft_cache.trainer.samples import card_section, prompts, render


@pytest.fixture(scope="module")
def run(text_cache, docs_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "run"
    assert main(["train", *tiny_flags(text_cache, docs_jsonl, out), "--samples", "2", "--sample-tokens", "5"]) == 0
    return out


def _evals(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]


def test_every_evaluation_records_its_samples_and_samples_md_shows_them(run):
    evals = _evals(run)
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:
        # 2 prompts per set, 2 sets; the same prompts at every evaluation
        assert [s["set"] for s in e["samples"]] == ["specialized"] * 2 + ["general"] * 2
        assert [s["prompt"] for s in e["samples"]] == [s["prompt"] for s in evals[0]["samples"]]
        assert all(isinstance(s["text"], str) for s in e["samples"])
    text = (run / "samples.md").read_text()
    assert text.count("step 0:") == 4 and text.count("step 3:") == 4
    assert evals[-1]["samples"][0]["text"] in text


def test_the_card_shows_the_base_and_the_checkpoint(run):
    card = (run / "final" / "README.md").read_text()
    assert "## Samples" in card and "base model:" in card and "this checkpoint:" in card


def test_greedy_samples_are_reproducible(run, text_cache, docs_jsonl, tmp_path):
    again = tmp_path / "again"
    assert main(["train", *tiny_flags(text_cache, docs_jsonl, again), "--samples", "2", "--sample-tokens", "5"]) == 0
    assert [e["samples"] for e in _evals(again)] == [e["samples"] for e in _evals(run)]


def test_no_samples_writes_no_file(text_cache, docs_jsonl, tmp_path):
    out = tmp_path / "r"
    assert main(["train", *tiny_flags(text_cache, docs_jsonl, out), "--samples", "0"]) == 0
    assert not (out / "samples.md").exists() and not any("samples" in e for e in _evals(out))


def test_samples_do_not_block_a_resume(run, text_cache, docs_jsonl):
    # samples change nothing that is trained: a finished run with other sample settings is still the same run
    assert main(["train", *tiny_flags(text_cache, docs_jsonl, run), "--samples", "0", "--resume"]) == 0


@pytest.mark.parametrize("flags", [["--samples", "-1"], ["--samples", "9"], ["--sample-tokens", "0"],
                                   ["--sample-tokens", "513"]])
def test_bounds(text_cache, tmp_path, capsys, flags):
    assert main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "r"), *flags]) == 2
    assert flags[0] in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_hostile_model_text_stays_inside_its_block():
    evil = "```\n# Heading\n<script>x</script>\n````"
    evals = [{"step": 0, "samples": [{"set": "general", "prompt": "p`", "text": evil}]},
             {"step": 4, "samples": [{"set": "general", "prompt": "p`", "text": "fine"}]}]
    md = render(evals, "run")
    fence = "`" * 5  # longer than the longest run of backticks inside
    assert f"{fence}\n{evil}\n{fence}" in md
    lines = card_section(evals[0], evals[1])
    assert "fine" in lines and any(line.startswith("```") for line in lines)


def test_prompts_of_chat_rows_end_where_training_starts():
    import numpy as np

    from mft_cache.rows import Packed
    from mft_cache.trainer.data import Rows

    ids = np.arange(20, dtype=np.int64).reshape(2, 10)
    trained = np.zeros((2, 9), dtype=bool)
    trained[0, 4:] = True  # row 0: labels from token 5 on (tokens 0-4 are the question)
    rows = Rows(Packed(ids, np.array([10, 8], dtype=np.int32), trained=trained))
    got = prompts({"specialized": rows}, 2, max_prompt=3)
    assert got == [("specialized", [2, 3, 4]), ("specialized", [10, 11, 12])]  # row 1: no trained label: text rule
