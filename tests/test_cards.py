"""Model cards (docs/HF.md, "Model cards"): best/ and final/ carry a README.md holding the run's numbers, options
and command; an adapter's card says it is one."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from helpers import tiny_flags
from mft_cache.cli import main


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


# -- model cards --------------------------------------------------------------------------------------------
def test_best_and_final_carry_a_model_card_with_the_summary_numbers(cache, docs_jsonl, tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "card"
    argv = ["train", *tiny_flags(cache, docs_jsonl, run)]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((cache / "manifest.json").read_text())
    for folder, prefix in (("best", "best_"), ("final", "final_")):
        card = ModelCard.load(run / folder / "README.md")
        m = card.data.to_dict()["mft"]
        assert m["ppl_specialized"] == pytest.approx(summary[f"{prefix}ppl_specialized"], rel=1e-12)
        assert m["ppl_general"] == pytest.approx(summary[f"{prefix}ppl_general"], rel=1e-12)
        got = (m["S"], m["DG"], m["ratio"])
        want = (summary["S"], summary["DG"], summary["ratio"]) if folder == "best" else (
            summary["final_S"], summary["final_DG"], summary["final_ratio"])
        assert got == pytest.approx(want, rel=1e-12)
        assert (m["base_ppl_specialized"], m["base_ppl_general"]) == (summary["base_ppl_specialized"],
                                                                      summary["base_ppl_general"])
        assert (m["objective"], m["tau"], m["cache_top_k"], m["cache_logprob_dtype"]) == ("mft", 0.5, 16, "float16")
        assert m["data_fingerprint"] == manifest["data"]["fingerprint"]
        assert m["cache_manifest_sha256"] == manifest["manifest_sha256"]
        assert m["command"] == shlex.join(["mft", *argv]) and m["mft_cache_version"]
        assert card.data.library_name == "transformers" and "mft-cache" in card.data.tags
        assert shlex.join(["mft", *argv]) in card.text and f"{summary['S']:.4f}" in (run / "best" / "README.md").read_text()


def test_an_adapters_card_says_it_is_one(cache, docs_jsonl, tmp_path):
    from huggingface_hub import ModelCard

    flags = tiny_flags(cache, docs_jsonl, tmp_path / "lora")
    flags[flags.index("--steps") + 1] = "1"
    assert main(["train", *flags, "--peft", "lora"]) == 0
    card = ModelCard.load(tmp_path / "lora" / "final" / "README.md")
    assert card.data.library_name == "peft" and card.data.to_dict()["mft"]["adapter"] == "lora"
    assert (tmp_path / "lora" / "final" / "adapter_config.json").exists()
