"""The reference checkpoint (docs/STUDY.md, "The reference checkpoint"): a light finetune on general text whose best/
is picked by the general perplexity (--best-by general), then used as teacher and student; its mft_checkpoint.json
travels into the cache's manifest (model.trained_from) and the next run's model card. The record is untrusted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import cache_args
from mft_cache import provenance
from mft_cache.cli import main
from mft_cache.storage import open_cache
from mft_cache.storage.manifest import ManifestError, manifest_digest
from mft_cache.testing import make_texts, write_jsonl


@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory) -> dict:
    """A reference run: plain finetuning of the tiny Llama on 'general' documents with the online path (no cache,
    no teacher), best/ by the general perplexity."""
    d = tmp_path_factory.mktemp("reference")
    general = write_jsonl(d / "general.jsonl", make_texts(16, seed=61))
    general_val = write_jsonl(d / "general_val.jsonl", make_texts(4, seed=62))
    spec_val = write_jsonl(d / "spec_val.jsonl", make_texts(4, seed=63))
    run = d / "run"
    assert main(["train", "--teacher", "online", "--objective", "ft", "--model", str(llama), "--data", str(general),
                 "--seq-len", "32", "--out", str(run), "--steps", "4", "--batch-size", "2", "--lr", "3e-3",
                 "--warmup-steps", "1", "--eval-every", "1", "--save-every", "0", "--eval-general", str(general_val),
                 "--eval-specialized", str(spec_val), "--best-by", "general"]) == 0
    return {"run": run, "dir": d, "spec_val": spec_val, "general_val": general_val}


def _evals(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]


def test_best_by_general_keeps_the_least_general_perplexity(reference):
    run = reference["run"]
    evals = _evals(run)
    want = min(evals, key=lambda e: e["ppl_general"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_by"] == "general"
    assert summary["best_step"] == want["step"]
    assert summary["best_ppl_general"] == pytest.approx(want["ppl_general"], rel=1e-12)
    # the specialized pick would differ or agree; the record says which rule picked it either way
    record = json.loads((run / "best" / provenance.FILE).read_text())
    assert (record["checkpoint"], record["best_by"], record["step"]) == ("best", "general", want["step"])
    assert record["ppl_general"] == pytest.approx(want["ppl_general"], rel=1e-12)
    assert record["base_ppl_general"] == pytest.approx(evals[0]["ppl_general"], rel=1e-12)
    assert record["objective"] == "ft" and record["steps"] == 4 and record["data_source"] == "general.jsonl"
    final = json.loads((run / "final" / provenance.FILE).read_text())
    assert (final["checkpoint"], final["step"]) == ("final", 4)


def test_best_by_specialized_is_the_default(text_cache, docs_jsonl, tmp_path):
    from helpers import tiny_flags

    run = tmp_path / "r"
    assert main(["train", *tiny_flags(text_cache, docs_jsonl, run)]) == 0
    evals = _evals(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_by"] == "specialized"
    assert summary["best_step"] == min(evals, key=lambda e: e["ppl_specialized"])["step"]


def test_best_by_general_needs_a_general_set(text_cache, tmp_path, capsys):
    assert main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "r"), "--best-by", "general"]) == 2
    assert "--best-by general" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_bad_best_by_is_refused_naming_the_flag(text_cache, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "r"), "--best-by", "loss"])
    assert "--best-by" in capsys.readouterr().err


def test_the_reference_travels_into_the_cache_and_the_next_card(reference, tmp_path):
    from huggingface_hub import ModelCard

    best = reference["run"] / "best"
    docs = write_jsonl(tmp_path / "spec.jsonl", make_texts(8, seed=64))
    cache = tmp_path / "cache"
    assert main(cache_args(best, docs, cache, seq_len=32, top_k=8)) == 0
    manifest = open_cache(cache).manifest
    record = json.loads((best / provenance.FILE).read_text())
    assert manifest.model.trained_from == provenance.clean(record)
    assert manifest.model.trained_from["best_by"] == "general"
    run = tmp_path / "spec-run"
    assert main(["train", "--cache", str(cache), "--out", str(run), "--steps", "1", "--batch-size", "2",
                 "--warmup-steps", "0", "--eval-every", "1", "--save-every", "0",
                 "--eval-specialized", str(reference["spec_val"]), "--eval-general", str(reference["general_val"])]) == 0
    card = ModelCard.load(run / "best" / "README.md")
    assert card.data.to_dict()["mft"]["trained_from"]["step"] == record["step"]
    assert "starting model: a best/ checkpoint of" in card.text and "least general validation perplexity" in card.text
    # a plain model folder has no record: nothing is claimed
    assert provenance.read_provenance(str(tmp_path)) is None


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b'{"format": 2}', b"x" * (provenance.MAX_BYTES + 1)])
def test_a_hostile_record_is_ignored(tmp_path, content, caplog):
    (tmp_path / provenance.FILE).write_bytes(content)
    assert provenance.read_provenance(str(tmp_path)) is None
    assert provenance.FILE in caplog.text


def test_a_record_is_cut_to_its_known_keys_and_bounds(tmp_path):
    (tmp_path / provenance.FILE).write_text(json.dumps({
        "format": 1, "objective": "ft" * 500, "step": -3, "steps": True, "lr": 1e-4,
        "ppl_general": "12", "base_model": ["x"], "evil": {"a": 1}, "tokens": 10}))
    record = provenance.read_provenance(str(tmp_path))
    assert record == {"format": 1, "objective": ("ft" * 500)[:provenance.MAX_TEXT], "lr": 1e-4, "tokens": 10}


def test_a_record_that_is_a_link_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"format": 1, "objective": "ft"}))
    model = tmp_path / "model"
    model.mkdir()
    (model / provenance.FILE).symlink_to(target)
    assert provenance.read_provenance(str(model)) is None


@pytest.mark.parametrize("bad, key", [({"format": 2}, "format"), ({"format": 1, "step": -1}, "step"),
                                      ({"format": 1, "ppl_general": -1.0}, "ppl_general"),
                                      ({"format": 1, "objective": "x" * 201}, "objective"),
                                      ({"format": 1, "best_by": 3}, "best_by"), ("ft", "trained_from")])
def test_a_manifest_with_a_bad_trained_from_is_refused(text_cache, tmp_path, bad, key):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(text_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["trained_from"] = bad
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=f"model.trained_from.*{key}|{key}"):
        open_cache(copy)


@pytest.mark.parametrize("keep", ["none", "best", "final"])
def test_save_weights_writes_only_what_it_names(text_cache, docs_jsonl, tmp_path, keep):
    from helpers import tiny_flags

    run = tmp_path / "r"
    assert main(["train", *tiny_flags(text_cache, docs_jsonl, run), "--save-weights", keep]) == 0
    assert (run / "best").exists() == (keep == "best") and (run / "final").exists() == (keep == "final")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] is not None and summary["S"] is not None  # the numbers are all there


def test_push_to_hub_needs_final(text_cache, tmp_path, capsys):
    assert main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "r"), "--save-weights", "none",
                 "--push-to-hub", "me/model"]) == 2
    assert "--save-weights none" in capsys.readouterr().err


# -- a data budget: --train-rows -----------------------------------------------------------------------------------
def test_train_rows_draws_only_the_first_rows_over_several_epochs():
    from mft_cache.rows import Packed
    from mft_cache.trainer.data import Rows, step_rows
    import numpy as np

    packed = Packed(np.arange(40, dtype=np.int64).reshape(10, 4), np.full(10, 4, dtype=np.int32))
    rows = Rows(packed).first(3, "test")
    assert len(rows) == 3 and len(Rows(packed).first(0, "test")) == 10
    drawn = {r for s in range(8) for r in step_rows(s, 2, len(rows), seed=0)}
    assert drawn == {0, 1, 2}  # 16 draws over 5+ epochs of the 3 rows, never a row past them
    with pytest.raises(ValueError, match=r"--train-rows 11: test holds only 10 rows"):
        Rows(packed).first(11, "test")


def test_train_rows_beyond_the_cache_is_refused_before_the_run_folder(text_cache, tmp_path, capsys):
    n = len(open_cache(text_cache))
    assert main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "r"), "--train-rows", str(n + 1)]) == 2
    assert f"--train-rows {n + 1}" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad", ["-1", str(2**41)])
def test_train_rows_bounds(text_cache, tmp_path, capsys, bad):
    assert main(["train", "--cache", str(text_cache), "--out", str(tmp_path / "r"), "--train-rows", bad]) == 2
    assert "--train-rows" in capsys.readouterr().err


def test_train_rows_run_trains_on_its_budget(text_cache, docs_jsonl, tmp_path):
    from helpers import tiny_flags

    run = tmp_path / "r"
    assert main(["train", *tiny_flags(text_cache, docs_jsonl, run), "--train-rows", "2", "--save-weights", "none"]) == 0
    assert json.loads((run / "config.json").read_text())["train_rows"] == 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_plain_finetuning_on_documents_loads_no_teacher(reference):
    summary = json.loads((reference["run"] / "summary.json").read_text())
    assert summary["teacher"] == "none" and summary["teacher_loaded"] is False
    assert "plain cross-entropy" in (reference["run"] / "final" / "README.md").read_text()


def test_inspect_names_the_teacher_it_was_trained_from(reference, tmp_path, capsys):
    best = reference["run"] / "best"
    record = json.loads((best / provenance.FILE).read_text())
    record["data_source"] = "evil\n\x1b[2Jname.jsonl"  # a hostile file name stays on one line, escaped
    (best.parent / "evil").mkdir()
    import shutil

    model = reference["run"] / "evil" / "model"
    shutil.copytree(best, model)
    (model / provenance.FILE).write_text(json.dumps(record))
    cache = tmp_path / "c"
    assert main(cache_args(model, write_jsonl(tmp_path / "d.jsonl", make_texts(4, seed=65)), cache,
                           seq_len=32, top_k=8)) == 0
    capsys.readouterr()
    assert main(["inspect", str(cache)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("teacher trained from"))
    assert "least general validation perplexity" in line and "evil\\n\\x1b[2Jname.jsonl" in line
