"""`mft regime` (docs/STUDY.md): the plan (grid, then the other taus and seeds at each method's best rate), a tiny
end-to-end study that resumes and stops between runs, its report section, and its flags' bounds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_cache.cli import main
from mft_cache.regime import RegimeConfig, best_rate, plan_cell
from mft_cache.regime_report import BEGIN, END, keep_section, replace_section
from mft_cache.testing import make_texts, write_jsonl


def _traj(*points):
    return [{"step": 4 * i, "S": s, "DG": dg} for i, (s, dg) in enumerate(points)]


# -- the plan ----------------------------------------------------------------------------------------------------
def test_best_rate_is_the_most_s_within_the_dg_budget():
    trajectories = {1e-4: _traj((0.0, 0.0), (0.10, 0.00), (0.15, 0.03)),  # 0.15 within 0.05
                    3e-4: _traj((0.0, 0.0), (0.20, 0.04), (0.30, 0.20)),  # 0.20 within 0.05: the best
                    1e-3: _traj((0.0, 0.0), (0.35, 0.50))}  # 0.0 within 0.05
    assert best_rate(trajectories, 0.05) == 3e-4
    assert best_rate(trajectories, 0.0) == 1e-4  # the most S with no forgetting at all
    # nothing within the budget: the rate whose checkpoints forget least
    assert best_rate({1e-4: _traj((0.1, 0.3)), 1e-3: _traj((0.3, 0.2))}, 0.05) == 1e-3
    assert best_rate({1e-4: []}, 0.05) is None


def test_the_plan_adds_taus_and_seeds_at_the_best_rate_once_the_grid_is_done():
    cfg = RegimeConfig(domains="d", budgets="100", lrs="1e-4,1e-3", taus="0.25,0.5", seeds="0,1,2")
    grid = plan_cell(cfg, "d", 100, {})
    assert [(p.method, p.lr, p.seed, p.stage) for p in grid] == [
        ("ft", 1e-4, 0, "grid"), ("mft", 1e-4, 0, "grid"), ("ft", 1e-3, 0, "grid"), ("mft", 1e-3, 0, "grid")]
    done = {grid[0].path: _traj((0.2, 0.0)), grid[2].path: _traj((0.3, 0.01)),  # FT best at 1e-3
            grid[1].path: _traj((0.25, 0.0))}  # MFT's grid not done yet: nothing more for MFT
    more = plan_cell(cfg, "d", 100, done)[4:]
    assert [(p.method, p.lr, p.seed, p.stage) for p in more] == [("ft", 1e-3, 1, "seed"), ("ft", 1e-3, 2, "seed")]
    done[grid[3].path] = _traj((0.1, 0.0))  # MFT best at 1e-4
    more = plan_cell(cfg, "d", 100, done)[4:]
    assert [(p.method, p.tau, p.lr, p.seed, p.stage) for p in more[2:]] == [
        ("mft", 0.5, 1e-4, 0, "tau"), ("mft", 0.25, 1e-4, 1, "seed"), ("mft", 0.25, 1e-4, 2, "seed")]
    assert more[2].path == "runs/d/b100/mft-tau0.5-lr1e-4/seed0"


# -- a tiny study, end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("regime-data")
    write_jsonl(d / "alpha_train.jsonl", make_texts(10, seed=71))
    write_jsonl(d / "alpha_val.jsonl", make_texts(3, seed=72))
    write_jsonl(d / "general_val.jsonl", make_texts(3, seed=73))
    write_jsonl(d / "general_pool.jsonl", make_texts(12, seed=74) + make_texts(3, seed=73))
    return d


def _argv(llama, assets, out, *extra):
    return ["regime", "--model", str(llama), "--out", str(out), "--domains", "alpha", "--data-dir", str(assets),
            "--budgets", "64", "--lrs", "1e-3,3e-3", "--taus", "0.25,0.5", "--seeds", "0,1", "--seq-len", "32",
            "--steps", "2", "--batch-size", "2", "--warmup-steps", "0", "--eval-every", "1",
            "--eval-max-sequences", "2", "--eval-general", str(assets / "general_val.jsonl"),
            "--reference-data", str(assets / "general_pool.jsonl"), "--reference-steps", "2",
            "--reference-documents", "8", "--cache-top-k", "8", "--report", str(out.parent / "STUDIES.md"), *extra]


@pytest.fixture(scope="module")
def study(llama, assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("regime") / "study"
    # a first part stops after its first run (--max-minutes is checked between runs)...
    assert main(_argv(llama, assets, out, "--max-minutes", "1e-9")) == 0
    first = json.loads((out / "regime.json").read_text())
    assert len(first["runs"]) == 1
    # ... and a rerun continues to the end
    assert main(_argv(llama, assets, out)) == 0
    return out


def test_the_study_runs_its_plan_from_the_reference(study, assets):
    record = json.loads((study / "regime.json").read_text())
    runs = record["runs"]
    # grid 4, the other tau 1, the other seed once per method 2
    assert sorted(r["stage"] for r in runs.values()) == ["grid"] * 4 + ["seed"] * 2 + ["tau"]
    assert {r["rows"] for r in runs.values()} == {2} and {r["epochs"] for r in runs.values()} == {2.0}
    ft = {r["lr"]: r["trajectory"] for r in runs.values() if r["method"] == "ft" and r["stage"] == "grid"}
    ft_seed = next(r for r in runs.values() if r["method"] == "ft" and r["stage"] == "seed")
    assert ft_seed["lr"] == best_rate(ft, 0.05)
    # the reference is the start: its best/ (picked by general perplexity) is every cache's teacher
    ref = json.loads((study / "reference" / "summary.json").read_text())
    assert ref["best_by"] == "general" and (study / "reference" / "best" / "mft_checkpoint.json").exists()
    general = (study / "data" / "general_train.jsonl").read_text()
    assert all(json.loads(x)["text"] not in general for x in (assets / "general_val.jsonl").read_text().splitlines())
    manifest = json.loads((study / "caches" / "alpha" / "manifest.json").read_text())
    assert manifest["model"]["trained_from"]["best_by"] == "general"
    # runs keep no weights, only their numbers
    assert not any((study / p / "final").exists() for p in runs)


def test_the_report_section_is_written_between_its_markers(study):
    text = (study.parent / "STUDIES.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "### alpha" in text and "| 64 | FT |" in text and "MFT tau 0.25" in text
    assert (study.parent / "docs" / "regime_alpha_frontier.png").stat().st_size > 0
    assert (study.parent / "docs" / "regime_alpha_trajectory.png").stat().st_size > 0


def test_a_rerun_of_a_finished_study_trains_nothing(study, llama, assets, monkeypatch):
    import mft_cache.trainer.train as train_module

    calls = []
    real = train_module.train
    monkeypatch.setattr(train_module, "train", lambda cfg, *a, **k: calls.append(cfg.out) or real(cfg, *a, **k))
    before = (study / "regime.json").read_text()
    assert main(_argv(llama, assets, study)) == 0
    assert calls == [str(study / "reference")]  # finished: it returns its summary at once
    assert json.loads((study / "regime.json").read_text())["runs"] == json.loads(before)["runs"]


def test_report_only_trains_nothing(study, llama, assets, monkeypatch):
    import mft_cache.trainer.train as train_module

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained"))
    assert main(_argv(llama, assets, study, "--report-only")) == 0


def test_sections_of_two_commands_live_side_by_side():
    text = replace_section("# Studies\n\nstudy tables\n", "regime A")
    assert text == f"# Studies\n\nstudy tables\n\n{BEGIN}\nregime A\n{END}\n"
    assert replace_section(text, "regime B").count("regime B") == 1 and "regime A" not in replace_section(text, "B")
    # mft study rewrites the whole file: the regime section it held stays
    assert keep_section(text, "# Studies\n\nnew study tables\n").endswith(f"{BEGIN}\nregime A\n{END}\n")
    assert keep_section("no section", "new") == "new"


# -- flags -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--domains", "../x"), ("--domains", "A"), ("--domains", "a,a"),
                                         ("--budgets", "0"), ("--budgets", "x"), ("--lrs", "nan"), ("--lrs", "-1"),
                                         ("--taus", "1.5"), ("--seeds", "-1"), ("--lrs", ",".join(["1e-4"] * 2)),
                                         ("--budgets", ",".join(str(i) for i in range(1, 20))),
                                         ("--dg-budget", "-0.1"), ("--reference-steps", "-1"),
                                         ("--cache-top-k", "0"), ("--max-minutes", "-1")])
def test_bad_flags_are_refused_naming_them(flag, value, tmp_path, capsys):
    assert main(["regime", "--out", str(tmp_path / "s"), "--eval-general", "x.jsonl", flag, value]) == 2
    assert flag in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_a_missing_domain_file_is_named(assets, tmp_path, capsys):
    assert main(["regime", "--out", str(tmp_path / "s"), "--domains", "alpha,beta", "--data-dir", str(assets),
                 "--eval-general", str(assets / "general_val.jsonl")]) == 2
    assert "beta_train.jsonl" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_a_foreign_folder_is_refused(assets, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "thesis.tex").write_text("mine")
    assert main(["regime", "--out", str(tmp_path / "s"), "--domains", "alpha", "--data-dir", str(assets),
                 "--eval-general", str(assets / "general_val.jsonl")]) == 2
    assert "thesis.tex" in capsys.readouterr().err
