"""`mft sweep`: one run per tau and plain finetuning, per learning rate, per seed, from one cache; tables over
seeds, DG at matched specialization, each method at its best over all its checkpoints, and a DG-vs-S plot of every
run's trajectory.

Every run reads the same cache; with --teacher cache (the default) the teacher is loaded zero times, and the log
and sweep.json say so. Each run's evaluations over steps (its metrics.jsonl) are its trajectory in the (S, DG)
plane; sweep.json keeps all of them, and compares every MFT run with plain finetuning of the same seed at the
same S (trainer/matched.py). Both methods run at every learning rate of --lrs (--mft-lrs all, the default), so that
each is compared at its best rate; --mft-lrs lr keeps MFT at --lr alone (the grid before the option).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from dataclasses import replace
from pathlib import Path

from mft_cache.files import (claim_folder, is_temporary, open_owned, read_json_object, write_bytes_atomic,
                             write_json_atomic, write_text_atomic)
from mft_cache.folder_lock import LOCK_FILE
from mft_cache.names import lr_tag, safe_run_name

from .config import MFT_LRS, TrainConfig
from .matched import best_s_within, lowest_dg_at_or_above, match, pareto_front, spread
from .tracking import tracking_of
from .train import train

log = logging.getLogger(__name__)

COLUMNS = ("run", "objective", "tau", "S", "DG", "ratio", "best_step", "base_ppl_specialized", "best_ppl_specialized",
           "base_ppl_general", "best_ppl_general", "tokens", "wall_time_s")
# added after COLUMNS in sweep.csv: the run's seed, lr and folder; standard errors; DG at matched S against FT of the
# same seed and lr; the configuration's spread over seeds (the same on each of its rows)
EXTRA_COLUMNS = ("seed", "lr", "path", "best_ppl_specialized_se", "best_ppl_general_se", "final_S", "final_DG",
                 "final_ratio", "matched_ft", "matched_in_range", "dg_ft_at_S", "dg_ft_minus_dg", "dg_ft_over_dg",
                 "dg_ft_lowest",
                 "n_seeds", *(f"{q}_{s}" for q in ("S", "DG", "ratio") for s in ("mean", "std", "min", "max")))
SUMMARY_EXTRA = ("best_ppl_specialized_se", "best_ppl_general_se", "final_S", "final_DG", "final_ratio")
# the keys of an evaluation record kept as a trajectory point
POINT_KEYS = ("step", "tokens", "S", "DG", "ratio", "ppl_specialized", "ppl_specialized_se", "ppl_general",
              "ppl_general_se")
# "Each method at its best": the best S at DG at most each of these; MFT's best S at DG <= MATCH_DG is the point
# compared with FT's lowest DG at that S or more
FRONTIER_DG = (0.0, 0.05)
MATCH_DG = 0.05


# what `mft sweep` writes into --out besides its marker and lock: its tables and plot, the runs' TensorBoard folder,
# one folder per configuration (run_name), and files under a temporary name (.NAME.tmp-PID)
SWEEP_FILES = ("sweep.md", "sweep.csv", "sweep.json", "dg_vs_s.png", "tensorboard")
_RUN_FOLDER = re.compile(r"^(ft|[a-z][a-z-]*-tau[0-9.e+-]+)(-lr[0-9.e+-]+)?$")


def is_sweep_name(name: str) -> bool:
    """Whether `name` in a sweep's folder is one `mft sweep` writes (its marker and lock aside)."""
    return name in SWEEP_FILES or bool(_RUN_FOLDER.match(name)) or is_temporary(name)


def written_by_a_sweep(out: Path) -> bool:
    """Whether a folder without the sweep's marker holds what a sweep wrote: a sweep.json with its runs and
    configurations, or only run folders (a sweep stopped before its tables)."""
    path = out / "sweep.json"
    if path.is_file() and not path.is_symlink():
        data = read_json_object(path, 2**26 - 1) or {}
        return isinstance(data.get("runs"), list) and isinstance(data.get("configs"), list)
    names = [n for n in os.listdir(out) if n != LOCK_FILE]
    return all(_RUN_FOLDER.match(n) and (out / n).is_dir() and not (out / n).is_symlink() for n in names)


def run_name(objective: str, tau: float, lr: float | None = None) -> str:
    """The configuration's name: ft, mft-tau0.25; with a learning rate (sweeps over several), ft-lr1e-4, ..."""
    name = "ft" if objective == "ft" else f"{objective}-tau{tau:g}"
    return name if lr is None else f"{name}-lr{lr_tag(lr)}"


def sweep_runs(cfg: TrainConfig, taus: list[float], with_ft: bool, seeds: list[int],
               lrs: list[float], mft_lrs: str = "all") -> list[dict]:
    """Every run of the sweep, seed by seed (a stopped sweep has whole seeds done first): MFT at each tau, at each
    learning rate (mft_lrs "all") or at --lr alone ("lr"), then FT at each learning rate. Each: name, seed, lr, path
    (under --out) and its TrainConfig."""
    several_lrs = len(lrs) > 1
    mft_rates = lrs if mft_lrs == "all" else [cfg.lr]
    configs = [("mft", t, lr) for t in taus for lr in mft_rates] + ([("ft", 1.0, lr) for lr in lrs] if with_ft else [])
    names = [run_name(o, t, lr if several_lrs else None) for o, t, lr in configs]
    if len(set(names)) < len(names):
        raise ValueError(f"--taus / --lrs: two runs would share a name ({names}); give values that differ more")
    runs = []
    for seed in seeds:
        for name, (objective, tau, lr) in zip(names, configs):
            path = name if len(seeds) == 1 else f"{name}/seed{seed}"
            runs.append({"name": name, "seed": seed, "lr": lr, "path": path,
                         "cfg": replace(cfg, objective=objective, tau=tau, lr=lr, seed=seed,
                                        out=str(Path(cfg.out) / path))})
    return runs


def sweep(cfg: TrainConfig, taus: list[float], with_ft: bool = True, seeds: list[int] | None = None,
          lrs: list[float] | None = None, mft_lrs: str = "all") -> list[dict]:
    """Run every configuration once per seed; write sweep.md, sweep.csv, sweep.json and dg_vs_s.png into --out.
    seeds default to [--seed]; lrs to [--lr], and --lr joins them if missing. FT runs at each of lrs; MFT at each
    of them too (mft_lrs "all"), or at --lr alone ("lr"), and is compared with FT at its own rate and with FT at
    its best. Returns a row per run."""
    if mft_lrs not in MFT_LRS:
        raise ValueError(f"--mft-lrs: {mft_lrs!r} is not one of {', '.join(MFT_LRS)}")
    if cfg.push_to_hub:
        raise ValueError("--push-to-hub uploads one run: push the sweep's best with `mft train ... --push-to-hub`, or "
                         "`hf upload REPO RUN/final`")
    for tau in taus:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"--taus: {tau} is outside [0, 1]")
    seeds = list(seeds or [cfg.seed])
    lrs = list(lrs or [cfg.lr])
    if lrs != [cfg.lr] and not with_ft and mft_lrs == "lr":
        raise ValueError("--lrs with --mft-lrs lr sets the learning rates of plain finetuning only, which --no-ft "
                         "skips: drop one of them, or give --mft-lrs all (MFT at every rate)")
    if cfg.lr not in lrs:
        log.info("--lrs: adding --lr %g, so that FT and MFT also run at it", cfg.lr)
        lrs.append(cfg.lr)
    out = Path(cfg.out)
    runs = sweep_runs(cfg, taus, with_ft, seeds, lrs, mft_lrs)
    lock = claim_folder(out, "sweep", is_sweep_name, written_by_a_sweep)  # before any run: refused with nothing written
    try:
        return _run_sweep(cfg, runs, out, seeds, lrs, mft_lrs)
    finally:
        lock.release()


def _run_sweep(cfg: TrainConfig, runs: list[dict], out: Path, seeds: list[int], lrs: list[float],
               mft_lrs: str = "all") -> list[dict]:
    # the trackers: one project (the sweep's folder name, or --run-name), a run per configuration and seed, one
    # TensorBoard folder
    project = cfg.run_name or safe_run_name(out.resolve().name, "sweep")
    rows, base = [], None
    for i, r in enumerate(runs, 1):
        log.info("sweep run %d/%d: %s", i, len(runs), r["path"])
        run = replace(r["cfg"], run_name=f"{project}-{r['path'].replace('/', '-')}")
        # every run starts from the same student and evaluates the same sets: the base is evaluated once
        summary = train(run, tracking_of(Path(run.out), run.run_name, out / "tensorboard", project), base)
        trajectory = read_trajectory(Path(run.out))
        if base is None and trajectory and trajectory[0]["step"] == 0:
            base = {k: v for k, v in trajectory[0].items() if k.startswith("ppl_")}
        rows.append({"run": r["name"], **{k: summary.get(k) for k in COLUMNS if k != "run"},
                     "seed": r["seed"], "lr": r["lr"], "path": r["path"],
                     **{k: summary.get(k) for k in SUMMARY_EXTRA},
                     "teacher_loaded": summary["teacher_loaded"], "trajectory": trajectory})
    loads = sum(r["teacher_loaded"] for r in rows)
    log.info("sweep done: %d runs from one cache; the teacher was loaded %d times", len(rows), loads)
    add_matches(rows)
    configs = aggregate(rows)
    front = frontier(rows)
    table = write_tables(rows, configs, out, seeds, lrs, front)
    mft_rates = list(dict.fromkeys(r["lr"] for r in runs if r["cfg"].objective != "ft"))
    write_json_atomic(out / "sweep.json", {"cache": cfg.cache, "seeds": seeds, "lrs": lrs, "mft_lr": cfg.lr,
                                           "mft_lrs": mft_lrs, "mft_rates": mft_rates, "runs": rows,
                                           "configs": configs, "frontier": front, "teacher_loads": loads})
    plot_dg_vs_s(rows, out / "dg_vs_s.png", front["methods"])
    print(table, end="")
    return rows


def read_trajectory(folder: Path) -> list[dict]:
    """The run's evaluation records from its metrics.jsonl, in step order (POINT_KEYS of each)."""
    points: dict[int, dict] = {}
    try:
        f = open_owned(folder, "metrics.jsonl")
    except FileNotFoundError:
        return []
    with f:
        for line in f:
            record = json.loads(line)
            if record.get("type") == "eval":
                points[record["step"]] = {k: record.get(k) for k in POINT_KEYS}  # a repeated step: the last wins
    return [points[s] for s in sorted(points)]


def _s_dg(trajectory: list[dict]) -> list[tuple[float, float]]:
    return [(p["S"], p["DG"]) for p in trajectory if p.get("S") is not None and p.get("DG") is not None]


def add_matches(rows: list[dict]) -> None:
    """Each MFT row gets "matched": its reported point and every point of its trajectory against the trajectory of
    each FT run of the same seed (same_lr marks FT at the MFT run's own rate)."""
    fts = [r for r in rows if r["objective"] == "ft" and _s_dg(r["trajectory"])]
    for r in rows:
        if r["objective"] == "ft":
            continue
        r["matched"] = []
        for ft in (f for f in fts if f["seed"] == r["seed"]):
            if r["S"] is None or r["DG"] is None:
                continue
            ft_points = _s_dg(ft["trajectory"])
            r["matched"].append({
                "ft_run": ft["run"], "ft_path": ft["path"], "ft_lr": ft["lr"], "same_lr": ft["lr"] == r["lr"],
                **match(r["S"], r["DG"], ft_points),
                "points": [{"step": p["step"], **match(p["S"], p["DG"], ft_points)} for p in r["trajectory"]
                           if p.get("S") is not None and p.get("DG") is not None]})


def same_lr_match(row: dict) -> dict | None:
    return next((m for m in row.get("matched", []) if m["same_lr"]), None)


def aggregate(rows: list[dict]) -> list[dict]:
    """A record per configuration: its seeds and the spread over them (trainer.matched.spread: n, mean, sample
    std, min, max) of S, DG and DG/S (the mean of each seed's ratio) at the reported (best) point, and of DG at
    matched S against FT at each learning rate (over the seeds where the MFT S is in FT's range)."""
    configs = []
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        first = mine[0]
        record = {"config": name, "objective": first["objective"], "tau": first["tau"], "lr": first["lr"],
                  "seeds": [r["seed"] for r in mine], "paths": [r["path"] for r in mine],
                  **{q: spread([r[q] for r in mine]) for q in ("S", "DG", "ratio", "final_S", "final_DG")}}
        if first["objective"] != "ft":
            record["matched"] = []
            for ft_run in dict.fromkeys(m["ft_run"] for r in mine for m in r["matched"]):
                ms = [m for r in mine for m in r["matched"] if m["ft_run"] == ft_run]
                record["matched"].append({
                    "ft_run": ft_run, "ft_lr": ms[0]["ft_lr"], "same_lr": ms[0]["same_lr"], "seeds": len(ms),
                    "in_range": sum(m["in_range"] for m in ms),
                    **{q: spread([m[q] for m in ms if m["in_range"]])
                       for q in ("S", "dg_mft", "dg_ft", "difference", "ratio")},
                    "difference_lowest": spread([m["difference_lowest"] for m in ms])})
        configs.append(record)
    for r in rows:  # the configuration's spread on each of its rows, for sweep.csv
        c = next(c for c in configs if c["config"] == r["run"])
        r["n_seeds"] = len(c["seeds"])
        r.update({f"{q}_{s}": c[q][s] for q in ("S", "DG", "ratio") for s in ("mean", "std", "min", "max")})
    return configs


# -- each method at its best: every checkpoint of every run of a method ---------------------------------------
def method_name(row: dict) -> str:
    """The method a run belongs to, its learning rate aside: ft, mft-tau0.25, ..."""
    return run_name(row["objective"], row["tau"])


def checkpoints(rows: list[dict]) -> list[dict]:
    """Every evaluation after step 0 (the base model, the same in every run) of the rows' trajectories, with a
    finite S and DG: S, DG and where it comes from (run, path, lr, seed, step), in the rows' and steps' order."""
    points = []
    for r in rows:
        for p in r.get("trajectory") or []:
            s, dg = p.get("S"), p.get("DG")
            if p.get("step") == 0 or s is None or dg is None or not (math.isfinite(s) and math.isfinite(dg)):
                continue
            points.append({"S": s, "DG": dg, "run": r["run"], "path": r.get("path"), "lr": r.get("lr"),
                           "seed": r.get("seed"), "step": p.get("step")})
    return points


def _pairs(points: list[dict]) -> list[tuple[float, float]]:
    return [(p["S"], p["DG"]) for p in points]


def _best_within(points: list[dict], dg_max: float) -> dict | None:
    """The checkpoint with the largest S at DG <= dg_max (trainer.matched.best_s_within); of several with that S,
    the one with the least DG, then the first. None when no checkpoint has DG <= dg_max."""
    s = best_s_within(_pairs(points), dg_max)
    if s is None:
        return None
    return min((p for p in points if p["S"] == s and p["DG"] <= dg_max), key=lambda p: p["DG"])


def _against_ft(point: dict | None, ft_points: list[dict]) -> dict | None:
    """An MFT checkpoint against FT's checkpoints: FT's lowest DG among those with S at least the MFT one's
    (trainer.matched.lowest_dg_at_or_above; None when FT never reached that S), the FT checkpoint that has it, and
    difference = DG FT - DG MFT (positive: MFT forgets less at least as far specialized)."""
    if point is None:
        return None
    dg_ft = lowest_dg_at_or_above(_pairs(ft_points), point["S"])
    ft_point = None if dg_ft is None else next(p for p in ft_points if p["S"] >= point["S"] and p["DG"] == dg_ft)
    return {"S": point["S"], "dg_mft": point["DG"], "dg_ft_lowest": dg_ft, "ft_point": ft_point,
            "difference": None if dg_ft is None else dg_ft - point["DG"]}


def _at_best(points: list[dict], ft_points: list[dict], is_mft: bool) -> dict:
    record = {"checkpoints": len(points), "best": {f"{d:g}": _best_within(points, d) for d in FRONTIER_DG}}
    if is_mft:
        record["against_ft"] = _against_ft(record["best"][f"{MATCH_DG:g}"], ft_points)
    return record


def frontier(rows: list[dict]) -> dict:
    """Each method (ft; mft at each tau) at its best: its checkpoints are every evaluation after step 0 of every run
    of it, all learning rates and seeds pooled. Per method: its rates, seeds and runs, its Pareto front over those
    checkpoints (trainer.matched.pareto_front, as [S, DG] sorted by S), "best": for each DG bound of FRONTIER_DG
    (the key is the bound, "0", "0.05") the checkpoint with the best S at DG <= that bound (None: none has), and
    for MFT "against_ft": that checkpoint at DG <= MATCH_DG against every FT checkpoint (_against_ft). "by_lr": the
    same per learning rate, each method's checkpoints and FT's restricted to the runs at that rate."""
    ft_points = checkpoints([r for r in rows if r["objective"] == "ft"])
    names = list(dict.fromkeys(method_name(r) for r in sorted(rows, key=lambda r: r["objective"] != "ft")))
    methods = []
    for name in names:
        mine = [r for r in rows if method_name(r) == name]
        is_mft = mine[0]["objective"] != "ft"
        points = checkpoints(mine)
        lrs = list(dict.fromkeys(r.get("lr") for r in mine))
        methods.append({
            "method": name, "objective": mine[0]["objective"], "tau": mine[0]["tau"], "lrs": lrs,
            "seeds": list(dict.fromkeys(r.get("seed") for r in mine)), "runs": len(mine),
            "front": [list(p) for p in pareto_front(_pairs(points))], **_at_best(points, ft_points, is_mft),
            "by_lr": [{"lr": lr, **_at_best([p for p in points if p["lr"] == lr],
                                            [p for p in ft_points if p["lr"] == lr], is_mft)} for lr in lrs]})
    return {"dg_max": list(FRONTIER_DG), "match_dg": MATCH_DG, "methods": methods}


# -- tables -------------------------------------------------------------------------------------------------
def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _pm(value, se) -> str:
    """A perplexity and its standard error, to the same decimals."""
    if value is None or se is None:
        return _cell(value)
    d = 4 if abs(value) < 100 else 1
    return f"{value:.{d}f} ± {se:.{d}f}"


def _spread_cell(sp: dict) -> str:
    """mean ± sample std [min, max] (a single value alone)."""
    if not sp["n"]:
        return "n/a"
    if sp["std"] is None:
        return _cell(sp["mean"])
    return f"{_cell(sp['mean'])} ± {_cell(sp['std'])} [{_cell(sp['min'])}, {_cell(sp['max'])}]"


def _matched_cells(row: dict) -> list[str]:
    """DG of FT (same seed, same lr) at the run's S, and DG_FT / DG_MFT there."""
    if row["objective"] == "ft":
        return ["", ""]
    m = same_lr_match(row)
    if m is None:
        return ["n/a", "n/a"]
    if not m["in_range"]:
        return [f"out of FT's range [{_cell(m['ft_s_min'])}, {_cell(m['ft_s_max'])}]", "n/a"]
    return [_cell(m["dg_ft"]), _cell(m["ratio"])]


def markdown_table(rows: list[dict], with_seed: bool = False) -> str:
    """A row per run: S, DG, DG/S at the best checkpoint, perplexities ± their standard errors over evaluation
    sequences, and DG at matched S against FT of the same seed and learning rate."""
    head = ["run", *(["seed"] if with_seed else []), "S", "DG", "DG/S", "best step", "ppl spec.", "ppl gen.",
            "wall s", "DG FT at S", "DG FT / DG at S"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], *([str(r["seed"])] if with_seed else []), _cell(r["S"]), _cell(r["DG"]),
                 _cell(r["ratio"]), _cell(r["best_step"]),
                 _pm(r["best_ppl_specialized"], r.get("best_ppl_specialized_se")),
                 _pm(r["best_ppl_general"], r.get("best_ppl_general_se")), _cell(r["wall_time_s"]), *_matched_cells(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(configs: list[dict]) -> str:
    head = ["configuration", "seeds", "S", "DG", "DG/S"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {c['config']} | {len(c['seeds'])} | {_spread_cell(c['S'])} | {_spread_cell(c['DG'])} | "
              f"{_spread_cell(c['ratio'])} |" for c in configs]
    return "\n".join(lines)


def matched_table(configs: list[dict]) -> str:
    head = ["MFT", "against", "in FT's range", "S", "DG MFT", "DG FT at S", "DG FT - DG MFT", "DG FT / DG MFT",
            "best FT checkpoint at >= S: DG FT - DG MFT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in configs:
        for m in c.get("matched", []):
            lines.append(f"| {c['config']} | {m['ft_run']}{' (same lr)' if m['same_lr'] else ''} | "
                         f"{m['in_range']} of {m['seeds']} | "
                         + " | ".join(_spread_cell(m[q]) for q in ("S", "dg_mft", "dg_ft", "difference", "ratio",
                                                                    "difference_lowest")) + " |")
    return "\n".join(lines)


def _at_best_cells(record: dict, is_mft: bool) -> list[str]:
    """Best S at each DG bound; at DG <= MATCH_DG its DG and checkpoint; for MFT, FT's lowest DG at that S or more
    and DG FT - DG MFT."""
    best = record["best"]
    cells = [_cell(best[f"{d:g}"]["S"]) if best[f"{d:g}"] else "none" for d in FRONTIER_DG]
    p = best[f"{MATCH_DG:g}"]
    cells += [_cell(p["DG"]), f"{p['run']}, seed {p['seed']}, step {p['step']}"] if p else ["", ""]
    if not is_mft:
        return cells + ["", ""]
    m = record.get("against_ft")
    if m is None:
        return cells + ["n/a", "n/a"]
    if m["dg_ft_lowest"] is None:
        return cells + ["FT never reached that S", "n/a"]
    return cells + [_cell(m["dg_ft_lowest"]), f"{m['difference']:+.4f}"]


def frontier_tables(front: dict) -> tuple[str, str]:
    """The methods at their best, and the same at each learning rate."""
    bounds = [f"best S at DG <= {d:g}" for d in FRONTIER_DG]
    tail = ["DG there", "that checkpoint", "FT's lowest DG at >= that S", "DG FT - DG MFT"]
    head = ["method", "rates", "seeds", "checkpoints", *bounds, *tail]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in front["methods"]:
        is_mft = m["objective"] != "ft"
        cells = [m["method"], ", ".join(lr_tag(lr) for lr in m["lrs"]), str(len(m["seeds"])), str(m["checkpoints"]),
                 *_at_best_cells(m, is_mft)]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["method", "lr", "checkpoints", *bounds, *tail[:2], "FT's lowest DG at >= that S, same lr",
            "DG FT - DG MFT"]
    per_lr = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in front["methods"]:
        is_mft = m["objective"] != "ft"
        for r in m["by_lr"]:
            cells = [m["method"], lr_tag(r["lr"]), str(r["checkpoints"]), *_at_best_cells(r, is_mft)]
            per_lr.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), "\n".join(per_lr)


def frontier_markdown(front: dict) -> str:
    """The section "Each method at its best" of sweep.md: its table, what the numbers are, and the same at each
    learning rate where there are several."""
    methods = front["methods"]
    if not methods:
        return ""
    table, per_lr = frontier_tables(front)
    ft = next((m for m in methods if m["objective"] == "ft"), None)
    mft = [m for m in methods if m["objective"] != "ft"]
    rates = sorted({lr for m in methods for lr in m["lrs"]})
    text = ("Every evaluation after step 0 (the base model, the same in every run) of every run of a method is one "
            "checkpoint (S, DG), all its learning rates and seeds pooled: each number is the method at the rate and "
            "step that suit it best, picked after the fact as a sweep picks (with several seeds, at the seed that "
            "did best, not the mean over seeds). Best S at DG <= d: the largest S among the checkpoints whose "
            "general perplexity rose by at most d (none: no checkpoint did); DG there and that checkpoint are of "
            f"the best S at DG <= {MATCH_DG:g}. For MFT, that checkpoint against every FT checkpoint: FT's lowest "
            "DG among those with at least that S (no interpolation; n/a without FT); DG FT - DG MFT > 0 means MFT "
            "forgets less while it specializes at least as much.")
    if ft is not None and mft:
        ft_rates = set(ft["lrs"])
        if any(set(m["lrs"]) < ft_rates for m in mft):
            text += (f" FT ran at {', '.join(lr_tag(lr) for lr in ft['lrs'])} and MFT at fewer rates (as with "
                     "--mft-lrs lr): FT's learning rate is tuned over more values than MFT's, which favours FT.")
        elif all(set(m["lrs"]) == ft_rates for m in mft):
            text += " FT and every MFT tau ran at the same learning rates."
    parts = ["## Each method at its best", "", table, "", text, ""]
    if len(rates) > 1:
        parts += ["### At each rate", "",
                  "The same with each method's checkpoints, and FT's, restricted to the runs at one learning rate.",
                  "", per_lr, ""]
    return "\n".join(parts)


def sweep_markdown(rows: list[dict], configs: list[dict], seeds: list[int], lrs: list[float],
                   front: dict | None = None) -> str:
    """sweep.md: with one seed and one learning rate, the table of runs alone; else also the spread over seeds,
    DG at matched S against FT at every learning rate, and each method at its best (`front`, frontier(rows) when
    not given)."""
    runs = markdown_table(rows, with_seed=len(seeds) > 1)
    if len(seeds) == 1 and len(lrs) == 1:
        return runs + "\n"
    parts = []
    if len(seeds) > 1:
        parts += ["## Over seeds", "",
                  f"Seeds {', '.join(map(str, seeds))}: mean ± sample standard deviation [min, max] over the seeds, "
                  "at each run's best checkpoint (least specialized perplexity); DG/S is the mean of each seed's "
                  "ratio.",
                  "", seeds_table(configs), ""]
    if any(c.get("matched") for c in configs):
        parts += ["## DG at matched S", "",
                  "Each MFT run's S and DG (best checkpoint) against FT of the same seed: DG FT at S is FT's DG when "
                  "it first reached that S, linear between its evaluations; outside the S range FT reached there "
                  "is no number, and 'in FT's range' counts the seeds that have one (the spreads are over those). "
                  "DG FT / DG MFT only where DG MFT > 0. The last column takes FT's best evaluated checkpoint with at "
                  "least that S instead (no interpolation; over every seed that has one).",
                  "", matched_table(configs), ""]
    best = frontier_markdown(front if front is not None else frontier(rows))
    if best:
        parts += [best]
    parts += ["## Runs", "", runs]
    return "\n".join(parts) + "\n"


def write_tables(rows: list[dict], configs: list[dict], out: Path, seeds: list[int], lrs: list[float],
                 front: dict | None = None) -> str:
    """sweep.md and sweep.csv into `out`; returns sweep.md's text."""
    out.mkdir(parents=True, exist_ok=True)
    table = sweep_markdown(rows, configs, seeds, lrs, front)
    write_text_atomic(out / "sweep.md", table)
    columns = (*COLUMNS, *EXTRA_COLUMNS)
    with io.StringIO(newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            m = same_lr_match(r) or {}
            matched = {"matched_ft": m.get("ft_path"), "matched_in_range": m.get("in_range"),
                       "dg_ft_at_S": m.get("dg_ft"), "dg_ft_minus_dg": m.get("difference"),
                       "dg_ft_over_dg": m.get("ratio"), "dg_ft_lowest": m.get("dg_ft_lowest")}
            w.writerow({**{k: r.get(k) for k in columns}, **matched})
        write_text_atomic(out / "sweep.csv", f.getvalue())
    return table


# -- the plot -----------------------------------------------------------------------------------------------
def _colours(rows: list[dict]) -> dict:
    """A colour per configuration: MFT from blue to green by tau, FT from red to orange by learning rate."""
    import matplotlib

    names = list(dict.fromkeys(r["run"] for r in rows))
    ft = list(dict.fromkeys(r["run"] for r in rows if r["objective"] == "ft"))
    mft = [n for n in names if n not in ft]
    cool, warm = matplotlib.colormaps["winter"], matplotlib.colormaps["autumn"]
    colours = {n: cool(i / max(1, len(mft) - 1)) for i, n in enumerate(mft)}
    colours.update({n: warm(0.6 * i / max(1, len(ft) - 1)) for i, n in enumerate(ft)})
    return colours


def plot_dg_vs_s(rows: list[dict], path: Path, fronts: list[dict] | None = None) -> bool:
    """DG against S (the paper's Figure 2 style): down and right is better. Rows with a trajectory are drawn as
    lines with a marker per evaluation, a colour per configuration (each seed its own line) and the end point
    enlarged; rows without one as a point each. `fronts` (frontier(rows)["methods"]): each method's Pareto front
    over all its checkpoints, a wide pale step line (the least DG the method offers at each S or more)."""
    pts = [r for r in rows if _s_dg(r.get("trajectory") or []) or (r["S"] is not None and r["DG"] is not None)]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours = _colours(pts)
    labelled = set()
    for r in sorted(pts, key=lambda r: r["objective"] != "ft"):  # MFT drawn over FT
        ft = r["objective"] == "ft"
        marker, colour = ("s" if ft else "o"), colours[r["run"]]
        points = _s_dg(r.get("trajectory") or [])
        if not points:
            ax.scatter(100 * r["S"], 100 * r["DG"], marker=marker, color=colour)
            ax.annotate(r["run"], (100 * r["S"], 100 * r["DG"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            continue
        xs, ys = [100 * s for s, _ in points], [100 * d for _, d in points]
        label = None if r["run"] in labelled else r["run"]
        labelled.add(r["run"])
        ax.plot(xs, ys, marker=marker, ms=3, lw=1.2, ls="--" if ft else "-", color=colour, alpha=0.85, label=label)
        ax.scatter(xs[-1:], ys[-1:], marker=marker, s=60, color=colour, edgecolors="black", zorder=3)
    mft_fronts = [f for f in fronts or [] if f["objective"] != "ft"]
    for f in fronts or []:
        if not f["front"]:
            continue
        ft = f["objective"] == "ft"
        colour = "darkred" if ft else matplotlib.colormaps["winter"](mft_fronts.index(f) / max(1, len(mft_fronts) - 1))
        ax.step([100 * s for s, _ in f["front"]], [100 * d for _, d in f["front"]], where="pre", lw=4, alpha=0.3,
                color=colour, zorder=1, label=f"{f['method']}: front")
        labelled.add(f["method"])
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("S: specialization, % drop of specialized ppl")
    ax.set_ylabel("DG: degeneralization, % rise of general ppl")
    ax.set_title("DG vs S over training (lower right is better; large: end)")
    if labelled:
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
    return True
