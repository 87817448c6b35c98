"""The regime study's section of STUDIES.md and its figures, from regime.json alone (mft_cache/regime.py).

Every number is a function of the runs' evaluations (their trajectories: S and DG at every evaluated step):
- a method's frontier over all its settings and checkpoints (trainer.matched.pareto_front);
- per seed, the most S a method reaches with DG <= 0 and with DG <= dg_budget (best_s_within) at its best rate;
- DG at matched S: MFT's point with the most S within the DG budget against the least DG any FT checkpoint of
  the same seed reaches at that S or more (lowest_dg_at_or_above): positive = MFT forgets less.
The section sits between two markers, so `mft study` and `mft regime` each rewrite only their own part.
"""
from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from mft_cache.files import write_bytes_atomic, write_text_atomic
from mft_cache.names import lr_tag

log = logging.getLogger(__name__)

BEGIN, END = "<!-- mft regime: begin -->", "<!-- mft regime: end -->"


def replace_section(text: str, section: str) -> str:
    """`text` with its regime section (between the markers) replaced by `section`, or `section` appended."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"


def keep_section(old: str, new: str) -> str:
    """A report rewritten by another command (`new`) keeps the regime section `old` held."""
    if BEGIN in old and END in old.split(BEGIN, 1)[1]:
        section = old.split(BEGIN, 1)[1].split(END, 1)[0]
        return replace_section(new, section.strip("\n"))
    return new


def _points(run: dict) -> list[tuple[float, float]]:
    return [(p["S"], p["DG"]) for p in run["trajectory"] if p.get("S") is not None and p.get("DG") is not None]


def _ms(values: list) -> str:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _cell_runs(record: dict, domain: str, budget: int) -> list[dict]:
    return [r for r in record["runs"].values() if r["domain"] == domain and r["budget"] == budget]


def cell_summary(cfg, runs: list[dict]) -> dict:
    """For one (domain, budget): each method's best rate, per-seed numbers at it, the frontier comparisons."""
    from mft_cache.regime import best_rate
    from mft_cache.trainer.matched import best_s_within, lowest_dg_at_or_above, pareto_front

    taus = cfg.tau_values()
    tau0 = taus[0]
    grid = [r for r in runs if r["stage"] == "grid"]
    out = {"methods": {}, "rates": {}}
    for method, tau in [("ft", 1.0)] + [("mft", t) for t in taus]:
        rate = best_rate({r["lr"]: r["trajectory"] for r in grid if r["method"] == method
                          and (method == "ft" or r["tau"] == tau0)}, cfg.dg_budget)
        if method == "mft" and tau != tau0:
            mine = [r for r in runs if r["method"] == "mft" and r["tau"] == tau]
            rate = mine[0]["lr"] if mine else None
        mine = [r for r in runs if r["method"] == method and (method == "ft" or r["tau"] == tau) and r["lr"] == rate]
        name = "FT" if method == "ft" else f"MFT tau {tau:g}"
        rows = []
        for r in sorted(mine, key=lambda r: r["seed"]):
            pts = _points(r)
            s_budget = best_s_within(pts, cfg.dg_budget)
            row = {"seed": r["seed"], "S0": best_s_within(pts, 0.0), "Sb": s_budget,
                   "best_S": r["summary"]["S"], "best_DG": r["summary"]["DG"]}
            if s_budget is not None:
                row["dg"] = min(dg for s, dg in pts if s == s_budget and dg <= cfg.dg_budget)
            if method == "mft" and s_budget is not None:
                dg = row["dg"]
                ft_pts = [p for f in runs if f["method"] == "ft" and f["seed"] == r["seed"] for p in _points(f)]
                ft_dg = lowest_dg_at_or_above(ft_pts, s_budget)
                row.update(dg=dg, ft_dg=ft_dg, diff=None if ft_dg is None else ft_dg - dg)
            rows.append(row)
        planned = len(cfg.lr_values())
        ran = len({r["lr"] for r in grid if r["method"] == method and (method == "ft" or r["tau"] == tau0)})
        out["methods"][name] = {"rate": rate, "seeds": rows, "n": len(rows), "grid": (ran, planned),
                                "front": pareto_front([p for r in runs if r["method"] == method
                                                       and (method == "ft" or r["tau"] == tau) for p in _points(r)])}
    for r in grid:  # each rate, each method (seed of the grid): the reported (best specialized) checkpoint
        key = "FT" if r["method"] == "ft" else "MFT"
        pts = _points(r)
        out["rates"].setdefault(r["lr"], {})[key] = {"S": r["summary"]["S"], "DG": r["summary"]["DG"],
                                                     "Sb": best_s_within(pts, cfg.dg_budget),
                                                     "final_S": r["summary"]["final_S"],
                                                     "final_DG": r["summary"]["final_DG"]}
    return out


def _fmt(v, pct=False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:+.1f}%" if pct else f"{v:.3f}"


def render(cfg, record: dict, out: Path, report: Path) -> None:
    runs = record["runs"]
    if not runs:
        return
    figures = report.parent / "docs"
    figures.mkdir(parents=True, exist_ok=True)
    t = record["settings"]["train"]
    ref = record.get("reference")
    planned_cells = [(d, b) for d in cfg.domain_names() for b in cfg.budget_values()]
    wall = sum(r["summary"].get("wall_time_s") or 0 for r in runs.values()) + ((ref or {}).get("wall_time_s") or 0)
    doc = ["## The paper's regime: MFT against plain finetuning tuned as hard", "",
           f"Produced by `make regime` (`mft regime`) into `{out}`; every number comes from its `regime.json`. "
           f"{len(runs)} runs, {wall / 3600:.1f} h of training and evaluation in all.", ""]
    if ref:
        doc += [f"- **Reference checkpoint**: the model finetuned on {cfg.reference_documents} general documents "
                f"(disjoint from the general validation set) for {ref['steps']} steps at lr {cfg.reference_lr:g}, "
                f"kept at step {ref['best_step']}, its least general validation perplexity "
                f"({_fmt(ref['base_ppl_general'])} -> {_fmt(ref['best_ppl_general'])}). It is the teacher of every "
                "cache and the start of every run below."]
    doc += [f"- **Runs**: {t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens; budgets "
            + ", ".join(f"{b:,} tokens ({max(1, b // t['seq_len'])} rows, "
                        f"{t['steps'] * t['batch_size'] / max(1, b // t['seq_len']):g} epochs)"
                        for b in cfg.budget_values())
            + f"; learning rates {cfg.lrs} for both methods (AdamW, cosine to {t['min_lr_ratio']:g}x, "
            f"{t['warmup_steps']} warm-up steps); MFT at tau {cfg.tau_values()[0]:g} on the grid, tau "
            f"{', '.join(f'{x:g}' for x in cfg.tau_values()[1:]) or '-'} at its best rate; seeds {cfg.seeds} at each "
            f"method's best rate; evaluated every {t['eval_every']} steps on {t['eval_max_sequences'] or 'all'} "
            f"sequences of each validation set; mixed precision {t['mixed_precision']} (bf16 where the CPU computes it "
            f"natively, as the teachers' dtype auto); teacher top-{cfg.cache_top_k}.",
            f"- **Best rate** of a method: the rate whose checkpoints reach the most S with DG <= {cfg.dg_budget:g} "
            "(the grid's seed), the same rule for both methods.",
            "- **S** = relative drop of specialized validation perplexity, **DG** = relative rise of general "
            "validation perplexity, both against the reference. \"S at DG <= x\": the most S of any evaluated "
            "checkpoint whose DG is at most x; \"DG FT - DG MFT at matched S\": MFT's checkpoint with the most S within "
            f"DG <= {cfg.dg_budget:g}, against the least DG of any FT checkpoint (any rate, same seed) that "
            "specializes at least as much (positive: MFT forgets less; n/a: no FT checkpoint got that far).", ""]
    done_cells = [(d, b) for d, b in planned_cells if _cell_runs(record, d, b)]
    missing = [f"{d}/{b}" for d, b in planned_cells if (d, b) not in done_cells]
    if missing:
        doc += [f"**Partial**: no run yet for {', '.join(missing)}; rerun `make regime` to continue.", ""]
    for domain in cfg.domain_names():
        cells = [b for d, b in done_cells if d == domain]
        if not cells:
            continue
        doc += [f"### {domain}", ""]
        base = next(r for r in runs.values() if r["domain"] == domain)["summary"]
        doc += [f"Start: specialized perplexity {_fmt(base['base_ppl_specialized'])}, general "
                f"{_fmt(base['base_ppl_general'])}.", "",
                "| budget | method | best lr | seeds | S at DG <= 0 | S at DG <= " + f"{cfg.dg_budget:g}"
                + " | DG there | DG FT - DG MFT at matched S |", "|---|---|---|---|---|---|---|---|"]
        summaries = {}
        first_mft = f"MFT tau {cfg.tau_values()[0]:g}"
        for b in cells:
            summary = cell_summary(cfg, _cell_runs(record, domain, b))
            summaries[b] = summary
            for name, m in summary["methods"].items():
                if m["rate"] is None:
                    continue
                rows = m["seeds"]
                ran, planned = m["grid"]
                rate = lr_tag(m["rate"]) + ("" if ran == planned or name.startswith("MFT tau") and name != first_mft
                                            else f" (so far: {ran} of {planned} rates run)")
                doc.append(f"| {b:,} | {name} | {rate} | {m['n']} | {_ms([r['S0'] for r in rows])} | "
                           f"{_ms([r['Sb'] for r in rows])} | {_ms([r.get('dg') for r in rows])} | "
                           f"{_ms([r.get('diff') for r in rows]) if name != 'FT' else ''} |")
        doc += ["", "Each rate (seed of the grid; S, DG at the checkpoint of least specialized perplexity, then the "
                f"most S within DG <= {cfg.dg_budget:g}):", "",
                "| budget | lr | FT S, DG | MFT S, DG | FT S at DG <= x | MFT S at DG <= x |", "|---|---|---|---|---|---|"]
        for b in cells:
            for lr, both in sorted(summaries[b]["rates"].items()):
                ft, mft = both.get("FT", {}), both.get("MFT", {})
                doc.append(f"| {b:,} | {lr_tag(lr)} | {_fmt(ft.get('S'))}, {_fmt(ft.get('DG'))} | "
                           f"{_fmt(mft.get('S'))}, {_fmt(mft.get('DG'))} | {_fmt(ft.get('Sb'))} | {_fmt(mft.get('Sb'))} |")
        doc.append("")
        for kind, fn in (("trajectory", plot_trajectories), ("frontier", plot_frontiers)):
            png = figures / f"regime_{domain}_{kind}.png"
            if fn(cfg, record, domain, cells, summaries, png):
                doc += [f"![{domain}: {kind}](docs/{png.name})", ""]
    section = "\n".join(doc) + "\n"
    old = report.read_text() if report.is_file() else "# Studies\n"
    write_text_atomic(report, replace_section(old, section))
    log.info("regime report written to %s (%d runs)", report, len(runs))



def _save(fig, png: Path) -> None:
    """The figure as a PNG, written atomically through mft_cache.files (never through a link)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(png, buf.getvalue())


def plot_trajectories(cfg, record, domain, budgets, summaries, png: Path) -> bool:
    """The paper's Figure 3: S and DG against steps, per budget, each method at its best rate (every seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(budgets), figsize=(4.2 * len(budgets), 6.4), squeeze=False, sharex=True)
    colours = {"FT": "tab:red", f"MFT tau {cfg.tau_values()[0]:g}": "tab:blue"}
    for j, b in enumerate(budgets):
        for name, colour in colours.items():
            m = summaries[b]["methods"].get(name)
            if not m or m["rate"] is None:
                continue
            method = "ft" if name == "FT" else "mft"
            mine = [r for r in _cell_runs(record, domain, b) if r["method"] == method and r["lr"] == m["rate"]
                    and (method == "ft" or r["tau"] == cfg.tau_values()[0])]
            for k, r in enumerate(sorted(mine, key=lambda r: r["seed"])):
                steps = [p["step"] for p in r["trajectory"] if p.get("S") is not None]
                for i, q in enumerate(("S", "DG")):
                    axes[i][j].plot(steps, [p[q] for p in r["trajectory"] if p.get("S") is not None], color=colour,
                                    alpha=0.9 if k == 0 else 0.45, lw=1.6 if k == 0 else 1.0,
                                    label=f"{name}, lr {m['rate']:g}" if k == 0 else None)
        axes[0][j].set_title(f"{domain}, {b:,} tokens")
        axes[0][j].set_ylabel("S (higher: more specialized)")
        axes[1][j].set_ylabel("DG (lower: less forgetting)")
        axes[1][j].set_xlabel("step")
        axes[1][j].axhline(0, color="grey", lw=0.6)
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, png)
    return True


def plot_frontiers(cfg, record, domain, budgets, summaries, png: Path) -> bool:
    """Every checkpoint of every run of each method in the (S, DG) plane, and each method's Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.0), squeeze=False)
    for j, b in enumerate(budgets):
        ax = axes[0][j]
        for method, colour, label in (("ft", "tab:red", "FT"), ("mft", "tab:blue", "MFT (all taus)")):
            pts = [p for r in _cell_runs(record, domain, b) if r["method"] == method for p in _points(r)]
            if not pts:
                continue
            ax.scatter([s for s, _ in pts], [d for _, d in pts], s=8, color=colour, alpha=0.35)
            from mft_cache.trainer.matched import pareto_front

            front = pareto_front(pts)
            ax.step([s for s, _ in front], [d for _, d in front], where="pre", color=colour, lw=1.8, label=label)
        ax.axhline(cfg.dg_budget, color="grey", lw=0.6, ls="--")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{domain}, {b:,} tokens")
        ax.set_xlabel("S")
        ax.set_ylabel("DG")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, png)
    return True
