"""Trackers (docs/HF.md, "Trackers"): `--report-to tensorboard` sends the numbers of metrics.jsonl, at the same
steps; a sweep logs a run per configuration into one folder; a tracker not installed exits 2 naming it."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_same_scalars, config_json, expected_scalars, tensorboard_scalars, tiny_flags
from mft_cache.cli import main


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


def test_tensorboard_events_hold_the_metrics_of_a_run(cache, docs_jsonl, tmp_path):
    run = tmp_path / "tb"
    assert main(["train", *tiny_flags(cache, docs_jsonl, run), "--report-to", "tensorboard", "--run-name", "r1"]) == 0
    want = expected_scalars(run)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/ppl_specialized", "eval/ppl_general", "eval/S",
            "eval/DG", "eval/ratio"} <= set(want) and set(want["train/loss"]) == {1, 2, 3}
    assert_same_scalars(tensorboard_scalars(run / "tensorboard" / "r1"), want)


def test_a_sweep_logs_every_tau_as_a_run_of_one_tensorboard_folder(cache, docs_jsonl, tmp_path):
    flags = tiny_flags(cache, docs_jsonl, tmp_path / "sw")
    flags[flags.index("--steps") + 1] = "2"
    assert main(["sweep", *flags, "--taus", "0.25,1", "--no-ft", "--report-to", "tensorboard"]) == 0
    names = sorted(p.name for p in (tmp_path / "sw" / "tensorboard").iterdir())
    assert names == ["sw-mft-tau0.25", "sw-mft-tau1"]
    for name, run in zip(names, ("mft-tau0.25", "mft-tau1")):
        assert_same_scalars(tensorboard_scalars(tmp_path / "sw" / "tensorboard" / name),
                            expected_scalars(tmp_path / "sw" / run))
        assert config_json(tmp_path / "sw" / run)["run_name"] == name


def test_a_tracker_that_is_not_installed_exits_2_naming_it(cache, docs_jsonl, tmp_path, capsys, monkeypatch):
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    assert main(["train", *tiny_flags(cache, docs_jsonl, tmp_path / "w"), "--report-to", "wandb"]) == 2
    assert "--report-to wandb" in capsys.readouterr().err and not (tmp_path / "w").exists()
