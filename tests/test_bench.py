"""Smoke test of the benchmark suite: `bench/run.py --quick` on tiny models built from config, in a temp
dir. Checks the shape of results.json and that every number is finite; never a timing."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _numbers(x, path=""):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.mark.slow  # about 1-2 minutes on 2 cores: a dozen fresh processes, each importing torch
def test_bench_quick(tmp_path):
    results = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--work", str(tmp_path / "work"),
                           "--results", str(results), "--dtypes", "float32,bfloat16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(results.read_text())
    assert set(r["sections"]) == {"train", "cache", "storage", "scaling"}
    for key in ("cpu", "cores", "torch", "transformers", "git_commit"):
        assert key in r["machine"]
    train = r["sections"]["train"]["modes"]
    assert set(train) == {"ft-hf", "ft", "mft-cache", "mft-online"}
    for m in train.values():
        assert m["step_s"] > 0 and m["peak_mb"] > 0 and set(m["phases_s"]) >= {"wait", "forward", "backward", "optimizer"}
        assert m["gflops"] > 0 and m["peak_share"] > 0
    # bf16 autocast rows beside float32, each against the float32 row of its mode and the bf16 matmul peak
    assert set(r["sections"]["train"]["peaks"]) == {"float32", "bfloat16"}
    bf16 = r["sections"]["train"]["bfloat16"]["modes"]
    assert set(bf16) == {"ft-hf", "mft-cache"}
    for m in bf16.values():
        assert m["step_s"] > 0 and m["gflops"] > 0 and m["speedup"] > 0 and m["peak_ratio_to_float32"] > 0
    assert bf16["ft-hf"]["step_ratio_bf16"] == 1.0
    # the step's FLOPs depend on the batch's shape alone: the same in both dtypes
    assert bf16["mft-cache"]["flops_per_step"] == train["mft-cache"]["flops_per_step"]
    cache = r["sections"]["cache"]
    for teacher, dtype in ((cache, "float32"), (cache["bfloat16"], "bfloat16")):
        assert teacher["dtype"] == dtype
        assert teacher["tokens_per_s"]["build_cache"] > 0 and teacher["tokens_per_s"]["bare"] > 0
        assert set(teacher["split_s"]) == {"forward", "head", "d2h", "encode", "write"}
        assert teacher["gflops"]["build_cache"] > 0 and teacher["peak_share"]["build_cache"] > 0
    assert cache["bfloat16"]["speedup"] > 0 and cache["peaks"]["bfloat16"]["gflops"] > 0
    targets = {v["target"] for v in r["verdicts"]}
    assert {"bf16 teacher >= 2.5 x the float32 teacher's throughput (`build_cache` tokens/s)",
            "cached MFT under bf16 autocast >= 1.6 x faster than in float32"} <= targets
    page = (tmp_path / "work" / "BENCHMARKS.md").read_text()
    assert "bf16 autocast" in page and "GFLOP/s" in page
    storage = r["sections"]["storage"]["rows"]
    assert {(x["format"], x["logprob_dtype"], x["k"]) for x in storage} >= {("zarr", "float16", 32), ("arrow", "float32", 128)}
    assert all(x["bytes_per_token"] > 0 for x in storage)
    scaling = r["sections"]["scaling"]["rows"]
    assert {x["vocab"] for x in scaling} >= {262_144} and {x["mode"] for x in scaling} == {"ft-hf", "mft-cache", "mft-online"}
    bad = [(p, v) for p, v in _numbers(r) if not math.isfinite(v)]
    assert not bad, bad[:10]
    assert r["verdicts"] and (tmp_path / "work" / "BENCHMARKS.md").exists()


@pytest.mark.slow  # about a minute: a fresh process per configuration
def test_bench_memory_section_quick(tmp_path):
    results = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--sections", "memory",
                           "--memory-modes", "ft-hf,mft-cache", "--memory-variants", "full,lora+ckpt,lora+bf16",
                           "--work", str(tmp_path / "work"), "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(results.read_text())
    rows = r["sections"]["memory"]["rows"]
    assert {(x["mode"], x["variant"]) for x in rows} == {(m, v) for m in ("ft-hf", "mft-cache")
                                                         for v in ("full", "lora+ckpt", "lora+bf16")}
    for x in rows:
        assert x["peak_mb"] > 0 and x["estimate_mb"] > 0 and x["step_s"] > 0
    assert [x["step_ratio"] for x in rows if (x["mode"], x["variant"]) == ("ft-hf", "full")] == [1.0]
    assert "Memory options" in (tmp_path / "work" / "BENCHMARKS.md").read_text()
    bad = [(p, v) for p, v in _numbers(r) if not math.isfinite(v)]
    assert not bad, bad[:10]


@pytest.mark.slow  # about two minutes: several `mft cache` processes
def test_bench_ingest_section_quick(tmp_path):
    results = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--sections", "ingest",
                           "--work", str(tmp_path / "work"), "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(results.read_text())["sections"]["ingest"]["rows"]
    assert [(x["scale"], x["code"]) for x in rows] == [(1, "streamed"), (2, "streamed")]
    # 2x is the 1x file twice: twice the documents and the packed stream. The rows' tokens are not exactly doubled:
    # every row continuing a document starts with an extra BOS, and where rows are cut depends on the whole stream
    assert rows[1]["documents"] == 2 * rows[0]["documents"] and rows[1]["stream_tokens"] == 2 * rows[0]["stream_tokens"]
    assert all(x["peak_rss_mb"] > 0 and x["input_tokens"] >= x["stream_tokens"] for x in rows)
    assert "Ingestion" in (tmp_path / "work" / "BENCHMARKS.md").read_text()


def test_memory_rows_measured_in_parts_are_kept_with_their_commit(tmp_path):
    """--memory-keep: a run of some memory rows keeps the earlier rows it did not measure, each stamped with the run
    that measured it and the allocator it ran under."""
    sys.path.insert(0, str(ROOT / "bench"))
    from memory_step import keep_memory_rows

    def row(mode, variant, peak):
        return {"model": "m", "seq_len": 256, "mode": mode, "variant": variant, "peak_mb": peak}

    old_stamp, new_stamp = {"commit": "old"}, {"commit": "new"}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"sections": {"memory": {
        "cpu_allocator": "lean", "measured": old_stamp,
        "rows": [row("mft-cache", "full", 1.0), row("ft-hf", "lora", 2.0), row("ft-hf", "full", 3.0)]}}}))
    args = type("A", (), {"memory_keep": True, "results": str(results)})
    section = {"cpu_allocator": "lean", "rows": [row("mft-cache", "full", 9.0)]}
    keep_memory_rows(section, args, new_stamp)
    got = [(r["mode"], r["variant"], r["peak_mb"], r["measured"]["commit"], r["cpu_allocator"]) for r in section["rows"]]
    assert got == [("ft-hf", "full", 3.0, "old", "lean"), ("ft-hf", "lora", 2.0, "old", "lean"),
                   ("mft-cache", "full", 9.0, "new", "lean")]
    assert section["kept_rows"] == 2
    other = {"cpu_allocator": "default", "rows": [row("ft-hf", "full", 7.0)]}
    keep_memory_rows(other, args, new_stamp)
    assert [(r["peak_mb"], r["cpu_allocator"]) for r in other["rows"]] == [(7.0, "default"), (2.0, "lean"),
                                                                           (1.0, "lean")]
    args.memory_keep = False
    alone = {"cpu_allocator": "lean", "rows": [row("ft", "full", 5.0)]}
    keep_memory_rows(alone, args, new_stamp)
    assert [r["measured"] for r in alone["rows"]] == [new_stamp]


def test_memory_rows_always_include_a_step_after_the_first(tmp_path, monkeypatch):
    """A run's peak needs the optimiser's state, which exists only after the first step: the memory section runs at
    least one untimed step before its timed ones, whatever --warmup says."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_step

    specs, caches = [], []
    monkeypatch.setattr(memory_step, "memory_models", lambda args, work, model: [("folder", "m")])
    monkeypatch.setattr(memory_step, "build_train_cache", lambda *a, **kw: caches.append(kw["sequences"]) or tmp_path)
    monkeypatch.setattr(memory_step.benchlib, "run_child", lambda script, spec, log: specs.append(spec) or {
        "memory": {"delta_mb": 100.0, "kind": "rss"}, "step_s": [1.0], "loss": [1.0], "params": 1, "trainable": 1})
    monkeypatch.setattr(memory_step, "plan_estimate", lambda spec, seq, device, profiles: {
        "total": 2**20 * 100.0, "peak_phase": "optimiser step"})
    args = type("A", (), {"memory_seq_lens": [256], "memory_modes": ["ft-hf"], "memory_variants": ["full"],
                          "warmup": 0, "steps": 1, "top_k": 8, "memory_allocator": "lean"})
    inputs = memory_step.benchlib.Inputs(tmp_path, "model", "data", "cpu")
    section = memory_step.section_memory(args, inputs)
    assert [s["warmup"] for s in specs] == [1] and section["warmup_steps"] == 1 and caches == [1 + 1 + 2]
    args.warmup = 3
    specs.clear()
    assert memory_step.section_memory(args, inputs)["warmup_steps"] == 3 and specs[0]["warmup"] == 3


def test_sections_registry_holds_each_section_once_with_its_own_flags():
    """bench/run.py runs what its registry holds, in order; each section's flags land in its own argument group and
    the defaults it resolves are those of --quick or of a full run."""
    sys.path.insert(0, str(ROOT / "bench"))
    import run

    assert list(run.SECTIONS) == ["train", "cache", "storage", "scaling", "memory", "ingest"]
    assert run.DEFAULT_SECTIONS == ("train", "cache", "storage", "scaling")
    assert sorted(run.VERDICT_ORDER) == sorted(run.SECTIONS)
    for name, section in run.SECTIONS.items():
        assert section.name == name and callable(section.run) and callable(section.table) and callable(section.verdicts)
    args = run.parse_args([])
    assert args.sections == list(run.DEFAULT_SECTIONS) and args.seq_lens == [128, 512, 1024]
    assert args.memory_seq_lens == [256, 2048] and args.ingest_scales == [1, 10, 100] and not args.no_profile
    quick = run.parse_args(["--quick", "--sections", "memory", "--memory-modes", "ft,mft-cache"])
    assert quick.memory_modes == ["ft", "mft-cache"] and quick.ingest_tokens == 20_000 and quick.no_profile
    with pytest.raises(SystemExit):
        run.parse_args(["--sections", "train,nothing"])
    with pytest.raises(SystemExit):
        run.parse_args(["--memory-variants", "full,huge"])
    assert args.dtypes == [] and run.parse_args(["--dtypes", "float32,bfloat16"]).dtypes == ["float32", "bfloat16"]
    for dtypes in ("bfloat16", "bfloat16,float32", "float32,float16", "float32,float32"):  # float32 first: the baseline
        with pytest.raises(SystemExit):
            run.parse_args(["--dtypes", dtypes])
    assert args.bf16_modes == ["ft-hf", "mft-cache"]
    with pytest.raises(SystemExit):
        run.parse_args(["--bf16-modes", "mft-cache+ckpt"])  # a mode the section runs only with --unfused
    assert run.parse_args(["--bf16-modes", "mft-cache+ckpt", "--unfused"]).bf16_modes == ["mft-cache+ckpt"]


def test_render_of_the_results_file_is_the_committed_page(tmp_path, capsys):
    """BENCHMARKS.md is generated: `bench/run.py --render bench/results.json` writes it again, byte for byte, from the
    sections' tables and verdicts."""
    sys.path.insert(0, str(ROOT / "bench"))
    import run

    page = tmp_path / "BENCHMARKS.md"
    run.main(["--render", str(ROOT / "bench" / "results.json"), "--markdown", str(page)])
    assert page.read_text() == (ROOT / "BENCHMARKS.md").read_text()
    assert "### Training step" in capsys.readouterr().out


def test_memory_ab_alternates_the_values_and_takes_ratios_within_a_repeat(tmp_path, monkeypatch, capsys):
    """bench/memory_ab.py: each row's values run one right after the other in every repeat, each with its setting in
    the child's spec, and a value's ratio is the median over repeats of value / first value in the same repeat."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_ab

    specs = []
    peaks = iter([100.0, 50.0, 300.0, 120.0, 200.0, 60.0, 300.0, 150.0])  # (row, value) in order, 2 repeats

    def child(script, spec, log):
        specs.append(spec)
        return {"memory": {"delta_mb": next(peaks)}, "step_s": [1.0 if spec["cpu_allocator"] == "default" else 1.5]}

    monkeypatch.setattr(memory_ab.benchlib, "run_child", child)
    monkeypatch.setattr(memory_ab, "build_train_cache", lambda *a, **kw: tmp_path / "cache")
    monkeypatch.setattr(memory_ab, "plan_estimate", lambda spec, seq, device, profiles: {"total": 2**20 * 90.0})
    out = tmp_path / "ab.json"
    memory_ab.main(["--rows", "ft-hf:full,mft-cache:lora+ckpt", "--vary", "cpu_allocator=default,lean",
                    "--repeats", "2", "--warmup", "0", "--work", str(tmp_path), "--out", str(out)])
    assert [(s["mode"], s["cpu_allocator"]) for s in specs] == [
        ("ft-hf", "default"), ("ft-hf", "lean"), ("mft-cache", "default"), ("mft-cache", "lean")] * 2
    assert all(s["warmup"] == 1 and s["chunk_size"] == 1024 for s in specs)
    assert specs[2]["peft"] == "lora" and specs[2]["checkpointing"] is True
    written = json.loads(out.read_text())
    lines = written["table"].splitlines()
    # ft-hf lean: 50/100 and 60/200 -> median 0.40; mft-cache lean: 120/300 and 150/300 -> 0.45
    assert "| lean | 55 | 0.40 |" in lines[3] and "| 1.50 |" in lines[3]
    assert "| lean | 135 | 0.45 |" in lines[5]
    with pytest.raises(SystemExit):
        memory_ab.parse_args(["--rows", "ft-hf:full", "--vary", "dtype=a,b"])
    with pytest.raises(SystemExit):
        memory_ab.parse_args(["--rows", "ft-hf:huge", "--vary", "chunk_size=1024,256"])
    assert "--vary" in capsys.readouterr().err


def test_flop_counts_and_default_dtypes(monkeypatch):
    """The FLOPs behind every GFLOP/s: parameters outside the embeddings counted once for a tied output layer, a
    forward 2 N P + 2 V H P_head + 4 L T d P, a training step three of them; bf16 rows by default only where the
    device computes bf16 natively."""
    sys.path.insert(0, str(ROOT / "bench"))
    import benchlib

    model = benchlib.build_llama(512, hidden=64, layers=2)
    shape = benchlib.model_shape(model)
    layers = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    assert shape["params_non_embedding"] == layers and shape["params"] == layers + 512 * 64
    assert (shape["vocab"], shape["hidden"], shape["layers"]) == (512, 64, 2)
    n, (p, head, t) = layers, (8 * 32, 8 * 31, 32)
    expected = 2 * n * p + 2 * 512 * 64 * head + 4 * 2 * t * shape["attention_width"] * p
    assert benchlib.forward_flops(shape, p, head, t) == expected
    assert benchlib.train_flops(shape, p, head, t) == 3 * expected
    monkeypatch.setenv("MFT_CPU_BF16", "1")
    assert benchlib.default_dtypes("cpu") == ["float32", "bfloat16"]
    monkeypatch.setenv("MFT_CPU_BF16", "0")
    assert benchlib.default_dtypes("cpu") == ["float32"]
