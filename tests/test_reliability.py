"""The reliability suite: crashes, corruption, mismatches, full and read-only disks, non-finite
losses and code smuggled into checkpoints or model folders. Every case records its row of RELIABILITY.md
(`make reliability`) after its checks pass.

Real processes wherever the fault is the OS's: SIGKILL at named points (mft_cache/faults.py), a file
size limit (RLIMIT_FSIZE: the kernel refuses the write with EFBIG, as a full disk refuses it with
ENOSPC), and, where this machine lets the test mount one, a real full or read-only tmpfs."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model, make_texts, write_jsonl
from mft_cache.cli import main
from mft_cache.pipeline.cache import CacheConfig, build_cache

SEQ = 32
TIMEOUT = 600


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("rel-data")
    return {"train": write_jsonl(d / "train.jsonl", make_texts(30, seed=41)),
            "other": write_jsonl(d / "other.jsonl", make_texts(30, seed=42)),
            "spec": write_jsonl(d / "spec.jsonl", make_texts(4, seed=43))}


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def cache_cmd(model: Path, data: Path, out: Path, fmt: str = "zarr") -> list[str]:
    return [sys.executable, "-m", "mft_cache.cli", "cache", "--model", str(model), "--data", str(data), "--out", str(out),
            "--seq-len", str(SEQ), "--top-k", "8", "--shard-mb", "0.004", "--batch-size", "2", "--format", fmt]


def train_cmd(cache: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mft_cache.cli", "train", "--cache", str(cache), "--out", str(out), "--steps", "6",
            "--batch-size", "2", "--lr", "3e-3", "--save-every", "2", "--eval-every", "3", "--log-every", "100", *extra]


def run(cmd: list[str], limit_bytes: int = 0, **env) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=TIMEOUT,
                          preexec_fn=limit if limit_bytes else None)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files: anything hidden or named *.tmp / *.partial anywhere below (but a run folder's
    marker, .mft-run.json, which stays for good)."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != ".mft-run.json"
            and any(part.startswith(".") or part.endswith((".tmp", ".partial")) for part in p.relative_to(folder).parts)]


@pytest.fixture(scope="module")
def reference(llama, docs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel-ref") / "cache"
    build_cache(CacheConfig(model=str(llama), data=str(docs["train"]), out=str(out), seq_len=SEQ, top_k=8,
                            shard_mb=0.004, batch_size=2))
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) >= 5
    return out


# -- crash anywhere ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["cache:shard-0", "cache:shard-write", "cache:shard-3"])
def test_cache_killed_anywhere_resumes_byte_identical(fault, llama, docs, reference, tmp_path, reliability):
    out = tmp_path / "cache"
    killed = run(cache_cmd(llama, docs["train"], out), MFT_FAULT=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    done = run(cache_cmd(llama, docs["train"], out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert tree(out) == tree(reference) and not leftovers(out)
    reliability("crash", f"SIGKILL `mft cache` at `{fault}`", "no manifest; the same command resumes; cache byte-identical "
                "to an uninterrupted build; no temporary files left")


@pytest.fixture(scope="module")
def uninterrupted_run(reference, tmp_path_factory, docs) -> Path:
    out = tmp_path_factory.mktemp("rel-train") / "run"
    done = run(train_cmd(reference, out, "--eval-specialized", str(docs["spec"])))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _metrics(run_dir: Path) -> list[dict]:
    keep = ("type", "step", "loss", "lr", "tokens", "ppl_specialized", "S")
    return [{k: v for k, v in json.loads(x).items() if k in keep} for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fault", ["train:step-1", "train:checkpoint-2", "train:step-3", "train:step-6"])
def test_train_killed_anywhere_resumes_identical(fault, reference, uninterrupted_run, docs, tmp_path, reliability):
    out, evals = tmp_path / "run", ("--eval-specialized", str(docs["spec"]))
    killed = run(train_cmd(reference, out, *evals), MFT_FAULT=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    done = run(train_cmd(reference, out, *evals, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _metrics(out) == _metrics(uninterrupted_run)
    a, b = load_file(out / "final" / "model.safetensors"), load_file(uninterrupted_run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert not (out / "checkpoints").exists() and not leftovers(out)
    reliability("crash", f"SIGKILL `mft train` at `{fault}`", "`--resume` finishes with metrics and weights identical "
                "to an uninterrupted run; no checkpoints or temporary files left")


# -- corruption -------------------------------------------------------------------------------------
def _shard_file(cache: Path, index: int) -> Path:
    name = json.loads((cache / "manifest.json").read_text())["shards"][index]["name"]
    p = cache / name
    return max((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size) if p.is_dir() else p


def _flip(cache: Path):
    f = _shard_file(cache, 1)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x40
    f.write_bytes(bytes(b))


def _truncate(cache: Path):
    f = _shard_file(cache, 1)
    f.write_bytes(f.read_bytes()[:-7])


def _remove(cache: Path):
    shutil.rmtree(cache / json.loads((cache / "manifest.json").read_text())["shards"][1]["name"])


def _edit_manifest(cache: Path):
    m = json.loads((cache / "manifest.json").read_text())
    m["top_k"] = 4
    (cache / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case, damage, names", [
    ("a flipped byte in a shard", _flip, "shard-00001"),
    ("a truncated shard", _truncate, "shard-00001"),
    ("a missing shard", _remove, "shard-00001"),
    ("a hand-edited manifest", _edit_manifest, "manifest.json"),
])
def test_corruption_is_detected_naming_the_file(case, damage, names, reference, tmp_path, capsys, reliability):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    damage(cache)
    assert main(["inspect", str(cache), "--verify"]) == 3
    assert names in capsys.readouterr().err
    rows = json.loads((reference / "manifest.json").read_text())["num_sequences"]
    steps = str(rows // 4 + 1)  # one epoch: every shard is read, and checked when first read
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--steps", steps, "--save-every", "0"]) == 3
    assert names in capsys.readouterr().err and not (tmp_path / "run" / "summary.json").exists()
    reliability("corruption", case, f"`mft inspect --verify` exits 3 naming `{names}`; `mft train` exits 3 naming it "
                "when it opens the cache (missing, truncated, manifest) or first reads the shard (flipped bytes)")


def test_shard_copied_from_another_cache_is_detected(llama, docs, reference, tmp_path, capsys, reliability):
    other = tmp_path / "other"
    build_cache(CacheConfig(model=str(llama), data=str(docs["other"]), out=str(other), seq_len=SEQ, top_k=8,
                            shard_mb=0.004, batch_size=2))
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    name = json.loads((cache / "manifest.json").read_text())["shards"][2]["name"]
    shutil.rmtree(cache / name)
    shutil.copytree(other / name, cache / name)  # same name, same schema, same size class: another cache's rows
    assert main(["inspect", str(cache), "--verify"]) == 3
    assert name in capsys.readouterr().err
    reliability("corruption", "a shard copied in from another cache (same name and schema)",
                f"`mft inspect --verify` exits 3 naming `{name}` (its sha256 is not the manifest's)")


# -- mismatch ---------------------------------------------------------------------------------------
def test_student_with_other_weights_needs_the_flag(reference, tmp_path, capsys, caplog, reliability):
    other = make_model(tmp_path / "other-weights", "llama", seed=5)  # same tokenizer and vocabulary, new weights
    args = ["train", "--cache", str(reference), "--model", str(other), "--steps", "1", "--save-every", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "weights differ from those of the teacher" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    with caplog.at_level("WARNING"):
        assert main([*args, "--out", str(tmp_path / "b"), "--allow-different-student"]) == 0
    assert "--allow-different-student: the student" in caplog.text
    reliability("mismatch", "a student with other weights (another revision), same tokenizer",
                "refused (exit 2) unless `--allow-different-student`, which trains and says so in the log")


def test_teacher_folder_changed_since_caching_is_refused(llama, docs, tmp_path, capsys, reliability):
    teacher = tmp_path / "teacher"
    shutil.copytree(llama, teacher)
    cache = tmp_path / "cache"
    build_cache(CacheConfig(model=str(teacher), data=str(docs["train"]), out=str(cache), seq_len=SEQ, top_k=8))
    newer = make_model(tmp_path / "newer", "llama", seed=6)
    shutil.copy(newer / "model.safetensors", teacher / "model.safetensors")  # the folder now holds another revision
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "another revision" in capsys.readouterr().err
    reliability("mismatch", "the teacher's folder updated to another revision after caching",
                "refused (exit 2): the weight files' sha256 differs from the manifest's")


def test_other_data_or_seq_len_is_refused(reference, docs, tmp_path, capsys, reliability):
    base = ["train", "--cache", str(reference), "--out", str(tmp_path / "r"), "--steps", "1", "--save-every", "0"]
    assert main([*base, "--data", str(docs["other"])]) == 2
    assert "is not the data the cache" in capsys.readouterr().err
    assert main([*base, "--seq-len", str(SEQ * 2)]) == 2
    assert f"--seq-len {SEQ * 2} differs from the cache's {SEQ}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main([*base, "--data", str(docs["train"])]) == 0  # the right data passes the same check
    reliability("mismatch", "`--data` or `--seq-len` other than the cache's", "refused (exit 2) naming the flag; "
                "the cache's own data passes")


# -- disk full, read-only ---------------------------------------------------------------------------
def test_cache_on_a_full_disk_fails_clearly_then_resumes(llama, docs, reference, tmp_path, reliability):
    out = tmp_path / "cache"
    full = run(cache_cmd(llama, docs["train"], out), limit_bytes=6_000)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "File too large" in full.stderr and "run the same command again to resume" in full.stderr
    assert "Traceback" not in full.stderr and not (out / "manifest.json").exists()
    done = run(cache_cmd(llama, docs["train"], out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert tree(out) == tree(reference) and not leftovers(out)
    reliability("disk", "`mft cache` hits a file size limit mid-build (EFBIG from the kernel, as ENOSPC)",
                "exit 2 naming the error, no traceback, no manifest; rerun resumes to a byte-identical cache")


def test_train_on_a_full_disk_fails_clearly_then_resumes(reference, uninterrupted_run, docs, tmp_path, reliability):
    out, evals = tmp_path / "run", ("--eval-specialized", str(docs["spec"]))
    size = (uninterrupted_run / "final" / "model.safetensors").stat().st_size
    full = run(train_cmd(reference, out, *evals), limit_bytes=size // 2)  # fails writing the first weights
    assert full.returncode == 2, full.stderr[-2000:]
    assert "File too large" in full.stderr and "Traceback" not in full.stderr
    assert not (out / "summary.json").exists() and not list(out.glob("checkpoints/step-??????"))
    done = run(train_cmd(reference, out, *evals, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _metrics(out) == _metrics(uninterrupted_run)
    reliability("disk", "`mft train` cannot write its weights (file size limit)",
                "exit 2, no traceback, no complete checkpoint or summary; `--resume` then finishes identically")


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_cache_on_a_really_full_tmpfs(llama, docs, tmp_path, reliability):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "size=48k"):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN); the file-size-limit test covers the path")
    try:
        full = run(cache_cmd(llama, docs["train"], mnt / "cache"))
        assert full.returncode == 2, full.stderr[-2000:]
        assert "No space left on device" in full.stderr and "Traceback" not in full.stderr
        assert not (mnt / "cache" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    reliability("disk", "`mft cache` on a really full disk (48 KiB tmpfs, ENOSPC)", "exit 2, no traceback, no manifest")


def test_read_only_folder_fails_clearly(llama, docs, reference, tmp_path, reliability):
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
    elif not _mount_tmpfs(ro, "size=1m,ro"):
        pytest.skip("root without CAP_SYS_ADMIN: no read-only folder can be made here")
    try:
        for cmd in (cache_cmd(llama, docs["train"], ro / "cache"), train_cmd(reference, ro / "run")):
            res = run(cmd)
            assert res.returncode == 2, res.stderr[-2000:]
            assert ("Read-only file system" in res.stderr or "Permission denied" in res.stderr), res.stderr[-1000:]
            assert "Traceback" not in res.stderr and not list(ro.iterdir())
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
    reliability("disk", "`--out` in a read-only folder (cache and train)", "exit 2 naming the path; nothing written")


# -- numerics ---------------------------------------------------------------------------------------
def test_non_finite_loss_stops_or_is_skipped_and_counted(reference, tmp_path, reliability):
    stop = run(train_cmd(reference, tmp_path / "stop"), MFT_FAULT="train:nan-loss-3")
    assert stop.returncode == 2 and "non-finite loss (nan) at step 3 (global batch of cache rows [" in stop.stderr
    assert "the weights were not updated" in stop.stderr and "Traceback" not in stop.stderr
    skip = run(train_cmd(reference, tmp_path / "skip", "--skip-nonfinite", "1"), MFT_FAULT="train:nan-loss-3")
    assert skip.returncode == 0, skip.stderr[-2000:]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] == [3]
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped", False) for x in lines if x["type"] == "train"] == [False, False, True, False, False, False]
    weights = load_file(tmp_path / "skip" / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    reliability("numerics", "a NaN loss (and NaN gradients) at step 3", "stops with exit 2 naming the step and its rows, "
                "weights not updated; with `--skip-nonfinite 1` the step is skipped, counted in summary.json, "
                "and the weights stay finite")


# -- security ---------------------------------------------------------------------------------------
def test_malicious_pickle_in_a_checkpoint_never_runs(reference, tmp_path, reliability):
    out = tmp_path / "run"
    killed = run(train_cmd(reference, out), MFT_FAULT="train:step-3")
    assert killed.returncode == -signal.SIGKILL
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    target = out / "checkpoints" / "step-000002" / "optimizer.bin"
    assert target.exists()
    target.write_bytes(pickle.dumps(Evil()))
    res = run(train_cmd(reference, out, "--resume"))
    assert res.returncode == 2 and "cannot be loaded safely" in res.stderr, res.stderr[-2000:]
    assert not marker.exists()
    reliability("security", "a checkpoint file replaced by a pickle that runs a shell command",
                "refused by torch.load(weights_only=True): exit 2, the command never runs")


def test_model_code_never_runs_without_the_flag(llama, docs, tmp_path, capsys, reliability):
    evil = tmp_path / "evil-model"
    shutil.copytree(llama, evil)
    marker = tmp_path / "pwned"
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evil-custom", auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    code = main(["cache", "--model", str(evil), "--data", str(docs["train"]), "--out", str(tmp_path / "c"),
                 "--seq-len", str(SEQ)])
    assert code == 2 and "--model" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "c" / "manifest.json").exists()
    reliability("security", "a model folder whose config maps to its own Python code", "refused without "
                "`--trust-remote-code` (exit 2); the code never runs")


def test_nothing_read_is_evaluated_as_code(reliability):
    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("mft_cache", "pipeline", "storage", "trainer") for p in (root / d).rglob("*.py")]
    assert len(sources) > 20
    import re

    banned = re.compile(r"(?<![.\w])(eval|exec)\(|pickle\.loads?\(|allow_pickle=True|weights_only=False|yaml\.load\(|marshal\.")
    hits = [(p.name, m.group(0)) for p in sources for m in banned.finditer(p.read_text())]
    assert not hits, hits
    reliability("security", "code paths that could evaluate data (eval, exec, pickle, allow_pickle, weights_only=False)",
                "none in the package: manifests are JSON, shards Zarr/Arrow, documents.npy loads with allow_pickle=False")
