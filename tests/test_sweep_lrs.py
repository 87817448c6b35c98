"""`mft sweep` compares like with like: MFT runs at every rate of --lrs as FT does (--mft-lrs all, the default), or
at --lr alone (--mft-lrs lr, the grid before the option); and sweep.md's "Each method at its best" reads each method
over all its checkpoints, against numbers computed here by hand. No training: the grids are TrainConfigs, and the
sweeps through `mft sweep` run a stand-in for train that writes a made-up trajectory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_cache.cli import main
from mft_cache.trainer import sweep as sweep_module
from mft_cache.trainer.config import SweepConfig, TrainConfig
from mft_cache.trainer.sweep import (COLUMNS, SUMMARY_EXTRA, _RUN_FOLDER, frontier, frontier_markdown, sweep,
                                     sweep_markdown, sweep_runs)


# -- the grid ------------------------------------------------------------------------------------------------
def _grid(mft_lrs: str, lrs=(2e-4, 5e-4), seeds=(0, 1), with_ft=True) -> list[tuple]:
    cfg = TrainConfig(lr=5e-4, out="runs/s")
    runs = sweep_runs(cfg, [0.1, 0.25], with_ft, list(seeds), list(lrs), mft_lrs)
    for r in runs:  # the run's own configuration is what its name says
        assert (r["cfg"].lr, r["cfg"].seed, r["cfg"].out) == (r["lr"], r["seed"], str(Path("runs/s") / r["path"]))
        assert r["cfg"].objective == ("ft" if r["name"].startswith("ft") else "mft")
        assert _RUN_FOLDER.match(r["name"]), r["name"]
    return [(r["path"], r["lr"], r["cfg"].tau) for r in runs]


def test_by_default_mft_runs_at_every_rate_seed_by_seed():
    per_seed = ["mft-tau0.1-lr2e-4", "mft-tau0.1-lr5e-4", "mft-tau0.25-lr2e-4", "mft-tau0.25-lr5e-4", "ft-lr2e-4",
                "ft-lr5e-4"]
    grid = _grid("all")
    assert [p for p, _, _ in grid] == [f"{n}/seed{s}" for s in (0, 1) for n in per_seed]  # 2 x (2 x 2 + 2) runs
    assert [(lr, tau) for _, lr, tau in grid[:6]] == [(2e-4, 0.1), (5e-4, 0.1), (2e-4, 0.25), (5e-4, 0.25),
                                                      (2e-4, 1.0), (5e-4, 1.0)]


def test_mft_lrs_lr_keeps_the_old_grid():
    per_seed = ["mft-tau0.1-lr5e-4", "mft-tau0.25-lr5e-4", "ft-lr2e-4", "ft-lr5e-4"]
    grid = _grid("lr")
    assert [p for p, _, _ in grid] == [f"{n}/seed{s}" for s in (0, 1) for n in per_seed]  # 2 x (2 + 2) runs
    assert [lr for _, lr, _ in grid[:4]] == [5e-4, 5e-4, 2e-4, 5e-4]


@pytest.mark.parametrize("mft_lrs", ["all", "lr"])
def test_one_rate_and_one_seed_name_the_runs_without_a_suffix(mft_lrs):
    grid = _grid(mft_lrs, lrs=[5e-4], seeds=[3])
    assert [p for p, _, _ in grid] == ["mft-tau0.1", "mft-tau0.25", "ft"]


def test_no_ft_with_several_rates_is_mft_at_each():
    assert [p for p, _, _ in _grid("all", seeds=[0], with_ft=False)] == [
        "mft-tau0.1-lr2e-4", "mft-tau0.1-lr5e-4", "mft-tau0.25-lr2e-4", "mft-tau0.25-lr5e-4"]
    SweepConfig(lrs="2e-4,5e-4", no_ft=True)  # legal now: MFT uses the rates


# -- bad values: refused naming the flag, nothing written -------------------------------------------------------
@pytest.mark.parametrize("value", ["both", "ALL", "", "lrs"])
def test_a_bad_mft_lrs_is_refused_naming_the_flag(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--out", str(tmp_path / "s"), "--mft-lrs", value])
    assert e.value.code == 2 and "--mft-lrs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--mft-lrs"):
        SweepConfig(mft_lrs=value)
    with pytest.raises(ValueError, match="--mft-lrs"):
        sweep(TrainConfig(out=str(tmp_path / "s")), [0.25], mft_lrs=value)
    assert not (tmp_path / "s").exists()


def test_a_bad_mft_lrs_in_a_config_file_is_refused_naming_the_key(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"sweep:\n  out: {tmp_path / 's'}\n  mft_lrs: both\n")
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "mft_lrs" in err and "both" in err, err
    assert not (tmp_path / "s").exists()


def test_several_rates_for_no_run_are_refused(tmp_path, capsys):
    """--mft-lrs lr and --no-ft: the rates of --lrs would be no run's."""
    argv = ["sweep", "--out", str(tmp_path / "s"), "--lrs", "1e-4,2e-4", "--no-ft", "--mft-lrs", "lr"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ("--lrs", "--no-ft", "--mft-lrs")), err
    with pytest.raises(ValueError, match="--mft-lrs lr"):
        sweep(TrainConfig(out=str(tmp_path / "s"), lr=1e-4), [0.25], with_ft=False, lrs=[1e-4, 2e-4], mft_lrs="lr")
    assert not (tmp_path / "s").exists()


# -- each method at its best, by hand ----------------------------------------------------------------------------
def _row(name, objective, tau, lr, seed, traj):
    return {"run": name, "objective": objective, "tau": tau, "lr": lr, "seed": seed, "path": f"{name}/seed{seed}",
            "trajectory": [{"step": 10 * i, "S": s, "DG": dg} for i, (s, dg) in enumerate(traj)]}


ROWS = [  # step 0 is the base (0, 0) in every run; it is no method's checkpoint
    _row("mft-tau0.25-lr1e-4", "mft", 0.25, 1e-4, 0, [(0, 0), (0.12, -0.02), (0.22, -0.005), (0.28, 0.03)]),
    _row("mft-tau0.25-lr5e-4", "mft", 0.25, 5e-4, 0, [(0, 0), (0.18, -0.03), (0.33, 0.04), (0.45, 0.09)]),
    _row("mft-tau0.5-lr1e-4", "mft", 0.5, 1e-4, 0, [(0, 0), (0.5, 0.01)]),  # one rate only; beyond FT's S
    _row("ft-lr1e-4", "ft", 1.0, 1e-4, 0, [(0, 0), (0.10, 0.0), (0.20, 0.04), (0.30, 0.10)]),
    _row("ft-lr5e-4", "ft", 1.0, 5e-4, 0, [(0, 0), (0.15, -0.01), (0.25, 0.03), (0.40, 0.20)]),
    _row("ft-lr1e-4", "ft", 1.0, 1e-4, 1, [(0, 0), (0.35, 0.06)]),  # a second seed: pooled with the first
]


def _methods() -> dict:
    front = frontier(ROWS)
    assert front["dg_max"] == [0.0, 0.05] and front["match_dg"] == 0.05
    return {m["method"]: m for m in front["methods"]}


def test_ft_at_its_best_over_every_rate_seed_and_checkpoint():
    ft = _methods()["ft"]
    assert ft["lrs"] == [1e-4, 5e-4] and ft["seeds"] == [0, 1] and ft["runs"] == 3 and ft["checkpoints"] == 7
    # DG <= 0: (0.10, 0.0) and (0.15, -0.01); DG <= 0.05 adds (0.20, 0.04) and (0.25, 0.03)
    assert ft["best"]["0"]["S"] == 0.15 and ft["best"]["0"]["path"] == "ft-lr5e-4/seed0"
    assert (ft["best"]["0.05"]["S"], ft["best"]["0.05"]["DG"], ft["best"]["0.05"]["step"]) == (0.25, 0.03, 20)
    # the front: (0.10, 0.0) loses to (0.15, -0.01), (0.20, 0.04) to (0.25, 0.03), (0.30, 0.10) to seed 1's (0.35, 0.06)
    assert ft["front"] == [[0.15, -0.01], [0.25, 0.03], [0.35, 0.06], [0.40, 0.20]]
    assert "against_ft" not in ft
    at = {r["lr"]: r for r in ft["by_lr"]}
    assert at[1e-4]["checkpoints"] == 4 and (at[1e-4]["best"]["0"]["S"], at[1e-4]["best"]["0.05"]["S"]) == (0.10, 0.20)
    assert at[5e-4]["checkpoints"] == 3 and (at[5e-4]["best"]["0"]["S"], at[5e-4]["best"]["0.05"]["S"]) == (0.15, 0.25)


def test_mft_at_its_best_against_ft_at_its_best_and_at_each_rate():
    mft = _methods()["mft-tau0.25"]
    assert mft["lrs"] == [1e-4, 5e-4] and mft["checkpoints"] == 6
    assert mft["best"]["0"]["S"] == 0.22  # (0.22, -0.005) at 1e-4; (0.18, -0.03) at 5e-4 specializes less
    assert (mft["best"]["0.05"]["S"], mft["best"]["0.05"]["DG"]) == (0.33, 0.04)  # at 5e-4
    assert mft["front"] == [[0.18, -0.03], [0.22, -0.005], [0.28, 0.03], [0.33, 0.04], [0.45, 0.09]]
    # FT's checkpoints with S >= 0.33: (0.40, 0.20) at 5e-4 and (0.35, 0.06) at 1e-4, seed 1: the lowest DG is 0.06
    m = mft["against_ft"]
    assert (m["S"], m["dg_mft"], m["dg_ft_lowest"]) == (0.33, 0.04, 0.06)
    assert m["difference"] == pytest.approx(0.06 - 0.04)
    assert (m["ft_point"]["path"], m["ft_point"]["step"]) == ("ft-lr1e-4/seed1", 10)
    at = {r["lr"]: r for r in mft["by_lr"]}
    # 1e-4: MFT's best within 0.05 is (0.28, 0.03); FT at 1e-4 with S >= 0.28: (0.30, 0.10), (0.35, 0.06)
    assert at[1e-4]["checkpoints"] == 3 and at[1e-4]["best"]["0"]["S"] == 0.22
    a = at[1e-4]["against_ft"]
    assert (a["S"], a["dg_mft"], a["dg_ft_lowest"]) == (0.28, 0.03, 0.06) and a["difference"] == pytest.approx(0.03)
    # 5e-4: MFT's (0.33, 0.04); FT at 5e-4 with S >= 0.33: (0.40, 0.20) alone
    assert at[5e-4]["best"]["0"]["S"] == 0.18
    b = at[5e-4]["against_ft"]
    assert (b["S"], b["dg_mft"], b["dg_ft_lowest"]) == (0.33, 0.04, 0.20) and b["difference"] == pytest.approx(0.16)


def test_no_checkpoint_within_the_bound_and_an_s_ft_never_reached():
    mft = _methods()["mft-tau0.5"]
    assert mft["best"]["0"] is None  # the base's DG 0 at step 0 does not count
    assert mft["best"]["0.05"]["S"] == 0.5
    m = mft["against_ft"]  # FT's largest S is 0.40
    assert m["dg_ft_lowest"] is None and m["difference"] is None and m["ft_point"] is None
    assert [r["lr"] for r in mft["by_lr"]] == [1e-4]
    no_ft = {m["method"]: m for m in frontier([r for r in ROWS if r["objective"] != "ft"])["methods"]}
    assert set(no_ft) == {"mft-tau0.25", "mft-tau0.5"} and no_ft["mft-tau0.25"]["against_ft"]["dg_ft_lowest"] is None


def test_the_section_in_sweep_md_says_the_same_numbers():
    md = frontier_markdown(frontier(ROWS))
    lines = md.splitlines()
    assert lines[0] == "## Each method at its best"
    first = md.partition("### At each rate")[0].splitlines()  # the methods' table; then the one per rate
    rows = {x.split(" | ")[0].lstrip("| "): x for x in first if x.startswith("| ") and "---" not in x}
    assert rows["ft"] == "| ft | 1e-4, 5e-4 | 2 | 7 | 0.1500 | 0.2500 | 0.0300 | ft-lr5e-4, seed 0, step 20 |  |  |"
    assert rows["mft-tau0.25"] == ("| mft-tau0.25 | 1e-4, 5e-4 | 1 | 6 | 0.2200 | 0.3300 | 0.0400 | "
                                   "mft-tau0.25-lr5e-4, seed 0, step 20 | 0.0600 | +0.0200 |")
    assert rows["mft-tau0.5"].endswith("| 1 | none | 0.5000 | 0.0100 | mft-tau0.5-lr1e-4, seed 0, step 10 | "
                                       "FT never reached that S | n/a |")
    assert "### At each rate" in md
    assert ("| mft-tau0.25 | 1e-4 | 3 | 0.2200 | 0.2800 | 0.0300 | mft-tau0.25-lr1e-4, seed 0, step 30 | 0.0600 | "
            "+0.0300 |") in lines
    assert "| mft-tau0.25 | 5e-4 | 3 | 0.1800 | 0.3300 | 0.0400 | mft-tau0.25-lr5e-4, seed 0, step 20 | 0.2000 | " \
           "+0.1600 |" in lines
    assert "which favours FT" in md  # tau 0.5 ran at fewer rates than FT
    same = [r for r in ROWS if r["run"] != "mft-tau0.5-lr1e-4"]
    assert "FT and every MFT tau ran at the same learning rates" in frontier_markdown(frontier(same))
    one_rate = frontier_markdown(frontier([r for r in ROWS if r["lr"] == 1e-4]))
    assert "### At each rate" not in one_rate and "## Each method at its best" in one_rate


def test_sweep_md_keeps_its_sections_and_adds_the_new_one_before_the_runs():
    rows = [{**r, "S": r["trajectory"][-1]["S"], "DG": r["trajectory"][-1]["DG"], "ratio": None, "best_step": None,
             "best_ppl_specialized": None, "best_ppl_general": None, "wall_time_s": None} for r in ROWS]
    md = sweep_markdown(rows, [], [0, 1], [1e-4, 5e-4])
    assert md.index("## Over seeds") < md.index("## Each method at its best") < md.index("## Runs")
    assert "| run | seed | S | DG | DG/S | best step |" in md  # the table of runs as before
    assert "## Each method at its best" not in sweep_markdown(rows[:1], [], [0], [1e-4])  # one seed, one rate


# -- through `mft sweep`: a stand-in for train --------------------------------------------------------------------
def _fake_train(calls: list):
    """A train that writes a trajectory made up from the run's objective, tau, lr and seed, and its summary."""
    def train(run, tracking, base=None):
        out = Path(run.out)
        out.mkdir(parents=True, exist_ok=True)
        k = (0.5 if run.objective == "ft" else run.tau) * (1 + run.lr * 1000) + 0.01 * run.seed
        points = [(0.0, 0.0), (0.1 * k, 0.02 * k * (run.objective == "ft") - 0.01), (0.2 * k, 0.1 * k - 0.02)]
        with open(out / "metrics.jsonl", "w") as f:
            for step, (s, dg) in enumerate(points):
                f.write(json.dumps({"type": "eval", "step": step, "S": s, "DG": dg}) + "\n")
        calls.append((run.out, run.objective, run.tau, run.lr, run.seed))
        s, dg = points[-1]
        return {**{c: None for c in COLUMNS}, **{c: None for c in SUMMARY_EXTRA}, "objective": run.objective,
                "tau": run.tau, "S": s, "DG": dg, "teacher_loaded": False}
    return train


@pytest.mark.parametrize("mft_lrs, mft_runs", [("all", 4), ("lr", 2)])
def test_mft_sweep_runs_the_grid_and_writes_the_frontier(mft_lrs, mft_runs, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_module, "train", _fake_train(calls))
    out = tmp_path / "sw"
    argv = ["sweep", "--cache", str(tmp_path / "no-cache"), "--out", str(out), "--taus", "0.1,0.25", "--lrs", "2e-4",
            "--lr", "5e-4", "--seeds", "0,1", *(["--mft-lrs", mft_lrs] if mft_lrs != "all" else [])]
    assert main(argv) == 0
    assert [c[4] for c in calls] == [0] * (mft_runs + 2) + [1] * (mft_runs + 2)  # seed by seed
    mft_rates = [2e-4, 5e-4] if mft_lrs == "all" else [5e-4]
    assert [(c[1], c[2], c[3]) for c in calls[:mft_runs + 2]] == [
        *(("mft", t, lr) for t in (0.1, 0.25) for lr in mft_rates), ("ft", 1.0, 2e-4), ("ft", 1.0, 5e-4)]
    record = json.loads((out / "sweep.json").read_text())
    assert record["lrs"] == [2e-4, 5e-4] and record["mft_lr"] == 5e-4  # --lr joins --lrs
    assert record["mft_lrs"] == mft_lrs and record["mft_rates"] == mft_rates
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        ["ft-lr2e-4", "ft-lr5e-4", *(f"mft-tau{t}-lr{lr}" for t in ("0.1", "0.25")
                                                    for lr in (["2e-4", "5e-4"] if mft_lrs == "all" else ["5e-4"]))])
    methods = {m["method"]: m for m in record["frontier"]["methods"]}
    assert list(methods) == ["ft", "mft-tau0.1", "mft-tau0.25"]
    assert methods["mft-tau0.1"]["lrs"] == mft_rates and methods["ft"]["checkpoints"] == 2 * 2 * 2
    # recomputed from the runs' trajectories: every evaluation after step 0
    ft_points = [(p["S"], p["DG"]) for r in record["runs"] if r["objective"] == "ft" for p in r["trajectory"][1:]]
    best = max(s for s, dg in ft_points if dg <= 0.05)
    assert methods["ft"]["best"]["0.05"]["S"] == pytest.approx(best)
    md = (out / "sweep.md").read_text()
    assert "## Over seeds" in md and "## DG at matched S" in md and "## Each method at its best" in md
    assert "### At each rate" in md and ("which favours FT" in md) == (mft_lrs == "lr")
    assert (out / "dg_vs_s.png").stat().st_size > 1000
