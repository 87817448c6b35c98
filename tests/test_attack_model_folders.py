"""A model folder (--model) that is not what it claims: one whose config maps to its own Python code, a student with
other weights than the cache's teacher, a teacher folder updated since its cache was made. Each is refused (exit 2)
unless a flag says it is meant; code in a model folder never runs."""
from __future__ import annotations

import json
import shutil

from conftest import make_model
from helpers import SMALL_CACHE
from mft_cache.cli import main
from mft_cache.pipeline.cache import CacheConfig, build_cache

SEQ = SMALL_CACHE["seq_len"]


def test_model_code_never_runs_without_the_flag(llama, fault_docs, tmp_path, capsys, reliability):
    evil = tmp_path / "evil-model"
    shutil.copytree(llama, evil)
    marker = tmp_path / "pwned"
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evil-custom", auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    code = main(["cache", "--model", str(evil), "--data", str(fault_docs["train"]), "--out", str(tmp_path / "c"),
                 "--seq-len", str(SEQ)])
    assert code == 2 and "--model" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "c" / "manifest.json").exists()
    reliability("security", "a model folder whose config maps to its own Python code", "refused without "
                "`--trust-remote-code` (exit 2); the code never runs")


def test_student_with_other_weights_needs_the_flag(fault_cache, tmp_path, capsys, caplog, reliability):
    other = make_model(tmp_path / "other-weights", "llama", seed=5)  # same tokenizer and vocabulary, new weights
    args = ["train", "--cache", str(fault_cache), "--model", str(other), "--steps", "1", "--save-every", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "weights differ from those of the teacher" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    with caplog.at_level("WARNING"):
        assert main([*args, "--out", str(tmp_path / "b"), "--allow-different-student"]) == 0
    assert "--allow-different-student: the student" in caplog.text
    reliability("mismatch", "a student with other weights (another revision), same tokenizer",
                "refused (exit 2) unless `--allow-different-student`, which trains and says so in the log")


def test_teacher_folder_changed_since_caching_is_refused(llama, fault_docs, tmp_path, capsys, reliability):
    teacher = tmp_path / "teacher"
    shutil.copytree(llama, teacher)
    cache = tmp_path / "cache"
    build_cache(CacheConfig(model=str(teacher), data=str(fault_docs["train"]), out=str(cache), seq_len=SEQ, top_k=8))
    newer = make_model(tmp_path / "newer", "llama", seed=6)
    shutil.copy(newer / "model.safetensors", teacher / "model.safetensors")  # the folder now holds another revision
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "another revision" in capsys.readouterr().err
    reliability("mismatch", "the teacher's folder updated to another revision after caching",
                "refused (exit 2): the weight files' sha256 differs from the manifest's")
