"""Trackers (docs/HF.md, "Trackers"): `--report-to tensorboard` sends the numbers of metrics.jsonl, at the same
steps; a sweep logs a run per configuration into one folder; a tracker not installed exits 2 naming it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import config_json, tiny_flags
from mft_cache.cli import main


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


# -- trackers -----------------------------------------------------------------------------------------------
def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files in `folder`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """What metrics.jsonl says the trackers were sent."""
    want: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        prefix, keys = ("train", ("loss", "lr", "tokens_per_s")) if r["type"] == "train" else (
            "eval", ("ppl_specialized", "ppl_general", "S", "DG", "ratio"))
        for k in keys:
            if r.get(k) is not None:
                want.setdefault(f"{prefix}/{k}", {})[r["step"]] = r[k]
    return want


def assert_same_scalars(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for tag in want:
        assert set(got[tag]) == set(want[tag]), tag
        for step, value in want[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)  # stored as float32


def test_tensorboard_events_hold_the_metrics_of_a_run(cache, docs_jsonl, tmp_path):
    run = tmp_path / "tb"
    assert main(["train", *tiny_flags(cache, docs_jsonl, run), "--report-to", "tensorboard", "--run-name", "r1"]) == 0
    want = expected_scalars(run)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/ppl_specialized", "eval/ppl_general", "eval/S",
            "eval/DG", "eval/ratio"} <= set(want) and set(want["train/loss"]) == {1, 2, 3}
    assert_same_scalars(scalars(run / "tensorboard" / "r1"), want)


def test_a_sweep_logs_every_tau_as_a_run_of_one_tensorboard_folder(cache, docs_jsonl, tmp_path):
    flags = tiny_flags(cache, docs_jsonl, tmp_path / "sw")
    flags[flags.index("--steps") + 1] = "2"
    assert main(["sweep", *flags, "--taus", "0.25,1", "--no-ft", "--report-to", "tensorboard"]) == 0
    names = sorted(p.name for p in (tmp_path / "sw" / "tensorboard").iterdir())
    assert names == ["sw-mft-tau0.25", "sw-mft-tau1"]
    for name, run in zip(names, ("mft-tau0.25", "mft-tau1")):
        assert_same_scalars(scalars(tmp_path / "sw" / "tensorboard" / name), expected_scalars(tmp_path / "sw" / run))
        assert config_json(tmp_path / "sw" / run)["run_name"] == name


def test_a_tracker_that_is_not_installed_exits_2_naming_it(cache, docs_jsonl, tmp_path, capsys, monkeypatch):
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    assert main(["train", *tiny_flags(cache, docs_jsonl, tmp_path / "w"), "--report-to", "wandb"]) == 2
    assert "--report-to wandb" in capsys.readouterr().err and not (tmp_path / "w").exists()
