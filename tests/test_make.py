"""The Makefile (docs/HF.md, "Presets"): `make -n` resolves the options its presets' config files hold, and make
variables given override them."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mft_cache.cli import parse

ROOT = Path(__file__).resolve().parents[1]


# what `make -n PRESET=... cache train sweep study` runs: the options of the presets' config files, as flags (the
# demo's train and sweep at the defaults chosen from its learning-rate sweep)
_OLD_MAKE = {
    "demo": [
        # --dtype float32: what auto gave on every CPU when the demo's tables were measured; it is pinned since auto
        # gives bf16 on a CPU with native bf16
        "cache --model assets/model --data assets/data/licenses_train.jsonl --out caches/demo --seq-len 256 --top-k 32 "
        "--format zarr --batch-size 4 --dtype float32",
        "train --cache caches/demo --out runs/demo --objective mft --tau 0.25 --steps 20 --batch-size 4 --lr 5e-4 "
        "--eval-every 10 --mixed-precision no --eval-specialized assets/data/licenses_val.jsonl --eval-general "
        "assets/data/bbc_val.jsonl --eval-max-sequences 0 --resume",
        "sweep --cache caches/demo --out runs/sweep --taus 0.1,0.25,0.5 --seeds 0,1,2 --lrs 2e-4,5e-4 --steps 20 "
        "--batch-size 4 --lr 5e-4 --eval-every 10 --mixed-precision no --eval-specialized "
        "assets/data/licenses_val.jsonl --eval-general assets/data/bbc_val.jsonl --eval-max-sequences 0 --resume",
        "study --model assets/model --data assets/data/licenses_train.jsonl --out runs/study --seq-len 256 --steps 20 "
        "--batch-size 4 --lr 5e-4 --tau 0.25 --eval-every 20 --save-every 5 --eval-specialized "
        "assets/data/licenses_val.jsonl --eval-general assets/data/bbc_val.jsonl --eval-max-sequences 16 --parts abcd "
        "--report STUDIES.md"],
    "gpu": [
        "cache --model assets/model --data assets/data/licenses_train_full.jsonl --out caches/gpu --seq-len 2048 "
        "--top-k 32 --format zarr --batch-size 16",
        "train --cache caches/gpu --out runs/gpu --objective mft --tau 0.25 --steps 1000 --batch-size 16 --lr 1e-5 "
        "--eval-every 100 --mixed-precision bf16 --eval-specialized assets/data/licenses_val_full.jsonl "
        "--eval-general assets/data/bbc_val_full.jsonl --eval-max-sequences 0 --resume",
        "sweep --cache caches/gpu --out runs/sweep --taus 0.1,0.25,0.5 --steps 1000 --batch-size 16 --lr 1e-5 "
        "--eval-every 100 --mixed-precision bf16 --eval-specialized assets/data/licenses_val_full.jsonl "
        "--eval-general assets/data/bbc_val_full.jsonl --eval-max-sequences 0 --resume",
        "study --model assets/model --data assets/data/licenses_train_full.jsonl --out runs/study --seq-len 2048 "
        "--steps 20 --batch-size 16 --lr 5e-4 --tau 0.25 --eval-every 20 --save-every 5 --eval-specialized "
        "assets/data/licenses_val_full.jsonl --eval-general assets/data/bbc_val_full.jsonl --eval-max-sequences 16 "
        "--parts abcd --report STUDIES.md"],
}


def make_commands(*make_args: str) -> list[list[str]]:
    """The mft command lines `make -n` would run (the executable dropped)."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), *make_args], capture_output=True, text=True, check=True).stdout
    lines = out.replace("\\\n", " ").splitlines()
    return [shlex.split(x)[1:] for x in lines if "bin/mft " in x]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("preset", ["demo", "gpu"])
def test_make_resolves_the_same_options_as_before_the_config_files(preset, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config paths in the commands are relative to the repository
    new = make_commands(f"PRESET={preset}", "cache", "train", "sweep", "study")
    assert [vars(parse(c)) | {"config": None} for c in new] == [
        vars(parse(shlex.split(c))) | {"config": None} for c in _OLD_MAKE[preset]]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_variables_still_override(monkeypatch):
    monkeypatch.chdir(ROOT)
    [train] = make_commands("train", "TAU=0.1", "STEPS=100", "RUN=runs/x")
    args = parse(train)
    assert (args.tau, args.steps, args.out, args.lr) == (0.1, 100, "runs/x", 5e-4)
