"""`--report-to`: the run's step and evaluation metrics sent to TensorBoard, W&B or MLflow through Accelerate's
tracker API (Accelerator(log_with=...), init_trackers, log, end_training); metrics.jsonl is written either way.

TensorBoard's event files go to `<logging dir>/<run name>/`: `--out/tensorboard/<run name>/` for `mft train`, and
`<sweep --out>/tensorboard/<run>/` for every run of `mft sweep`, so `tensorboard --logdir` on that folder overlays
them. W&B and MLflow read their own settings (WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI, ...) and write where those
say, never into --out; the project (W&B project, MLflow experiment) is "mft-cache", or the sweep's folder name, and
the run name is --run-name. An MLflow tracking store that cannot be opened is refused before any work; a tracker that
fails to start stops the run with its own message, before the first step.

A run name is a name, never a path: --run-name is checked against mft_cache.names' pattern (no '/', no '..'), and
the default, --out's folder name, is made into one."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from mft_cache.names import check_run_name, safe_run_name

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "all")
TRACKERS = ("tensorboard", "wandb", "mlflow")
TRAIN_KEYS = ("loss", "lr", "tokens_per_s")
EVAL_KEYS = ("ppl_specialized", "ppl_general", "S", "DG", "ratio")


@dataclass(frozen=True)
class Tracking:
    logging_dir: Path  # TensorBoard writes to logging_dir / run_name
    project: str
    run_name: str


def tracking_of(out: Path, run_name: str, logging_dir: Path | None = None, project: str = "mft-cache") -> Tracking:
    """The trackers' folder, project and run name: `run_name` (refused unless a plain name: TensorBoard writes to
    logging_dir / run_name), or --out's folder name made into one."""
    if run_name:
        check_run_name(run_name)
    return Tracking(logging_dir or out / "tensorboard", project, run_name or safe_run_name(out.name))


def _available(name: str) -> bool:
    from accelerate.utils import imports

    return getattr(imports, f"is_{name}_available")()


def tracker_names(report_to: str) -> list[str]:
    """The trackers --report-to asks for; one that is not installed is refused naming the extra to install."""
    if report_to == "none":
        return []
    if report_to == "all":
        names = [n for n in TRACKERS if _available(n)]
        if not names:
            raise ValueError("--report-to all: none of tensorboard, wandb, mlflow is installed "
                             "(pip install 'mft-cache[tensorboard]')")
        return names
    if not _available(report_to):
        raise ValueError(f"--report-to {report_to}: the {report_to} package is not installed "
                         f"(pip install 'mft-cache[{report_to}]')")
    return [report_to]


def log_with(report_to: str, tracking: Tracking) -> list | None:
    """Accelerator(log_with=...): TensorBoard as Accelerate's own tracker, named for this run (so runs of a sweep
    share one logging folder), the others by name."""
    from accelerate.tracking import TensorBoardTracker

    names = tracker_names(report_to)
    if "mlflow" in names and os.environ.get("RANK", "0") == "0":  # the store is the first process's alone to open
        check_mlflow_store(report_to)
    return [TensorBoardTracker(tracking.run_name, tracking.logging_dir) if n == "tensorboard" else n
            for n in names] or None


def check_mlflow_store(report_to: str) -> None:
    """Open MLflow's tracking store as the run will (MlflowClient of MLFLOW_TRACKING_URI): one it cannot open is
    refused here, before --out is touched, rather than after the run folder is set up. MLflow's default store,
    sqlite:///mlflow.db in the working folder, needs the full `mlflow` package (SQLAlchemy); `mlflow-skinny` opens a
    server's http(s):// URL, or a file:// store where MLFLOW_ALLOW_FILE_STORE=true allows it."""
    import mlflow

    try:
        mlflow.MlflowClient()
    except Exception as e:  # MlflowException or the store registry's own: MLflow's message says which
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:1000]
        raise ValueError(f"--report-to {report_to}: MLflow cannot open its tracking store {mlflow.get_tracking_uri()} "
                         f"({reason}); set MLFLOW_TRACKING_URI to a server's http(s):// URL or a file:// folder (with "
                         "MLFLOW_ALLOW_FILE_STORE=true), or install the full mlflow package for sqlite:// "
                         "(docs/HF.md, Trackers)") from e


def start_trackers(accelerator, tracking: Tracking, resolved: dict) -> None:
    """init_trackers with the run's options as its configuration (scalars only: TensorBoard's hparams refuse None).
    A tracker that fails to start (W&B online without an API key, a server out of reach) is a ValueError naming
    --report-to, with the trackers that did start closed: the run stops before its first step, and --resume (which
    takes another --report-to) runs it."""
    if not accelerator.log_with:
        return
    config = {k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))}
    try:
        accelerator.init_trackers(tracking.project, config=config, init_kwargs={
            "wandb": {"name": tracking.run_name}, "mlflow": {"run_name": tracking.run_name}})
    except Exception as e:  # the tracker's own error, whatever its type: its message names what is missing
        for tracker in accelerator.trackers:
            with contextlib.suppress(Exception):  # one that never started has nothing to close
                tracker.finish()
        accelerator.trackers = []  # end_training, on the way out, must not finish them again
        raise ValueError(f"--report-to {resolved.get('report_to')}: a tracker failed to start "
                         f"({type(e).__name__}: {str(e).strip()[:1000]}); the run stopped before its first step: fix "
                         "it, or pass --report-to none, and rerun with --resume") from e


def log_record(accelerator, record: dict) -> None:
    """A metrics.jsonl record to the trackers at its step: train/loss, train/lr, train/tokens_per_s; eval/ppl_*,
    eval/S, eval/DG, eval/ratio (DG/S). Missing and non-finite values are left out."""
    if not accelerator.log_with:
        return
    prefix, keys = ("train", TRAIN_KEYS) if record["type"] == "train" else ("eval", EVAL_KEYS)
    values = {f"{prefix}/{k}": record[k] for k in keys
              if isinstance(record.get(k), (int, float)) and math.isfinite(record[k])}
    if values:
        accelerator.log(values, step=record["step"])
