"""`mft sweep` over seeds and learning rates: DG at matched S, the spread over seeds, every trajectory point kept,
and the standard error of a perplexity over evaluation sequences, each against a plain hand computation."""
from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_texts, write_jsonl
from mft_cache.cli import main, parse
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.trainer.evaluate import perplexity_se, sequence_moments
from mft_cache.trainer.matched import dg_at, first_passage, lowest_dg_at_or_above, match, spread
from mft_cache.trainer.sweep import COLUMNS, POINT_KEYS, add_matches, aggregate, lr_tag, run_name

SEQ = 32
ROOT = Path(__file__).resolve().parents[1]


# -- DG at matched S ------------------------------------------------------------------------------------------
FT = [(0.0, 0.0), (0.2, 0.1), (0.4, 0.3)]  # (S, DG) in step order


@pytest.mark.parametrize("s, want", [(0.0, 0.0), (0.1, 0.05), (0.2, 0.1), (0.3, 0.2), (0.4, 0.3), (0.35, 0.25)])
def test_dg_at_is_piecewise_linear_in_s(s, want):
    assert dg_at(FT, s) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("s", [0.41, 1.0, -0.01])
def test_dg_at_outside_the_range_ft_reached_is_none(s):
    assert dg_at(FT, s) is None
    m = match(s, 0.1, FT)
    assert not m["in_range"] and m["dg_ft"] is None and m["ratio"] is None and m["difference"] is None
    assert (m["ft_s_min"], m["ft_s_max"]) == (0.0, 0.4)


def test_a_non_monotone_ft_trajectory_is_read_where_s_was_first_reached():
    # S falls back from 0.3 to 0.2 at the third evaluation, then climbs to 0.5
    ft = [(0.0, 0.0), (0.3, 0.2), (0.2, 0.5), (0.5, 0.8)]
    assert first_passage(ft) == [(0.0, 0.0), (0.3, 0.2), (0.5, 0.8)]
    assert dg_at(ft, 0.25) == pytest.approx(0.2 * 0.25 / 0.3)  # on the way up, not off the dip (which gives 0.35)
    assert dg_at(ft, 0.4) == pytest.approx(0.2 + 0.6 * (0.4 - 0.3) / (0.5 - 0.3))
    assert dg_at(ft, 0.5) == pytest.approx(0.8) and dg_at(ft, 0.51) is None
    assert lowest_dg_at_or_above(ft, 0.2) == 0.2  # of every point with S >= 0.2: (0.3, 0.2), (0.2, 0.5), (0.5, 0.8)
    assert dg_at([(0.1, 0.4)], 0.1) == 0.4 and dg_at([], 0.1) is None  # a single point; nothing


def test_match_reports_difference_ratio_and_the_lowest_ft_checkpoint():
    m = match(0.3, 0.1, FT)
    assert m["in_range"] and m["dg_ft"] == pytest.approx(0.2)
    assert m["difference"] == pytest.approx(0.1) and m["ratio"] == pytest.approx(2.0)
    assert m["dg_ft_lowest"] == pytest.approx(0.3) and m["difference_lowest"] == pytest.approx(0.2)  # (0.4, 0.3)
    neg = match(0.3, -0.05, FT)  # MFT lowers general perplexity: no ratio, the difference still says it
    assert neg["ratio"] is None and neg["difference"] == pytest.approx(0.25)


# -- the spread over seeds -----------------------------------------------------------------------------------
def test_spread_is_mean_sample_std_min_max_of_the_values_given():
    sp = spread([1.0, 2.0, 4.0, None])
    assert sp["n"] == 3 and sp["mean"] == pytest.approx(7 / 3)
    assert sp["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert (sp["min"], sp["max"]) == (1.0, 4.0)
    assert spread([0.5]) == {"n": 1, "mean": 0.5, "std": None, "min": 0.5, "max": 0.5}
    assert spread([None])["n"] == 0


def _row(name, objective, seed, lr, s, dg, traj):
    return {"run": name, "objective": objective, "tau": 1.0 if objective == "ft" else 0.25, "seed": seed, "lr": lr,
            "path": f"{name}/seed{seed}", "S": s, "DG": dg, "ratio": dg / s, "final_S": s, "final_DG": dg,
            "trajectory": [{"step": 10 * i, "S": a, "DG": b} for i, (a, b) in enumerate(traj)]}


def test_aggregate_over_seeds_against_a_hand_computation():
    rows = [_row("mft", "mft", 0, 1e-4, 0.3, 0.05, [(0, 0), (0.3, 0.05)]),
            _row("ft", "ft", 0, 1e-4, 0.4, 0.3, [(0, 0), (0.2, 0.1), (0.4, 0.3)]),
            _row("mft", "mft", 1, 1e-4, 0.2, 0.02, [(0, 0), (0.2, 0.02)]),
            _row("ft", "ft", 1, 1e-4, 0.4, 0.2, [(0, 0), (0.4, 0.2)]),
            _row("mft", "mft", 2, 1e-4, 0.5, 0.1, [(0, 0), (0.5, 0.1)]),  # beyond FT's S: out of range
            _row("ft", "ft", 2, 1e-4, 0.45, 0.25, [(0, 0), (0.45, 0.25)])]
    add_matches(rows)
    mft, ft = aggregate(rows)
    assert mft["seeds"] == [0, 1, 2] and ft["seeds"] == [0, 1, 2]
    # S 0.3, 0.2, 0.5: mean 1/3, deviations -1/30, -4/30, 5/30, sample variance (1 + 16 + 25) / 900 / 2
    assert mft["S"]["mean"] == pytest.approx(1 / 3) and mft["S"]["std"] == pytest.approx(math.sqrt(21) / 30)
    assert mft["ratio"]["mean"] == pytest.approx((0.05 / 0.3 + 0.02 / 0.2 + 0.1 / 0.5) / 3)  # the mean of the ratios
    assert ft["DG"]["min"] == 0.2 and ft["DG"]["max"] == 0.3 and "matched" not in ft
    [m] = mft["matched"]
    assert m["ft_run"] == "ft" and m["same_lr"] and m["seeds"] == 3 and m["in_range"] == 2
    # seed 0: FT's DG at S 0.3 is 0.2 (between (0.2, 0.1) and (0.4, 0.3)); seed 1: 0.2 * 0.2 / 0.4 = 0.1
    assert m["dg_ft"]["mean"] == pytest.approx(0.15) and m["dg_ft"]["std"] == pytest.approx(math.sqrt(0.005))
    assert m["difference"]["min"] == pytest.approx(0.08) and m["difference"]["max"] == pytest.approx(0.15)
    assert m["ratio"]["mean"] == pytest.approx((0.2 / 0.05 + 0.1 / 0.02) / 2)
    seed2 = rows[4]["matched"][0]
    assert not seed2["in_range"] and seed2["ft_s_max"] == 0.45 and seed2["dg_ft"] is None
    assert [p["step"] for p in seed2["points"]] == [0, 10] and seed2["points"][0]["dg_ft"] == 0.0  # every point
    assert rows[0]["S_std"] == pytest.approx(math.sqrt(21) / 30) and rows[1]["n_seeds"] == 3  # on each row, for the csv


def test_run_names_carry_the_learning_rate_only_when_there_are_several():
    assert run_name("ft", 1.0) == "ft" and run_name("mft", 0.25) == "mft-tau0.25"
    assert run_name("ft", 1.0, 1e-4) == "ft-lr1e-4" and run_name("mft", 0.1, 2.5e-4) == "mft-tau0.1-lr2.5e-4"
    assert lr_tag(5e-4) == "5e-4" and lr_tag(1.0) == "1e0"


# -- the standard error of a perplexity ----------------------------------------------------------------------
def _se_by_hand(x: list[float], n: list[int]) -> tuple[float, float]:
    x, n = np.array(x, dtype=np.float64), np.array(n, dtype=np.float64)
    r = x.sum() / n.sum()
    m = len(x)
    se_r = math.sqrt(((x - r * n) ** 2).sum() / (m * (m - 1))) / n.mean()
    return math.exp(r), math.exp(r) * se_r


def test_perplexity_se_against_a_hand_computation():
    x, n = [10.0, 12.5, 9.0, 30.0], [5, 6, 4, 11]
    moments = sequence_moments(torch.tensor(x + [0.0], dtype=torch.float64), torch.tensor(n + [0], dtype=torch.float64))
    ppl, se = perplexity_se(moments)  # the sequence without a trained token does not count
    want_ppl, want_se = _se_by_hand(x, n)
    assert ppl == pytest.approx(want_ppl, rel=1e-12) and se == pytest.approx(want_se, rel=1e-10)
    # sums from two halves (two batches, or two processes) give the same
    half = sequence_moments(torch.tensor(x[:2]).double(), torch.tensor(n[:2]).double()) + sequence_moments(
        torch.tensor(x[2:]).double(), torch.tensor(n[2:]).double())
    assert perplexity_se(half) == pytest.approx((ppl, se), rel=1e-12)
    # equal lengths: ppl * sample std of the per-sequence mean NLL / sqrt(m)
    per_seq = [2.0, 2.5, 1.5, 3.0]
    ppl, se = perplexity_se(sequence_moments(torch.tensor(per_seq).double() * 8, torch.full((4,), 8.0).double()))
    assert ppl == pytest.approx(math.exp(2.25)) and se == pytest.approx(ppl * statistics.stdev(per_seq) / 2)
    assert perplexity_se(sequence_moments(torch.tensor([4.0]).double(), torch.tensor([2.0]).double()))[1] is None


@pytest.mark.parametrize("impl", ["fused", "checkpointed", "transformers"])
def test_per_row_losses_add_up_to_the_batch_loss(llama, impl):
    from transformers import AutoModelForCausalLM

    from mft_cache.trainer.loss_module import StudentLoss

    module = StudentLoss(AutoModelForCausalLM.from_pretrained(llama), chunk_size=7, impl=impl).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 12), generator=g)
    length = torch.tensor([12, 7, 1])  # the last row has no label
    mask = torch.arange(11)[None, :] < (length[:, None] - 1)
    with torch.no_grad():
        total, count = module(input_ids=ids, length=length, label_mask=mask)
        rows, counts = module(input_ids=ids, length=length, label_mask=mask, per_row=True)
        one, _ = module(input_ids=ids[1:2], length=length[1:2], label_mask=mask[1:2])
    assert counts.tolist() == [11, 6, 0] and rows[2] == 0
    torch.testing.assert_close(rows.sum(), total, rtol=1e-5, atol=0)
    torch.testing.assert_close(rows[1], one, rtol=1e-5, atol=1e-6)


# -- a real sweep over two seeds and two learning rates --------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_out(llama, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("sweep-seeds")
    train = write_jsonl(d / "train.jsonl", make_texts(16, seed=21))
    spec = write_jsonl(d / "spec.jsonl", make_texts(6, seed=22))
    gen = write_jsonl(d / "gen.jsonl", make_texts(6, seed=23, min_words=5, max_words=30))
    cache = d / "cache"
    build_cache(CacheConfig(model=str(llama), data=str(train), out=str(cache), seq_len=SEQ, top_k=16))
    out = d / "sw"
    argv = ["sweep", "--cache", str(cache), "--out", str(out), "--steps", "3", "--batch-size", "2", "--lr", "3e-3",
            "--warmup-steps", "1", "--eval-every", "1", "--save-every", "0", "--eval-specialized", str(spec),
            "--eval-general", str(gen), "--eval-max-sequences", "3", "--taus", "0.5", "--seeds", "0,1",
            "--lrs", "1e-2", "--mft-lrs", "lr"]  # MFT at --lr alone (tests/test_sweep_lrs.py: MFT at every rate)
    assert main(argv) == 0
    return {"out": out, "spec": spec, "json": json.loads((out / "sweep.json").read_text())}


def _evals(folder: Path) -> list[dict]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: x.get(k) for k in POINT_KEYS} for x in lines if x["type"] == "eval"]


def test_a_sweep_keeps_every_trajectory_point_of_every_run(sweep_out):
    out, record = sweep_out["out"], sweep_out["json"]
    assert record["seeds"] == [0, 1] and record["lrs"] == [1e-2, 3e-3] and record["mft_lr"] == 3e-3
    runs = record["runs"]
    # --lr 3e-3 joins --lrs: MFT at 3e-3 (--mft-lrs lr), FT at both; a folder per run and seed
    assert [(r["run"], r["seed"]) for r in runs] == [(n, s) for s in (0, 1) for n in ("mft-tau0.5-lr3e-3",
                                                                                        "ft-lr1e-2", "ft-lr3e-3")]
    for r in runs:
        assert r["path"] == f"{r['run']}/seed{r['seed']}" and (out / r["path"] / "summary.json").is_file()
        assert r["trajectory"] == _evals(out / r["path"]) and [p["step"] for p in r["trajectory"]] == [0, 1, 2, 3]
        for p in r["trajectory"]:
            assert p["ppl_specialized_se"] > 0 and p["ppl_general_se"] > 0
    # the seeds differ (data order), the learning rates too
    assert runs[0]["trajectory"][-1]["S"] != runs[3]["trajectory"][-1]["S"]
    assert runs[1]["trajectory"][-1]["S"] != runs[2]["trajectory"][-1]["S"]


def test_a_sweep_reports_the_spread_over_seeds_and_dg_at_matched_s(sweep_out):
    out, record = sweep_out["out"], sweep_out["json"]
    runs = record["runs"]
    configs = {c["config"]: c for c in record["configs"]}
    assert set(configs) == {"mft-tau0.5-lr3e-3", "ft-lr1e-2", "ft-lr3e-3"}
    for name, c in configs.items():
        values = [r["S"] for r in runs if r["run"] == name]
        assert c["S"]["n"] == 2 and c["S"]["mean"] == pytest.approx(statistics.fmean(values))
        assert c["S"]["std"] == pytest.approx(statistics.stdev(values)) and c["S"]["max"] == max(values)
    for r in (r for r in runs if r["objective"] == "mft"):
        assert {m["ft_run"] for m in r["matched"]} == {"ft-lr1e-2", "ft-lr3e-3"}
        for m in r["matched"]:
            ft = next(f for f in runs if f["run"] == m["ft_run"] and f["seed"] == r["seed"])
            path = first_passage([(p["S"], p["DG"]) for p in ft["trajectory"]])
            s = [a for a, _ in path]
            assert m["same_lr"] == (m["ft_run"] == "ft-lr3e-3") and (m["ft_s_min"], m["ft_s_max"]) == (s[0], s[-1])
            assert m["in_range"] == (s[0] <= r["S"] <= s[-1])
            if m["in_range"]:
                assert m["dg_ft"] == pytest.approx(float(np.interp(r["S"], s, [d for _, d in path])))
            assert len(m["points"]) == len(r["trajectory"])
    assert len(configs["mft-tau0.5-lr3e-3"]["matched"]) == 2
    md = (out / "sweep.md").read_text()
    assert "## Over seeds" in md and "## DG at matched S" in md and "## Runs" in md
    assert "## Each method at its best" in md and record["mft_lrs"] == "lr" and record["mft_rates"] == [3e-3]
    methods = {m["method"]: m for m in record["frontier"]["methods"]}
    assert set(methods) == {"ft", "mft-tau0.5"} and methods["ft"]["checkpoints"] == 2 * 2 * 3  # runs x steps 1-3
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and list(table[0])[:len(COLUMNS)] == list(COLUMNS)
    assert {"seed", "lr", "S_mean", "S_std", "dg_ft_at_S", "best_ppl_specialized_se"} <= set(table[0])
    assert (out / "dg_vs_s.png").stat().st_size > 1000


def test_the_standard_error_in_metrics_matches_a_hand_computation(sweep_out):
    """The last evaluation of a run is of final/: recompute its perplexity and standard error plainly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mft_cache.trainer.config import TrainConfig
    from mft_cache.trainer.inputs import open_eval_sets

    folder = sweep_out["out"] / "ft-lr1e-2" / "seed1"
    model = AutoModelForCausalLM.from_pretrained(folder / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "final")
    rows = open_eval_sets(TrainConfig(eval_specialized=str(sweep_out["spec"]), eval_max_sequences=3), tokenizer,
                          SEQ)["specialized"]
    batch = rows.batch(list(range(len(rows))))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    x = [float(nll[i][batch["label_mask"][i]].sum()) for i in range(len(rows))]
    n = [int(batch["label_mask"][i].sum()) for i in range(len(rows))]
    ppl, se = _se_by_hand(x, n)
    last = _evals(folder)[-1]
    assert last["ppl_specialized"] == pytest.approx(ppl, rel=1e-4)
    assert last["ppl_specialized_se"] == pytest.approx(se, rel=1e-3)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final_ppl_specialized_se"] == last["ppl_specialized_se"]


def test_the_base_is_evaluated_once_and_shared_by_every_run(sweep_out, llama):
    """Every run starts from the same student: the first run evaluates it, the others reuse that record, and it is
    the base model's perplexity, computed here plainly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mft_cache.trainer.config import TrainConfig
    from mft_cache.trainer.inputs import open_eval_sets

    runs = sweep_out["json"]["runs"]
    firsts = []
    for r in runs:
        lines = [json.loads(x) for x in (sweep_out["out"] / r["path"] / "metrics.jsonl").read_text().splitlines()]
        firsts.append(next(x for x in lines if x["type"] == "eval"))
    assert [f.get("shared", False) for f in firsts] == [False] + [True] * (len(runs) - 1)
    for f in firsts:
        assert f["step"] == 0 and f["S"] == 0.0 and f["DG"] == 0.0
        for k in ("ppl_specialized", "ppl_specialized_se", "ppl_general", "ppl_general_se"):
            assert f[k] == firsts[0][k]
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    rows = open_eval_sets(TrainConfig(eval_specialized=str(sweep_out["spec"]), eval_max_sequences=3),
                          AutoTokenizer.from_pretrained(llama), SEQ)["specialized"]
    batch = rows.batch(list(range(len(rows))))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    x = [float(nll[i][batch["label_mask"][i]].sum()) for i in range(len(rows))]
    n = [int(batch["label_mask"][i].sum()) for i in range(len(rows))]
    assert firsts[0]["ppl_specialized"] == pytest.approx(_se_by_hand(x, n)[0], rel=1e-4)
    assert runs[-1]["base_ppl_specialized"] == firsts[0]["ppl_specialized"]


# -- flags --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [(["--seeds", "0,x"], ["--seeds", "'x'"]),
                                          (["--seeds", "1,1"], ["--seeds", "twice"]),
                                          (["--lrs", "1e-4,-1"], ["--lrs", "positive"]),
                                          (["--lrs", "1e-4", "--no-ft", "--mft-lrs", "lr"],
                                           ["--lrs", "--no-ft", "--mft-lrs"]),
                                          (["--taus", "0.5,2"], ["--taus", "outside"])])
def test_bad_sweep_lists_exit_2_naming_the_flag(flags, words, tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path / "s"), *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_sweep_passes_seeds_and_lrs(monkeypatch):
    monkeypatch.chdir(ROOT)
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "sweep", "SEEDS=0,1,2", "LRS=1e-4,5e-4"], capture_output=True,
                         text=True, check=True).stdout.replace("\\\n", " ")
    [line] = [x for x in out.splitlines() if "bin/mft " in x]
    args = parse(shlex.split(line)[1:])
    assert (args.seeds, args.lrs) == ("0,1,2", "1e-4,5e-4")


def test_the_plot_still_takes_rows_without_a_trajectory(tmp_path):
    """mft study plots one point per run (its summary), with no trajectory."""
    from mft_cache.trainer.sweep import plot_dg_vs_s

    rows = [{"run": "ft", "objective": "ft", "S": 0.4, "DG": 0.1}, {"run": "mft", "objective": "mft", "S": 0.3,
                                                                   "DG": 0.02}]
    assert plot_dg_vs_s(rows, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000
    assert not plot_dg_vs_s([{"run": "x", "objective": "ft", "S": None, "DG": None}], tmp_path / "q.png")
