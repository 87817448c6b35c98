"""W&B and MLflow, offline (docs/HF.md, "Trackers"): `--report-to wandb|mlflow|all` sends each tracker the numbers of
metrics.jsonl at the same steps, read back from the tracker's own files (W&B's offline run file, MLflow's client on a
file store); the trackers write where their settings say, never into --out, the home folder or the working folder,
and nothing leaves the machine; a store MLflow cannot open is refused before any work; a tracker that fails to start
stops the run with exit 2, and --resume runs it."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import assert_same_scalars, expected_scalars, subprocess_env, tensorboard_scalars, tiny_flags
from mft_cache.cli import main

# what `mft train` writes into --out with these flags (tiny_flags: no samples, no checkpoints), trackers or not
RUN_FILES = {".mft-run.json", "config.json", "metrics.jsonl", "summary.json", "s_dg.png", "best", "final"}


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


def need(package: str):
    return pytest.importorskip(package, reason=f"{package} is not installed (part of the test extra: "
                                               "pip install -e '.[test]')")


def offline_env(root: Path) -> dict[str, str]:
    """docs/HF.md's offline settings, every folder under `root`; HOME and the working folder elsewhere, to be checked
    empty afterwards (MPLCONFIGDIR: matplotlib's font cache is the plot's, not a tracker's)."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root / "trackers"),
            "WANDB_CACHE_DIR": str(root / "trackers" / "cache"),
            "MLFLOW_TRACKING_URI": (root / "trackers" / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HOME": str(root / "home"), "MPLCONFIGDIR": str(root / "mpl"), "TMPDIR": str(root / "tmp")}


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """This process set up as offline_env(tmp_path) says, in an empty working folder; the home and working folders
    are checked empty at the end. Yields the folder the trackers write to."""
    for key in [k for k in os.environ if k.startswith(("WANDB_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    for name in ("home", "cwd", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield tmp_path / "trackers"
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # W&B's service and settings are per process: the next test starts afresh
    assert not any((tmp_path / "home").iterdir()) and not any((tmp_path / "cwd").iterdir())


# -- reading the trackers back ----------------------------------------------------------------------------------
def wandb_runs(trackers: Path) -> dict[str, dict]:
    """Every offline W&B run under WANDB_DIR, by run name: {"project", "config", "history": {tag: {step: value}}}."""
    runs = {}
    for folder in sorted((trackers / "wandb").glob("offline-run-*")):
        (run_file,) = folder.glob("run-*.wandb")
        run = {"config": {}, "history": {}}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["project"], run["name"] = record.run.project, record.run.display_name
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for tag, value in items.items():
                    if not tag.startswith("_"):  # _step, _runtime, _timestamp: W&B's own
                        run["history"].setdefault(tag, {})[items["_step"]] = value
        runs[run["name"]] = run
    return runs


def wandb_records(path: Path):
    """The records of a W&B run file (wandb has no reader of its own for offline runs): a 7-byte header (':W&B',
    magic, version), then LevelDB's log format, 32 KiB blocks of chunks (crc32c: 4 bytes, length: 2, type: 1 full,
    2 first, 3 middle, 4 last), whose payloads are wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def mlflow_runs(trackers: Path, experiment: str) -> dict[str, dict]:
    """Every run of an MLflow experiment in the file store under `trackers`, by run name, read with MlflowClient:
    {"params", "history": {tag: {step: value}}}."""
    from mlflow import MlflowClient

    client = MlflowClient((trackers / "mlruns").as_uri())
    runs = {}
    for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id]):
        history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                   for key in run.data.metrics}
        runs[run.info.run_name] = {"params": run.data.params, "history": history}
    return runs


# -- the trackers hold the run's numbers ------------------------------------------------------------------------
def test_mlflow_file_store_holds_the_metrics_and_options_of_a_run(cache, docs_jsonl, tmp_path, offline):
    need("mlflow")
    out = tmp_path / "ml"
    assert main(["train", *tiny_flags(cache, docs_jsonl, out), "--report-to", "mlflow", "--run-name", "r1"]) == 0
    (run,) = mlflow_runs(offline, "mft-cache").values()
    assert_same_scalars(run["history"], expected_scalars(out), rel=0)  # float64 as logged
    options = json.loads((out / "config.json").read_text())
    assert run["params"] == {k: str(v) for k, v in options.items() if v is not None} and run["params"]["tau"] == "0.5"
    assert set(os.listdir(out)) == RUN_FILES and not (out.parent / "mlruns").exists()


def test_a_tracker_that_fails_to_start_exits_2_and_the_run_resumes(cache, docs_jsonl, tmp_path, offline, monkeypatch,
                                                                     capsys):
    wandb = need("wandb")
    out, start = tmp_path / "w", wandb.init

    def no_key(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)  # as W&B online without an account
    flags = [*tiny_flags(cache, docs_jsonl, out), "--report-to", "wandb", "--run-name", "r1"]
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb: a tracker failed to start (UsageError: No API key configured" in err, err
    assert "--resume" in err and "Traceback" not in err
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    monkeypatch.setattr(wandb, "init", start)
    assert main(["train", *flags, "--resume"]) == 0
    run = wandb_runs(offline)["r1"]
    assert run["project"] == "mft-cache" and run["config"]["tau"] == 0.5 and run["config"]["run_name"] == "r1"
    assert_same_scalars(run["history"], expected_scalars(out), rel=0)  # W&B keeps the float64 as JSON
    assert set(os.listdir(out)) == RUN_FILES


def test_a_sweep_logs_every_run_to_every_tracker(cache, docs_jsonl, tmp_path, offline):
    need("wandb")
    need("mlflow")
    flags = tiny_flags(cache, docs_jsonl, tmp_path / "sw")
    flags[flags.index("--steps") + 1] = "2"
    assert main(["sweep", *flags, "--taus", "0.25,1", "--no-ft", "--report-to", "all"]) == 0
    names = {"sw-mft-tau0.25": "mft-tau0.25", "sw-mft-tau1": "mft-tau1"}
    wandb, mlflow = wandb_runs(offline), mlflow_runs(offline, "sw")
    assert set(wandb) == set(mlflow) == set(names) and {r["project"] for r in wandb.values()} == {"sw"}
    for name, folder in names.items():
        want = expected_scalars(tmp_path / "sw" / folder)
        assert_same_scalars(wandb[name]["history"], want, rel=0)
        assert_same_scalars(mlflow[name]["history"], want, rel=0)
        assert_same_scalars(tensorboard_scalars(tmp_path / "sw" / "tensorboard" / name), want)


# -- nothing leaves the machine, nothing lands elsewhere ------------------------------------------------------------
# A process that reports every attempt to reach another machine from Python (DNS included) and refuses it; the
# trackers' own processes (wandb-core) are caught by a proxy that answers nothing (proxy_trap).
GUARD = """
import ipaddress, socket, sys
def _local(host):
    try:
        return host in (None, "", "localhost") or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
def _guard(event, args):
    if event in ("socket.connect", "socket.sendto") and isinstance(args[-1], tuple):
        host = args[-1][0]
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0]
    else:
        return
    if isinstance(host, bytes):
        host = host.decode()
    if not _local(host):
        sys.stderr.write(f"NETWORK {event} {host}\\n")
        raise OSError(f"offline test: {event} {host} refused")
sys.addaudithook(_guard)
"""


@contextlib.contextmanager
def proxy_trap():
    """A proxy at 127.0.0.1 that answers nothing: yields its URL and the first bytes of every connection to it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    hits, done = [], threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:  # the timeout: look at `done` again
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    hits.append(conn.recv(200))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", hits
    finally:
        done.set()
        thread.join()
        server.close()


def guarded_env(root: Path, proxy: str) -> dict:
    env = subprocess_env(**offline_env(root), HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy,
                         https_proxy=proxy, ALL_PROXY=proxy)
    for key in [k for k in env if k.startswith(("WANDB_", "MLFLOW_")) and k not in offline_env(root)]:
        del env[key]
    for key in ("NO_PROXY", "no_proxy", "PYTEST_CURRENT_TEST"):  # MLflow reads a test as "no telemetry": not here
        env.pop(key, None)
    for name in ("home", "cwd", "tmp"):
        (root / name).mkdir(exist_ok=True)
    return env


def test_the_guard_and_the_trap_catch_a_request(tmp_path):
    """The checks of the next test see what they are meant to see."""
    code = GUARD + """
import contextlib, socket, urllib.request
with contextlib.suppress(OSError):
    socket.getaddrinfo("example.com", 443)
with contextlib.suppress(OSError):
    urllib.request.urlopen("http://example.com/", timeout=5)
"""
    with proxy_trap() as (proxy, hits):
        env = guarded_env(tmp_path, proxy)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "NETWORK socket.getaddrinfo example.com" in done.stderr, done.stderr
    assert len(hits) == 1 and b"example.com" in hits[0]


def test_report_to_all_offline_reaches_no_other_machine_and_writes_only_where_told(cache, docs_jsonl, tmp_path,
                                                                                    monkeypatch):
    need("wandb")
    need("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store back here
    out = tmp_path / "all"
    code = GUARD + "from mft_cache.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    args = ["train", *tiny_flags(cache, docs_jsonl, out), "--report-to", "all", "--run-name", "r1"]
    with proxy_trap() as (proxy, hits):
        env = guarded_env(tmp_path, proxy)
        done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tmp_path / "cwd", capture_output=True,
                              text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NETWORK" not in done.stderr and hits == [], (hits, done.stderr[-3000:])
    assert not any((tmp_path / "home").iterdir()) and not any((tmp_path / "cwd").iterdir())
    assert set(os.listdir(out)) == RUN_FILES | {"tensorboard"}
    assert sorted(os.listdir(tmp_path / "trackers")) == ["cache", "mlruns", "wandb"]
    want = expected_scalars(out)
    assert_same_scalars(tensorboard_scalars(out / "tensorboard" / "r1"), want)
    assert_same_scalars(wandb_runs(tmp_path / "trackers")["r1"]["history"], want, rel=0)
    assert_same_scalars(mlflow_runs(tmp_path / "trackers", "mft-cache")["r1"]["history"], want, rel=0)


# -- refused before any work ------------------------------------------------------------------------------------
def test_an_mlflow_store_that_cannot_be_opened_exits_2_before_any_work(cache, docs_jsonl, tmp_path, offline,
                                                                       monkeypatch, capsys):
    need("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://x")
    for report_to in ("mlflow", "all"):
        out = tmp_path / report_to
        assert main(["train", *tiny_flags(cache, docs_jsonl, out), "--report-to", report_to]) == 2
        err = capsys.readouterr().err
        assert f"--report-to {report_to}: MLflow cannot open its tracking store nosuchstore://x" in err, err
        assert "MLFLOW_TRACKING_URI" in err and not out.exists()
