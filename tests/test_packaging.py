"""Packaging: the package folders pipeline/, rows/, storage/, trainer/ are installed as `mft_cache.pipeline`,
`mft_cache.rows`, `mft_cache.storage`, `mft_cache.trainer`, so they never shadow, nor get shadowed by, an unrelated
distribution that installs a top-level `trainer`, `pipeline`, `rows` or `storage`.

Checked for real in subprocesses (fake top-level packages first on PYTHONPATH, from a neutral folder
and from the repository root), statically (every import of our code, parsed with `ast`), and in the
installed metadata (the `mft` console script)."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mft_cache

ROOT = Path(mft_cache.__file__).resolve().parent.parent  # the repository root
STAGES = ("pipeline", "rows", "storage", "trainer")
OUR_DIRS = ("mft_cache", *STAGES)
TIMEOUT_S = 600

# Runs in the subprocess. Our modules are imported FIRST, and only then the top-level names, so a
# stray `import storage` (etc.) anywhere in our code would show up in `leaked`.
CHECK = textwrap.dedent('''
    import io, json, math, sys, contextlib
    import mft_cache, mft_cache.rows, mft_cache.storage, mft_cache.pipeline.cache, mft_cache.trainer.loss
    from mft_cache.storage import SCHEMA_VERSION, cache_schema
    from mft_cache.pipeline.cache import CacheConfig
    from mft_cache.trainer.loss import fused_linear_mft_loss
    import torch

    out = {}
    out["files"] = {m: sys.modules[m].__file__ for m in (
        "mft_cache", "mft_cache.rows", "mft_cache.rows.spec", "mft_cache.storage", "mft_cache.storage.writer",
        "mft_cache.pipeline", "mft_cache.pipeline.cache", "mft_cache.trainer", "mft_cache.trainer.loss")}
    out["leaked"] = sorted(m for m in sys.modules if m.split(".")[0] in ("trainer", "pipeline", "rows", "storage"))
    # our modules work
    out["schema_version"] = SCHEMA_VERSION
    out["schema_fields"] = [f.name for f in cache_schema(vocab_size=300, top_k=4, seq_len=8)]
    out["cache_config_seq_len"] = CacheConfig(model="m", data="d").seq_len
    loss = fused_linear_mft_loss(torch.zeros(2, 3), torch.zeros(5, 3), None, torch.tensor([1, 3]),
                                 torch.tensor([True, True]))
    out["loss"] = loss.tolist()
    # the CLI parses and prints its help
    from mft_cache.cli import main
    helps = {}
    for argv in (["--help"], ["cache", "--help"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                main(argv)
                code = None
            except SystemExit as e:
                code = e.code
        helps[" ".join(argv)] = [code, buf.getvalue()]
    out["help"] = helps
    # now the unrelated top-level packages: the fakes, not us
    import trainer, pipeline, rows, storage
    out["fakes"] = {m.__name__: [getattr(m, "FAKE", False), m.__file__] for m in (trainer, pipeline, rows, storage)}
    out["distinct"] = (mft_cache.storage is not storage and mft_cache.trainer is not trainer
                       and mft_cache.pipeline is not pipeline and mft_cache.rows is not rows)
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    """A folder holding unrelated top-level packages `trainer`, `pipeline`, `rows`, `storage` (FAKE = True)."""
    d = tmp_path_factory.mktemp("fake-site")
    for name in STAGES:
        (d / name).mkdir()
        (d / name / "__init__.py").write_text(f"FAKE = True\nNAME = {name!r}\n")
        (d / name / "loss.py").write_text("FAKE = True\n")  # a submodule name that exists in ours too
    return d


def _env(fakes: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fakes), *filter(None, [env.get("PYTHONPATH")])])  # fakes FIRST
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("PYTHONSAFEPATH", None)  # the cases below choose -P themselves
    return env


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def _check_ours(res: dict) -> None:
    for mod, file in res["files"].items():
        folder = "mft_cache" if mod == "mft_cache" else mod.split(".")[1]
        assert Path(file).resolve().is_relative_to(ROOT / folder), f"{mod} loaded from {file}, not {ROOT / folder}"
    assert res["leaked"] == [], f"our code imported top-level modules {res['leaked']}"
    assert res["schema_version"] == 3
    assert res["schema_fields"] == ["input_ids", "length", "label_mask", "topk_ids", "topk_logprobs", "label_logprob"]
    assert res["cache_config_seq_len"] == 256
    assert res["loss"] == pytest.approx(2 * math.log(5), rel=1e-6)  # the sum over two positions
    for argv, (code, text) in res["help"].items():
        assert code in (0, None), f"mft {argv} exited {code}"
        assert "usage: mft" in text
    assert "cache" in res["help"]["--help"][1] and "--shard-mb" in res["help"]["cache --help"][1]


def _check_fakes(res: dict, fakes: Path) -> None:
    for name in STAGES:
        is_fake, file = res["fakes"][name]
        assert is_fake is True, f"`import {name}` gave {file}, not the unrelated package"
        assert Path(file).resolve() == (fakes / name / "__init__.py").resolve()
    assert res["distinct"]


@pytest.mark.parametrize("where", ["neutral", "repo-root"])
def test_installed_names_neither_shadow_nor_are_shadowed(where, fakes, tmp_path):
    """A script (as a user runs one), from a neutral folder and from the repository root."""
    script = tmp_path / "scripts" / "check_imports.py"
    script.parent.mkdir()
    script.write_text(CHECK)
    cwd = fakes if where == "neutral" else ROOT
    res = _result(_run([sys.executable, str(script)], cwd, _env(fakes)))
    _check_ours(res)
    _check_fakes(res, fakes)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (safe path) is 3.11+")
def test_python_c_from_repo_root_with_safe_path(fakes):
    """`python -P -c` in the repository root: the cwd is not put on sys.path, so the fakes win."""
    res = _result(_run([sys.executable, "-P", "-c", CHECK], ROOT, _env(fakes)))
    _check_ours(res)
    _check_fakes(res, fakes)


def test_python_c_from_repo_root_still_loads_our_packages(fakes):
    """Plain `python -c` / `python -m` in the repository root puts the root FIRST on sys.path (before
    PYTHONPATH), so there the repository's own folders answer `import trainer` (Python's rule, not
    the package's). What must hold even then: `mft_cache.*` loads our files, works, and never goes
    through the top-level names."""
    res = _result(_run([sys.executable, "-c", CHECK], ROOT, _env(fakes)))
    _check_ours(res)
    assert res["distinct"]


@pytest.mark.parametrize("where", ["neutral", "repo-root"])
def test_cli_help_runs_with_fakes_first(where, fakes):
    cwd = fakes if where == "neutral" else ROOT
    env = _env(fakes)
    commands = [[sys.executable, "-m", "mft_cache.cli", "--help"]]
    script = Path(sys.executable).parent / "mft"  # the console script `pip install -e .` wrote
    commands.append([str(script), "cache", "--help"] if script.is_file() else
                    [sys.executable, "-m", "mft_cache.cli", "cache", "--help"])
    for argv in commands:
        proc = _run(argv, cwd, env)
        assert proc.returncode == 0, f"{argv}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "usage: mft" in proc.stdout


# -- static: every import of our code ---------------------------------------------------------------

def _our_files() -> list[Path]:
    files = [p for d in OUR_DIRS for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]
    assert any(p.parent.name == "storage" for p in files) and any(p.parent.name == "pipeline" for p in files)
    return files


def _module_name(path: Path) -> tuple[str, bool]:
    """The installed module name of one of our files (pipeline/cache.py -> mft_cache.pipeline.cache)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    parts = list(rel) if rel[0] == "mft_cache" else ["mft_cache", *rel]
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, written as an absolute import) for every import in the file,
    including `from X import Y` as both X and X.Y (Y may be a submodule) and string literals passed
    to importlib.import_module / __import__."""
    module, is_pkg = _module_name(path)
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, True) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                assert node.level - 1 < len(base_parts), f"{path}:{node.lineno}: relative import beyond mft_cache"
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.append((node.lineno, base, not node.level))
            found += [(node.lineno, f"{base}.{a.name}", not node.level) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if fname in ("import_module", "__import__") and not node.args[0].value.startswith("."):
                found.append((node.lineno, node.args[0].value, True))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_absolute_import_of_top_level_stage_names():
    bad = [f"{p.relative_to(ROOT)}:{line}: import {name}"
           for p in _our_files() for line, name, absolute in _imports(p)
           if absolute and any(_under(name, s) for s in STAGES)]
    assert not bad, "import our stages as mft_cache.<stage> (or relatively), never by the top-level name:\n" + "\n".join(bad)


FORBIDDEN = {  # the import direction: the stages (pipeline, trainer) on top, never importing each other; rows and
    # storage below them, neither importing the other; storage knows no transformers
    "rows": ("mft_cache.pipeline", "mft_cache.trainer", "mft_cache.storage"),
    "storage": ("mft_cache.pipeline", "mft_cache.trainer", "mft_cache.rows", "transformers"),
    "trainer": ("mft_cache.pipeline",),
    "pipeline": ("mft_cache.trainer",),
}


@pytest.mark.parametrize("stage", list(FORBIDDEN))
def test_import_direction(stage):
    files = sorted(p for p in (ROOT / stage).rglob("*.py") if "__pycache__" not in p.parts)
    if not files:
        pytest.skip(f"{stage}/ has no files yet")
    bad = [f"{p.relative_to(ROOT)}:{line}: imports {name}"
           for p in files for line, name, _ in _imports(p)
           if any(_under(name, f) for f in FORBIDDEN[stage])]
    assert not bad, f"{stage}/ must not import {FORBIDDEN[stage]}:\n" + "\n".join(bad)


def test_relative_imports_resolve_inside_mft_cache():
    """The resolver above maps e.g. `from ..storage import x` in pipeline/ to mft_cache.storage; a
    sanity check on a known file so the static tests cannot pass vacuously."""
    names = {n for _, n, _ in _imports(ROOT / "pipeline" / "cache.py")}
    assert "mft_cache.pipeline.teacher" in names and "mft_cache.storage" in names
    names = {n for _, n, _ in _imports(ROOT / "storage" / "__init__.py")}
    assert "mft_cache.storage.writer" in names


# -- metadata ----------------------------------------------------------------------------------------

def test_console_script_entry_point():
    eps = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "mft"]
    assert len(eps) == 1, eps
    assert eps[0].value == "mft_cache.cli:main"
    assert eps[0].dist is not None and eps[0].dist.metadata["Name"] == "mft-cache"
    assert callable(eps[0].load())


def test_distribution_installs_only_the_mft_cache_top_level():
    dist = importlib.metadata.distribution("mft-cache")
    top = (dist.read_text("top_level.txt") or "").split()
    assert top in ([], ["mft_cache"]), top
    assert not set(top) & set(STAGES)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is 3.11+")
def test_pyproject_maps_stage_folders_into_mft_cache():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {"mft_cache": "mft_cache", **{f"mft_cache.{s}": s for s in STAGES}}
    assert sorted(cfg["packages"]) == sorted(["mft_cache", *(f"mft_cache.{s}" for s in STAGES)])
    assert all(not p.split(".")[0] in STAGES for p in cfg["packages"])
