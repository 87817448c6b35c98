"""`mft study` (`make study`): the paper's compositions and ablations on the demo, tables written by one command.

a) FT, MFT and the two ablations (the paper's Table 3);
b) MFT and FT x {none, LoRA, DoRA, IA3} and x replay (Tables 2 and 4);
c) cached top-k for k in {1, 4, 16, 64, 256} against the online full-vocabulary teacher, the tail
   bucket against renormalising the top-k and against dropping the tail, and the q8 encoding of a
   k=32 cache against float16;
d) tau in {0, 0.1, 0.25, 0.5, 0.75, 1} from one cache.

One teacher pass writes a k=256 cache; every cached run reads it, smaller k through `--top-k`
(top-k is sorted, so its first k columns ARE the top-k cache). Replay documents are general-domain
documents disjoint from the general-domain validation set, cached once by the same teacher. Every
run resumes: rerunning the command after a crash redoes only what is missing.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from mft_cache.config import check_finite, opt
from mft_cache.files import (claim_folder, is_temporary, open_owned, read_json_object, write_json_atomic,
                             write_text_atomic)
from mft_cache.rows import read_documents

log = logging.getLogger(__name__)

PARTS = "abcd"
K_VALUES = (1, 4, 16, 64, 256)
TAUS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
ADAPTERS = ("lora", "dora", "ia3")


@dataclass(frozen=True)
class StudyConfig:
    # -- study: what `mft study` runs and where it reports (the runs take the options of `mft train`)
    report: str = opt("STUDIES.md", "markdown report to write (tables and plots)", group="study")
    parts: str = opt(PARTS, "which parts to run: any of a, b, c, d", group="study")
    replay_source: str = opt("assets/data/bbc_val_full.jsonl", "general-domain documents to draw replay data from "
                             "(those also in --eval-general are left out)", group="study")
    replay_documents: int = opt(90, "how many replay documents to take", group="study")
    adapter_lr: float = opt(2e-3, "learning rate of the adapter runs (--peft trains far fewer weights)", group="study")
    cache_batch_size: int = opt(4, "teacher batch size of the study's caches", group="study")
    report_only: bool = opt(False, "train nothing: write the report from the runs already finished in --out",
                            group="study")

    def __post_init__(self):
        check_finite(self)
        if not self.adapter_lr > 0:
            raise ValueError(f"--adapter-lr must be positive; got {self.adapter_lr}")


def _write_replay(cfg: StudyConfig, tcfg, path: Path) -> Path:
    if path.exists():
        return path
    held_out = (set(read_documents(tcfg.eval_general, text_field=tcfg.text_field, what="--eval-general").texts)
                if tcfg.eval_general else set())
    source = read_documents(cfg.replay_source, text_field=tcfg.text_field, what="--replay-source")
    docs = [t for t in source.texts if t not in held_out]
    if len(docs) < cfg.replay_documents:
        raise ValueError(f"--replay-source {cfg.replay_source}: {len(docs)} documents outside --eval-general, "
                         f"fewer than --replay-documents {cfg.replay_documents}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps({"text": t}) + "\n" for t in docs[: cfg.replay_documents]))
    return path


def study_runs(cfg: StudyConfig, tcfg, caches: dict) -> list[tuple[str, str, dict]]:
    """(part, run name, TrainConfig overrides) of every run, each run once (shared runs listed first)."""
    main = {"cache": str(caches["main"]), "top_k": 32}
    runs: list[tuple[str, str, dict]] = []
    if "a" in cfg.parts:
        for obj in ("ft", "mft", "distill-partial", "corrective-ft"):
            runs.append(("a", obj, {**main, "objective": obj}))
    if "b" in cfg.parts:
        for obj in ("ft", "mft"):
            runs.append(("b", obj, {**main, "objective": obj}))
            for method in ADAPTERS:
                runs.append(("b", f"{obj}-{method}", {**main, "objective": obj, "peft": method, "lr": cfg.adapter_lr}))
            runs.append(("b", f"{obj}-replay", {**main, "objective": obj, "replay": str(caches["replay"]),
                                                "replay_fraction": tcfg.replay_fraction}))
    if "c" in cfg.parts:
        runs.append(("c", "mft-online", {"teacher": "online", "cache": ""}))
        for k in K_VALUES:
            runs.append(("c", f"mft-k{k}", {**main, "top_k": k}))
        for tail in ("renormalize", "drop"):
            runs.append(("c", f"mft-k16-{tail}", {**main, "top_k": 16, "tail": tail}))
        # the compact encoding: a k=32 q8 cache against the same k=32 read as float16
        runs.append(("c", "mft", {**main, "objective": "mft"}))
        runs.append(("c", "mft-k32-q8", {"cache": str(caches["q8"]), "top_k": 0}))
    if "d" in cfg.parts:
        for tau in TAUS:
            runs.append(("d", "mft" if tau == 0.25 else f"mft-tau{tau:g}", {**main, "objective": "mft", "tau": tau}))
    return runs


def study(cfg: StudyConfig, tcfg) -> dict:
    """Run the study; `tcfg` (a TrainConfig) holds the shared training settings, the teacher (--model), the
    finetuning documents (--data) and the study folder (--out), which the study claims as its own first."""
    if tcfg.push_to_hub:
        raise ValueError("--push-to-hub uploads one run; a study makes ~25: push the one you choose with `hf upload`")
    bad = set(cfg.parts) - set(PARTS)
    if bad or not cfg.parts:
        raise ValueError(f"--parts must be letters of {PARTS!r}; got {cfg.parts!r}")
    out = Path(tcfg.out)
    lock = claim_folder(out, "study", is_study_name, written_by_a_study)  # before any work: refused, nothing written
    try:
        return _run_study(cfg, tcfg, out)
    finally:
        lock.release()


# what `mft study` writes into --out besides its marker and lock, and files under a temporary name (.NAME.tmp-PID)
STUDY_FILES = ("caches", "data", "runs", "study.json")


def is_study_name(name: str) -> bool:
    """Whether `name` in a study's folder is one `mft study` writes (its marker and lock aside)."""
    return name in STUDY_FILES or is_temporary(name)


def written_by_a_study(out: Path) -> bool:
    """Whether a folder without the study's marker holds what a study wrote: its study.json (runs and parts)."""
    record = read_json_object(out / "study.json", 2**26) or {}
    return isinstance(record.get("runs"), dict) and isinstance(record.get("parts"), dict)


def _run_study(cfg: StudyConfig, tcfg, out: Path) -> dict:
    from mft_cache.pipeline.cache import DEFAULT_DATA, DEFAULT_MODEL, CacheConfig, build_cache
    from mft_cache.trainer.train import train

    model, data, seq_len = tcfg.model or DEFAULT_MODEL, tcfg.data or DEFAULT_DATA, tcfg.seq_len or 256
    # every run names the teacher, the data and the seq len: cached runs check them against the cache
    tcfg = replace(tcfg, model=model, data=data, seq_len=seq_len)
    caches = {"main": out / "caches" / "k256", "replay": out / "caches" / "replay", "q8": out / "caches" / "k32-q8"}
    if cfg.report_only:
        return collect(cfg, tcfg, out, study_runs(cfg, tcfg, caches), train=None)
    log.info("study: teacher pass for the k=256 cache (%s)", caches["main"])
    build_cache(CacheConfig(model=model, data=data, out=str(caches["main"]), seq_len=seq_len, top_k=max(K_VALUES),
                            batch_size=cfg.cache_batch_size))
    if "c" in cfg.parts:
        build_cache(CacheConfig(model=model, data=data, out=str(caches["q8"]), seq_len=seq_len, top_k=32,
                                logprob_dtype="q8", batch_size=cfg.cache_batch_size))
    if "b" in cfg.parts:
        replay_docs = _write_replay(cfg, tcfg, out / "data" / "replay.jsonl")
        build_cache(CacheConfig(model=model, data=str(replay_docs), out=str(caches["replay"]), seq_len=seq_len,
                                top_k=32, batch_size=cfg.cache_batch_size))
    return collect(cfg, tcfg, out, study_runs(cfg, tcfg, caches), train)


def collect(cfg: StudyConfig, tcfg, out: Path, todo: list, train) -> dict:
    """Run (with `train`) or only gather (train=None) every planned run; the report is rewritten after each
    run, so an interrupted study still has a report of what it finished."""
    results: dict[str, dict] = {}
    parts: dict[str, list[str]] = {p: [] for p in cfg.parts}
    record = {"config": dict(cfg.__dict__), "train": dict(tcfg.__dict__), "parts": parts, "runs": results,
              "planned": len({name for _, name, _ in todo})}
    for i, (part, name, overrides) in enumerate(todo, 1):
        run_dir = out / "runs" / name
        if name not in results:
            if train is not None:
                log.info("study run %d/%d: %s (part %s)", i, len(todo), name, part)
                summary = train(replace(tcfg, out=str(run_dir), resume=True, **overrides))
            elif (run_dir / "summary.json").exists():
                with open_owned(run_dir, "summary.json") as f:
                    summary = json.load(f)
            else:
                continue
            with open_owned(run_dir, "metrics.jsonl") as f:
                lines = [json.loads(x) for x in f]
            tail = [x["loss"] for x in lines if x["type"] == "train"][-5:]
            results[name] = {**summary, "final_loss": sum(tail) / len(tail) if tail else None}
        parts[part].append(name)
        write_json_atomic(out / "study.json", record)
        write_report(record, Path(cfg.report), out)
    return record


# -- the report ------------------------------------------------------------------------------------
def _f(v, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:+.1f}%" if pct else f"{v:.3f}"


def _table(names: list[str], runs: dict, extra: tuple = ()) -> str:
    head = ["run", "S", "DG", "DG/S", "ppl spec.", "ppl gen.", *[h for h, _ in extra]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r = runs[n]
        cells = [n, _f(r["S"], True), _f(r["DG"], True), _f(r["ratio"]), _f(r["best_ppl_specialized"]),
                 _f(r["best_ppl_general"]), *[fn(r) for _, fn in extra]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(record: dict, path: Path, out: Path) -> None:
    from mft_cache.trainer.sweep import plot_dg_vs_s

    runs, parts, t = record["runs"], record["parts"], record["train"]
    if not runs:
        return
    plots = path.parent / "docs"
    plots.mkdir(parents=True, exist_ok=True)
    base = next(iter(runs.values()))
    doc = [
        "# Studies",
        "",
        "Produced by `make study` (`mft study`); every number below comes from "
        f"`{out / 'study.json'}` of that run. Settings shared by every run: {t['steps']} steps of "
        f"{t['batch_size']} x {base['seq_len']} tokens, lr {t['lr']:g} (adapters {record['config']['adapter_lr']:g}), "
        f"tau {t['tau']:g}, evaluated on {t['eval_max_sequences'] or 'all'} sequences of each validation set. "
        "S = relative drop of specialized-domain perplexity, DG = relative rise of general-domain perplexity, both at "
        "the best specialized checkpoint; lower DG/S is better. Base perplexities: "
        f"specialized {_f(base['base_ppl_specialized'])}, general {_f(base['base_ppl_general'])}.",
        "",
    ]
    if len(runs) < record["planned"]:
        doc += [f"**Partial: {len(runs)} of {record['planned']} runs finished**; the others are missing from the tables.", ""]
    titles = {"a": "a) Objectives and the paper's ablations (Table 3)",
              "b": "b) Compositions: adapters and replay (Tables 2 and 4)",
              "c": "c) How many logits a cache needs, and the tail",
              "d": "d) tau from one cache"}
    for part in PARTS:
        if not parts.get(part):
            continue
        names = list(dict.fromkeys(parts[part]))
        extra = ()
        if part == "c":
            online = runs.get("mft-online", {}).get("final_loss")
            extra = (("final loss", lambda r: _f(r["final_loss"])),
                     ("gap to online", lambda r: _f(None if online is None or r["final_loss"] is None
                                                    else r["final_loss"] - online)))
        doc += [f"## {titles[part]}", "", _table(names, runs, extra), ""]
        png = plots / f"study_{part}.png"
        if plot_dg_vs_s([{**runs[n], "run": n} for n in names], png):
            doc += [f"![DG vs S, part {part}](docs/{png.name})", ""]
    from .regime_report import keep_section

    old = path.read_text() if path.is_file() else ""
    write_text_atomic(path, keep_section(old, "\n".join(doc) + "\n"))  # `mft regime`'s section stays
    log.info("study report written to %s", path)
