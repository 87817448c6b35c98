"""`mft sweep`: one run per tau (and plain finetuning) from one cache; a table and a DG-vs-S plot.

Every run reads the same cache; with --teacher cache (the default) the teacher is loaded zero
times, and the log and sweep.json say so.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import replace
from pathlib import Path

from mft_cache.storage.manifest import write_json_atomic

from .config import TrainConfig
from .tracking import tracking_of
from .train import train

log = logging.getLogger(__name__)

COLUMNS = ("run", "objective", "tau", "S", "DG", "ratio", "best_step", "base_ppl_specialized", "best_ppl_specialized",
           "base_ppl_general", "best_ppl_general", "tokens", "wall_time_s")


def run_name(objective: str, tau: float) -> str:
    return "ft" if objective == "ft" else f"{objective}-tau{tau:g}"


def sweep(cfg: TrainConfig, taus: list[float], with_ft: bool = True) -> list[dict]:
    if cfg.push_to_hub:
        raise ValueError("--push-to-hub uploads one run: push the sweep's best with `mft train ... --push-to-hub`, or "
                         "`hf upload REPO RUN/final`")
    for tau in taus:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"--taus: {tau} is outside [0, 1]")
    out = Path(cfg.out)
    runs = [replace(cfg, objective="mft", tau=t, out=str(out / run_name("mft", t))) for t in taus]
    if with_ft:
        runs.append(replace(cfg, objective="ft", tau=1.0, out=str(out / "ft")))
    # the trackers: one project (the sweep's folder name, or --run-name), a run per tau, one TensorBoard folder
    project = cfg.run_name or out.resolve().name
    rows = []
    for i, run in enumerate(runs, 1):
        name = run_name(run.objective, run.tau)
        log.info("sweep run %d/%d: %s", i, len(runs), name)
        run = replace(run, run_name=f"{project}-{name}")
        summary = train(run, tracking_of(Path(run.out), run.run_name, out / "tensorboard", project))
        rows.append({"run": run_name(run.objective, run.tau), **{k: summary.get(k) for k in COLUMNS if k != "run"},
                     "teacher_loaded": summary["teacher_loaded"]})
    loads = sum(r["teacher_loaded"] for r in rows)
    log.info("sweep done: %d runs from one cache; the teacher was loaded %d times", len(rows), loads)
    write_tables(rows, out)
    write_json_atomic(out / "sweep.json", {"cache": cfg.cache, "runs": rows, "teacher_loads": loads})
    plot_dg_vs_s(rows, out / "dg_vs_s.png")
    print(markdown_table(rows))
    return rows


def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = ("run", "S", "DG", "ratio", "best_step", "best_ppl_specialized", "best_ppl_general", "wall_time_s")
    head = ["run", "S", "DG", "DG/S", "best step", "ppl spec.", "ppl gen.", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_tables(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(markdown_table(rows) + "\n")
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows({k: r.get(k) for k in COLUMNS} for r in rows)


def plot_dg_vs_s(rows: list[dict], path: Path) -> bool:
    """DG against S, one point per run (the paper's Figure 2 style): down and right is better."""
    pts = [r for r in rows if r["S"] is not None and r["DG"] is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in pts:
        marker, color = ("s", "tab:red") if r["objective"] == "ft" else ("o", "tab:blue")
        ax.scatter(100 * r["S"], 100 * r["DG"], marker=marker, color=color)
        ax.annotate(r["run"], (100 * r["S"], 100 * r["DG"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("S: specialization, % drop of specialized ppl")
    ax.set_ylabel("DG: degeneralization, % rise of general ppl")
    ax.set_title("DG vs S (lower right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
