"""`mft train` runs against the runs they should reproduce: `python bench/compare_runs.py MODEL OUT.json REF:RUN...`.

For each pair: the largest difference of the training loss and of each evaluation's perplexity (relative), and of
every weight of best/ and final/ (absolute), beside how far training moved the weights from MODEL's; the schedule
(steps, tokens, rates) must be the same. Exits non-zero when a pair differs beyond float32 noise on a GPU: a loss or
perplexity by more than 1e-3 relative, a weight by more than a tenth of the largest move training made, or a weight of
REF missing from RUN. bench/gpu_check.sh runs it on FSDP against plain runs with the same global batch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

LOSS_RTOL, MOVE_FRACTION = 1e-3, 0.1


def weights(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    if not out:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def compare(model: Path, ref: Path, run: Path) -> dict:
    a, b = records(ref), records(run)
    schedule = [[(x["type"], x["step"], x["tokens"], x.get("lr")) for x in r] for r in (a, b)]
    result = {"ref": str(ref), "run": str(run), "same_schedule": schedule[0] == schedule[1]}
    result["max_rel_loss"] = max((abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)
                                  if x["type"] == "train"), default=None)
    result["max_rel_ppl"] = max((abs(x[k] - y[k]) / x[k] for x, y in zip(a, b) if x["type"] == "eval"
                                 for k in x if k.startswith("ppl_") and not k.endswith("_se") and x[k] is not None),
                                default=None)
    start = weights(model)
    for folder in ("final", "best"):
        if not (ref / folder).is_dir():
            continue
        w1, w2 = weights(ref / folder), weights(run / folder)
        common = sorted(w1.keys() & w2.keys())
        result[f"{folder}_missing"] = sorted(w1.keys() - w2.keys())
        result[f"{folder}_extra"] = sorted(w2.keys() - w1.keys())
        result[f"{folder}_max_abs_diff"] = max((w1[k].float() - w2[k].float()).abs().max().item() for k in common)
        result[f"{folder}_moved"] = max((w1[k].float() - start[k].float()).abs().max().item() for k in common
                                        if k in start)
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    result["num_processes"] = [s1.get("num_processes"), s2.get("num_processes")]
    problems = [] if result["same_schedule"] else ["schedule differs"]
    for key in ("max_rel_loss", "max_rel_ppl"):
        if result[key] is not None and result[key] > LOSS_RTOL:
            problems.append(f"{key} {result[key]:.2e} > {LOSS_RTOL}")
    for folder in ("final", "best"):
        if f"{folder}_max_abs_diff" in result:
            if result[f"{folder}_missing"]:
                problems.append(f"{folder}/ lacks {result[f'{folder}_missing'][:3]}")
            if result[f"{folder}_max_abs_diff"] > MOVE_FRACTION * result[f"{folder}_moved"]:
                problems.append(f"{folder}/ differs by {result[f'{folder}_max_abs_diff']:.2e}, training moved it by "
                                f"{result[f'{folder}_moved']:.2e}")
    result["problems"] = problems
    return result


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    model, out = Path(argv[0]), Path(argv[1])
    results = []
    for pair in argv[2:]:
        ref, run = pair.split(":", 1)
        try:
            results.append(compare(model, Path(ref), Path(run)))
        except (OSError, ValueError, KeyError) as e:  # a run that did not finish: no metrics, summary or weights
            results.append({"ref": ref, "run": run, "problems": [f"{type(e).__name__}: {e}"]})
            print(f"{Path(run).name} vs {Path(ref).name}: {results[-1]['problems'][0]}")
            continue
        r = results[-1]
        print(f"{Path(r['run']).name} vs {Path(r['ref']).name}: loss {r['max_rel_loss']:.2e} rel, ppl "
              f"{r['max_rel_ppl'] if r['max_rel_ppl'] is None else format(r['max_rel_ppl'], '.2e')} rel, final/ "
              f"{r.get('final_max_abs_diff', float('nan')):.2e} abs (training moved it {r.get('final_moved', 0):.2e}), "
              f"processes {r['num_processes']}: {'; '.join(r['problems']) or 'ok'}")
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
