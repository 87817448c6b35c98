"""`mft regime` (`make regime`): MFT against plain finetuning tuned as hard, in the paper's regime, on several domains.

The paper's regime: a reference checkpoint first (the model lightly finetuned on general text, kept at its least
general validation perplexity), used as teacher and as the student's start; then many epochs over a small
specialized set, every run evaluated along the way, and each method reported at its best. This module runs that
on one CPU at a size it can afford and writes its section of STUDIES.md:

1. the reference: `mft train --objective ft --teacher online` on general documents disjoint from --eval-general,
   --best-by general, --reference-steps steps (0: none; the model itself is the start);
2. per domain, one cache of its training documents made by the reference (every budget is its first rows:
   `--train-rows`), so the teacher reads each domain once;
3. per domain and data budget, in this order, each a run of --steps steps:
   a. the grid, seed --seeds[0]: plain finetuning (FT) and MFT at tau --taus[0], each at every rate of --lrs;
   b. MFT at the other --taus, at MFT's best rate;
   c. the other seeds, each method at its best rate.
   A method's best rate is the one whose checkpoints reach the most specialization (S) while the general domain
   degrades by at most --dg-budget (DG <= dg_budget); "best" is decided from the grid, so it is the same rule
   for both methods.

Every run resumes (`mft train --resume`): rerunning the command continues where it stopped, and --max-minutes
stops it between runs, so the study runs in parts. --report-only writes the report from what is finished.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mft_cache.config import check_finite, opt
from mft_cache.names import lr_tag
from mft_cache.files import (claim_folder, is_temporary, open_owned, read_json_object, write_json_atomic,
                             write_text_atomic)
from mft_cache.rows import read_documents

log = logging.getLogger(__name__)

_DOMAIN = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MAX_LIST = 16  # values of any list option: a study of more runs than this allows is a typo


def _list(flag: str, text: str, kind, lo: float, hi: float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of {kind.__name__}") from None
    if not values or len(values) > MAX_LIST:
        raise ValueError(f"{flag}: give 1 to {MAX_LIST} values; got {len(values)}")
    if len(set(values)) < len(values):
        raise ValueError(f"{flag}: {text!r} repeats a value")
    for v in values:
        if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
            raise ValueError(f"{flag}: {v} is outside [{lo:g}, {hi:g}]")
    return values


@dataclass(frozen=True)
class RegimeConfig:
    # -- regime: the paper's regime, both methods tuned the same way (the runs take the options of `mft train`)
    domains: str = opt("licenses,pydocs,pycode", "specialized domains: each NAME reads --data-dir/NAME_train.jsonl "
                       "and NAME_val.jsonl", group="regime")
    data_dir: str = opt("assets/data", "folder of the domains' files", group="regime")
    budgets: str = opt("2048,8192", "data budgets in tokens: each trains on the first budget / --seq-len rows of the "
                       "domain's cache", group="regime", items=int)
    lrs: str = opt("5e-5,1.5e-4,5e-4", "learning rates of the grid, the same for both methods", group="regime",
                   items=float)
    taus: str = opt("0.25,0.1,0.5", "MFT's tau: the first in the grid, the others at MFT's best rate",
                    group="regime", items=float)
    seeds: str = opt("0,1,2", "seeds: the first for the grid, all of them at each method's best rate",
                     group="regime", items=int)
    dg_budget: float = opt(0.05, "a best rate reaches the most S at DG <= this (also a column of the report)",
                           group="regime")
    reference_data: str = opt("assets/data/bbc_val_full.jsonl", "general documents the reference checkpoint is "
                              "tuned on (those also in --eval-general are left out)", group="regime")
    reference_documents: int = opt(300, "how many of them", group="regime")
    reference_steps: int = opt(40, "steps of the reference finetune (0: no reference; the model is the start)",
                               group="regime")
    reference_lr: float = opt(5e-5, "its learning rate", group="regime")
    cache_top_k: int = opt(32, "top-k of the domains' caches", group="regime")
    max_minutes: float = opt(90.0, "start no further run after this many minutes (0: no limit; one run always "
                             "starts); rerun the same command to continue",
                             group="regime")
    report: str = opt("STUDIES.md", "the markdown file whose regime section is (re)written", group="regime")
    report_only: bool = opt(False, "train nothing: write the report from the runs finished in --out",
                            group="regime")

    def __post_init__(self):
        check_finite(self)
        for d in self.domain_names():
            if not _DOMAIN.match(d):
                raise ValueError(f"--domains: {d!r} is not a domain name (lower-case letters, digits, '-'; at most 32)")
        self.budget_values(), self.lr_values(), self.tau_values(), self.seed_values()
        if not 0.0 <= self.dg_budget <= 10.0:
            raise ValueError(f"--dg-budget must be in [0, 10]; got {self.dg_budget}")
        if not 0 <= self.reference_steps <= 100_000 or not 1 <= self.reference_documents <= 1_000_000:
            raise ValueError("--reference-steps must be in [0, 100000] and --reference-documents in [1, 1000000]")
        if not self.reference_lr > 0 or not 1 <= self.cache_top_k <= 4096 or self.max_minutes < 0:
            raise ValueError("--reference-lr must be positive, --cache-top-k in [1, 4096] and --max-minutes >= 0")

    def domain_names(self) -> list[str]:
        names = [d.strip() for d in self.domains.split(",") if d.strip()]
        if not names or len(names) > MAX_LIST or len(set(names)) < len(names):
            raise ValueError(f"--domains: give 1 to {MAX_LIST} different names; got {self.domains!r}")
        return names

    def budget_values(self) -> list[int]:
        return _list("--budgets", self.budgets, int, 1, 1 << 40)

    def lr_values(self) -> list[float]:
        return _list("--lrs", self.lrs, float, 1e-12, 10.0)

    def tau_values(self) -> list[float]:
        return _list("--taus", self.taus, float, 0.0, 1.0)

    def seed_values(self) -> list[int]:
        return _list("--seeds", self.seeds, int, 0, (1 << 32) - 1)


# -- the plan ------------------------------------------------------------------------------------------------------
def run_path(domain: str, budget: int, method: str, tau: float, lr: float, seed: int) -> str:
    """runs/<domain>/b<budget>/<ft|mft-tauT>-lr<LR>/seed<S>"""
    name = "ft" if method == "ft" else f"mft-tau{tau:g}"
    return f"runs/{domain}/b{budget}/{name}-lr{lr_tag(lr)}/seed{seed}"


def trajectory_points(trajectory: list[dict]) -> list[tuple[float, float]]:
    return [(p["S"], p["DG"]) for p in trajectory if p.get("S") is not None and p.get("DG") is not None]


def best_rate(trajectories: dict[float, list[dict]], dg_budget: float) -> float | None:
    """The rate (a key of `trajectories`, each a run's evaluations) whose checkpoints reach the most S with DG <=
    dg_budget; if none stays within it, the rate with the least DG at any checkpoint. None without trajectories."""
    from mft_cache.trainer.matched import best_s_within

    scored = {lr: best_s_within(trajectory_points(t), dg_budget) for lr, t in trajectories.items() if t}
    within = {lr: s for lr, s in scored.items() if s is not None}
    if within:
        return max(within, key=lambda lr: (within[lr], -lr))
    points = {lr: min(dg for _, dg in trajectory_points(t)) for lr, t in trajectories.items() if trajectory_points(t)}
    return min(points, key=lambda lr: (points[lr], lr)) if points else None


@dataclass(frozen=True)
class Planned:
    domain: str
    budget: int
    method: str  # "ft" or "mft"
    tau: float
    lr: float
    seed: int
    stage: str  # "grid", "tau", "seed"

    @property
    def path(self) -> str:
        return run_path(self.domain, self.budget, self.method, self.tau, self.lr, self.seed)


def plan_cell(cfg: RegimeConfig, domain: str, budget: int, done: dict[str, list[dict]]) -> list[Planned]:
    """The runs of one (domain, budget) cell that can be planned now: the grid always; the other taus and seeds
    once the grid's runs of that method are done (`done`: run path -> trajectory of each finished run)."""
    lrs, taus, seeds = cfg.lr_values(), cfg.tau_values(), cfg.seed_values()
    tau0, seed0 = taus[0], seeds[0]
    grid = [Planned(domain, budget, m, 1.0 if m == "ft" else tau0, lr, seed0, "grid") for lr in lrs for m in ("ft", "mft")]
    out = list(grid)
    for method in ("ft", "mft"):
        mine = [p for p in grid if p.method == method]
        if not all(p.path in done for p in mine):
            continue
        lr = best_rate({p.lr: done[p.path] for p in mine}, cfg.dg_budget)
        if lr is None:
            continue
        if method == "mft":
            out += [Planned(domain, budget, "mft", t, lr, seed0, "tau") for t in taus[1:]]
        out += [Planned(domain, budget, method, 1.0 if method == "ft" else tau0, lr, s, "seed") for s in seeds[1:]]
    return out


# -- running -------------------------------------------------------------------------------------------------------
REGIME_FILES = ("data", "caches", "runs", "reference", "regime.json")


def is_regime_name(name: str) -> bool:
    return name in REGIME_FILES or is_temporary(name)


def written_by_a_regime(out: Path) -> bool:
    record = read_json_object(out / "regime.json", 2**26) or {}
    return isinstance(record.get("runs"), dict) and isinstance(record.get("settings"), dict)


def regime(cfg: RegimeConfig, tcfg) -> dict:
    """Run (or, with --report-only, only report) the study into tcfg.out; tcfg (a TrainConfig) holds the settings
    every run shares: --model, --seq-len, --steps, --batch-size, --eval-every, --eval-general, ..."""
    if tcfg.push_to_hub:
        raise ValueError("--push-to-hub uploads one run; the regime study makes dozens")
    if not tcfg.eval_general:
        raise ValueError("mft regime needs --eval-general: DG is measured on it")
    data_dir = Path(cfg.data_dir)
    for d in cfg.domain_names():
        for split in ("train", "val"):
            if not (data_dir / f"{d}_{split}.jsonl").is_file():
                raise FileNotFoundError(f"--domains {d}: {data_dir / f'{d}_{split}.jsonl'} is missing (--data-dir "
                                        f"{cfg.data_dir}; the demo's domains: python -m demo domains --out assets)")
    out = Path(tcfg.out)
    lock = claim_folder(out, "regime", is_regime_name, written_by_a_regime)
    try:
        return _run(cfg, tcfg, out)
    finally:
        lock.release()


def _shared(tcfg, out: Path):
    """The options every specialization run shares (the study's own choices where the user left the default)."""
    return replace(tcfg, seq_len=tcfg.seq_len or 256, resume=True, save_weights="none", save_every=0, samples=0,
                   best_by="specialized", overwrite=False, report_to="none", data="")


def _run(cfg: RegimeConfig, tcfg, out: Path) -> dict:
    from mft_cache.pipeline.cache import DEFAULT_MODEL, CacheConfig, build_cache
    from mft_cache.trainer.sweep import read_trajectory
    from mft_cache.trainer.train import train

    model = tcfg.model or DEFAULT_MODEL
    base = _shared(replace(tcfg, model=model), out)
    started = time.monotonic()
    record = {"settings": {"regime": dict(cfg.__dict__), "train": {k: v for k, v in base.__dict__.items()}},
              "reference": None, "runs": {}}
    old = read_json_object(out / "regime.json", 2**26) or {}
    if isinstance(old.get("runs"), dict):
        record["runs"].update(old["runs"])
    start = model
    if cfg.reference_steps:
        ref_dir = out / "reference"
        if not cfg.report_only:
            general = _general_documents(cfg, tcfg, out / "data" / "general_train.jsonl")
            log.info("regime: the reference checkpoint (%d steps on %s)", cfg.reference_steps, general)
            train(replace(base, teacher="online", objective="ft", model=model, data=str(general), cache="",
                          steps=cfg.reference_steps, lr=cfg.reference_lr, best_by="general", save_weights="best",
                          eval_every=max(1, cfg.reference_steps // 5),
                          eval_specialized="", out=str(ref_dir), train_rows=0))
        if (ref_dir / "summary.json").exists():
            with open_owned(ref_dir, "summary.json") as f:
                record["reference"] = json.load(f)
        start = str(ref_dir / "best")
    timed_out, ran = False, 0  # every part runs at least one run: a rerun always gets further
    for domain in cfg.domain_names():
        cache = out / "caches" / domain
        if not cfg.report_only:
            build_cache(CacheConfig(model=start, data=str(Path(cfg.data_dir) / f"{domain}_train.jsonl"), out=str(cache),
                                    seq_len=base.seq_len, top_k=cfg.cache_top_k, batch_size=4))
        for budget in cfg.budget_values():
            rows = max(1, budget // base.seq_len)
            while True:
                done = {p: r["trajectory"] for p, r in record["runs"].items()}
                todo = [p for p in plan_cell(cfg, domain, budget, done) if p.path not in record["runs"]]
                todo = [p for p in todo if cfg.report_only is False or (out / p.path / "summary.json").exists()]
                if not todo:
                    break
                p = todo[0]
                if ran and cfg.max_minutes and (time.monotonic() - started) / 60 > cfg.max_minutes:
                    timed_out = True
                    break
                run_dir = out / p.path
                if not cfg.report_only:
                    log.info("regime run: %s (%s)", p.path, p.stage)
                    ran += 1
                    summary = train(replace(base, cache=str(cache), model="", objective=p.method, tau=p.tau, lr=p.lr,
                                            seed=p.seed, train_rows=rows, out=str(run_dir),
                                            eval_specialized=str(Path(cfg.data_dir) / f"{domain}_val.jsonl")))
                else:
                    with open_owned(run_dir, "summary.json") as f:
                        summary = json.load(f)
                record["runs"][p.path] = {**{k: getattr(p, k) for k in ("domain", "budget", "method", "tau", "lr",
                                                                          "seed", "stage")},
                                          "rows": rows, "epochs": base.steps * base.batch_size / rows,
                                          "summary": {k: summary.get(k) for k in SUMMARY_KEYS},
                                          "trajectory": read_trajectory(run_dir)}
                write_json_atomic(out / "regime.json", record)
                write_report(cfg, record, out)
            if timed_out:
                break
        if timed_out:
            break
    if timed_out:
        log.info("regime: --max-minutes %g reached; rerun the same command to continue", cfg.max_minutes)
    write_json_atomic(out / "regime.json", record)
    write_report(cfg, record, out)
    return record


SUMMARY_KEYS = ("S", "DG", "ratio", "best_step", "base_ppl_specialized", "base_ppl_general", "final_S", "final_DG",
                "wall_time_s", "train_time_s", "tokens", "model")


def _general_documents(cfg: RegimeConfig, tcfg, path: Path) -> Path:
    """The reference's general documents: --reference-data without those in --eval-general, the first
    --reference-documents of them, written once."""
    if path.exists():
        return path
    held_out = set(read_documents(tcfg.eval_general, text_field=tcfg.text_field, what="--eval-general").texts)
    source = read_documents(cfg.reference_data, text_field=tcfg.text_field, what="--reference-data")
    docs = [t for t in source.texts if t not in held_out][: cfg.reference_documents]
    if not docs:
        raise ValueError(f"--reference-data {cfg.reference_data}: no document outside --eval-general")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def write_report(cfg: RegimeConfig, record: dict, out: Path) -> None:
    from .regime_report import render

    render(cfg, record, out, Path(cfg.report))
