"""Config files (docs/HF.md, "Config files"): `--config FILE`, YAML or JSON, its keys as defaults that the flags
given override; a run's config.json reproduces the run; a bad file exits 2 naming the key and the file. The file is
untrusted: not a regular file (a FIFO, /dev/zero), too big or nested too deeply, it is refused before or while it
is parsed, and no message shows more than a bounded part of a value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import config_json, tiny_flags
from mft_cache.cli import main, parse


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


# -- config files ----------------------------------------------------------------------------------------
def test_a_yaml_config_and_the_same_flags_give_identical_config_json(cache, docs_jsonl, tmp_path):
    flags = tiny_flags(cache, docs_jsonl, tmp_path / "flags")
    assert main(["train", *flags]) == 0
    options = {k: v for k, v in config_json(tmp_path / "flags").items() if k in dict(zip(
        [f[2:].replace("-", "_") for f in flags[::2]], flags[1::2]))}
    (tmp_path / "c.yaml").write_text("train:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in options.items()))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "yaml")]) == 0
    a, b = config_json(tmp_path / "flags"), config_json(tmp_path / "yaml")
    assert a.pop("out") != b.pop("out") and a == b


def test_a_runs_config_json_reproduces_it(cache, docs_jsonl, tmp_path):
    assert main(["train", *tiny_flags(cache, docs_jsonl, tmp_path / "x"), "--seed", "3"]) == 0
    assert main(["train", "--config", str(tmp_path / "x" / "config.json"), "--out", str(tmp_path / "y")]) == 0
    a, b = config_json(tmp_path / "x"), config_json(tmp_path / "y")
    assert a.pop("out") != b.pop("out") and a == b
    lines = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "xy"]
    assert [x["loss"] for x in lines[0] if x["type"] == "train"] == [x["loss"] for x in lines[1] if x["type"] == "train"]


def test_flags_override_the_file_and_values_are_typed(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 7\nlr: 3e-4\ntrain:\n  tau: '0.5'\n  steps: 8\nsweep:\n  taus: 0.5\n")
    args = parse(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "1e-3"])
    assert (args.steps, args.lr, args.tau) == (8, 1e-3, 0.5) and isinstance(args.tau, float)
    assert parse(["sweep", "--config", str(tmp_path / "c.yaml")]).taus == "0.5"


@pytest.mark.parametrize("command, text, words", [
    ("train", "stepz: 3\n", ["unknown key 'stepz'", "c.yaml"]),
    ("train", "eval-every: 3\n", ["unknown key 'eval-every'", "eval_every"]),
    ("cache", "tau: 0.5\n", ["unknown key 'tau'", "mft cache"]),
    ("cache", "train:\n  tau: 0.5\nresolved_model: x\n", ["unknown key 'resolved_model'"]),
    ("train", "steps: many\n", ["steps", "not a valid value"]),
    ("train", "resume: 1\n", ["resume", "not a valid value"]),
    ("train", "objective: sft\n", ["objective", "not one of"]),
    ("train", "- steps\n", ["must hold a mapping"]),
    ("train", "steps: [\n", ["not valid YAML"]),
])
def test_a_bad_config_file_exits_2_naming_the_key_and_the_file(command, text, words, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "c.yaml") in err and all(w in err for w in words), err


# -- lists: a YAML/JSON list where the flag takes a comma-separated string ------------------------------------
def sweep_values(path: Path) -> tuple:
    from mft_cache.config import from_namespace
    from mft_cache.trainer.config import SweepConfig

    args = parse(["sweep", "--config", str(path)])
    sc = from_namespace(SweepConfig, args)
    return sc.tau_values(), sc.seed_values(), sc.lr_values(), args


@pytest.mark.parametrize("name, text", [
    ("c.yaml", "sweep:\n  taus: [0.1, 0.25, 0.5]\n  seeds: [0, 1, 2]\n  lrs: [2.0e-4, 5e-4]\n"),  # 5e-4: a YAML string
    ("c.yaml", "sweep:\n  taus:\n    - 0.1\n    - 0.25\n    - 0.5\n  seeds:\n    - 0\n    - 1\n    - 2.0\n"
               "  lrs: ['2e-4', 0.0005]\n"),
    ("c.json", '{"sweep": {"taus": [0.1, 0.25, 0.5], "seeds": [0, 1, 2], "lrs": [2e-4, 5e-4]}}'),
    ("c.json", '{"taus": [0.1, 0.25, 0.5], "seeds": [0, 1, 2], "lrs": [0.0002, 0.0005]}'),
])
def test_a_list_and_the_comma_string_give_the_same_values(name, text, tmp_path):
    (tmp_path / "s.yaml").write_text('sweep:\n  taus: "0.1,0.25,0.5"\n  seeds: "0,1,2"\n  lrs: "2e-4,5e-4"\n')
    (tmp_path / name).write_text(text)
    taus, seeds, lrs, args = sweep_values(tmp_path / name)
    assert (taus, seeds, lrs) == sweep_values(tmp_path / "s.yaml")[:3] == ([0.1, 0.25, 0.5], [0, 1, 2], [2e-4, 5e-4])
    assert args.seeds == "0,1,2" and isinstance(args.taus, str)  # what the flag holds, as `--seeds 0,1,2` gives it
    flags = parse(["sweep", "--taus", "0.1,0.25,0.5", "--seeds", "0,1,2", "--lrs", "2e-4,5e-4"])
    assert (args.taus, args.seeds) == (flags.taus, flags.seeds)


def test_lists_under_anchors_and_flags_over_them(tmp_path):
    (tmp_path / "c.yaml").write_text("train: &train\n  steps: 3\n  lr: 1.0e-3\n"
                                     "sweep:\n  <<: *train\n  taus: [0.5, 1]\n  seeds: []\n  lrs: [1.0e-3]\n")
    taus, seeds, lrs, args = sweep_values(tmp_path / "c.yaml")
    assert (taus, seeds, lrs) == ([0.5, 1.0], [], [1e-3]) and args.steps == 3  # []: the empty string, --seed alone
    args = parse(["sweep", "--config", str(tmp_path / "c.yaml"), "--taus", "0.25"])
    assert args.taus == "0.25" and args.lrs == "0.001"


def test_peft_targets_takes_a_list_of_module_names(tmp_path):
    (tmp_path / "c.yaml").write_text("peft: lora\npeft_targets: [q_proj, ' v_proj']\n")
    assert parse(["train", "--config", str(tmp_path / "c.yaml")]).peft_targets == "q_proj,v_proj"
    (tmp_path / "d.yaml").write_text("peft_targets: q_proj,v_proj\n")  # the string, as config.json writes it
    assert parse(["train", "--config", str(tmp_path / "d.yaml")]).peft_targets == "q_proj,v_proj"


def bomb(levels: int = 9) -> str:
    """A YAML alias bomb: a list of 10 lists of 10 ... (10^levels numbers) from a few hundred bytes."""
    lines = ["study:", "  a0: &a0 [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nsweep:\n  taus: *a{levels - 1}\n"


@pytest.mark.parametrize("command, text, words", [
    ("sweep", "taus: [[0.1, 0.2]]\n", ["taus", "item 0", "[0.1, 0.2]", "not a finite number"]),  # nested
    ("sweep", "taus: [0.1, true]\n", ["taus", "item 1, True,", "not a finite number"]),  # mixed types
    ("sweep", "taus: [0.1, null]\n", ["taus", "item 1, None,"]),
    ("sweep", "taus: [0.1, x]\n", ["taus", "item 1, 'x',"]),
    ("sweep", "taus: [0.1, {a: 1}]\n", ["taus", "item 1, {'a': 1},"]),
    ("sweep", "taus: [0.1, .inf]\n", ["taus", "item 1, inf,"]),
    ("sweep", "taus: [0.1, .nan]\n", ["taus", "item 1, nan,"]),
    ("sweep", "taus: [0.25, 0.250]\n", ["taus", "item 1, 0.25, is given twice"]),
    ("sweep", "seeds: [0, 1.5]\n", ["seeds", "item 1, 1.5,", "not an integer"]),
    ("sweep", "seeds: [0, '1.0']\n", ["seeds", "item 1, '1.0',", "not an integer"]),
    ("sweep", "seeds: [0, 2020-01-01]\n", ["seeds", "item 1, datetime.date(2020, 1, 1),"]),
    ("sweep", "lrs: [1.0e-4, [1.0e-3]]\n", ["lrs", "item 1"]),
    ("sweep", "no_ft: [true]\n", ["no_ft", "not a valid value for --no-ft"]),  # not a list option
    ("train", "steps: [3]\n", ["steps", "not a valid value for --steps"]),
    ("train", "peft_targets: [q_proj, 3]\n", ["peft_targets", "item 1, 3,", "without commas"]),
    ("train", "peft_targets: ['q_proj,v_proj']\n", ["peft_targets", "item 0", "without commas"]),
    ("train", "peft_targets: [q_proj, '']\n", ["peft_targets", "item 1, '',"]),
    ("study", "parts: [a, b]\n", ["parts", "not a valid value for --parts"]),
    ("sweep", bomb(), ["taus", "item 0", "not a finite number"]),  # 10^9 numbers by reference
    ("sweep", "taus: " + "[" * 5000 + "]" * 5000 + "\n", ["not valid YAML (nested too deeply"]),
    ("sweep", "taus: [0.5, 1" + "0" * 400 + "]\n", ["taus", "item 1, 1000", "not a finite number"]),  # no float
    ("train", "lr: 1" + "0" * 400 + "\n", ["lr", "not a valid value for --lr"]),
    ("train", "steps: " + "9" * 5000 + "\n", ["not valid YAML", "4300 digits"]),
])
def test_a_bad_list_exits_2_naming_the_key_and_the_file(command, text, words, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "c.yaml") in err and all(w in err for w in words), err
    assert len(err.partition(" error: ")[2]) < 1000  # a huge or deep value is shown shortened (after the usage)


def test_a_deeply_nested_json_list_exits_2(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"taus": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--config", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--config {tmp_path / 'c.json'}: not valid JSON (nested too deeply" in err, err


@pytest.mark.parametrize("name", ["c.json", "c.yaml"])
def test_a_huge_list_is_refused_at_once(name, tmp_path, capsys):
    import time

    from mft_cache.config import MAX_LIST_ITEMS

    n = 100_000 if name == "c.json" else 5_000  # PyYAML reads ~10^4 numbers a second
    values = [i / n for i in range(n)]
    (tmp_path / name).write_text(json.dumps({"taus": [0.5] * n}) if name == "c.json" else  # under MAX_CONFIG_BYTES
                                 "taus: [" + ", ".join(map(repr, values)) + "]\n")
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--config", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"taus: a list of {n:,} values; --taus takes at most {MAX_LIST_ITEMS}" in err, err
    assert str(tmp_path / name) in err and len(err.partition(" error: ")[2]) < 1000
    assert time.monotonic() - start < 30
    (tmp_path / name).write_text(json.dumps({"taus": values[:MAX_LIST_ITEMS]}))
    assert len(sweep_values(tmp_path / name)[0]) == MAX_LIST_ITEMS


def test_a_listed_value_out_of_range_is_refused_as_the_flag_refuses_it(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("taus: [0.5, 2]\nout: " + str(tmp_path / "s") + "\n")
    assert main(["sweep", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "--taus: 2.0 is outside [0, 1]" in capsys.readouterr().err and not (tmp_path / "s").exists()


# -- what the file is: a FIFO, a device, a folder, too big, nested too deeply ---------------------------------------
def _refused(argv: list[str], capsys) -> str:
    from helpers import deadline

    with deadline(), pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.partition(" error: ")[2]) < 1000, err
    return err


@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "folder"])
def test_a_config_that_is_not_a_regular_file_is_refused_before_it_is_read(what, tmp_path, capsys, reliability):
    import os

    path = {"fifo": str(tmp_path / "c.yaml"), "/dev/zero": "/dev/zero", "folder": str(tmp_path)}[what]
    if what == "fifo":
        os.mkfifo(path)  # nothing ever writes it: a reader would wait forever
    err = _refused(["train", "--config", path], capsys)
    assert f"--config {path}: not a regular file" in err, err
    reliability("hostile input", f"`mft train --config` naming {'a FIFO' if what == 'fifo' else what}",
                "exit 2 at once naming the file (\"not a regular file\"); nothing read, no wait")


def test_a_config_over_the_size_cap_is_refused_before_it_is_read(tmp_path, capsys, reliability):
    from mft_cache.config import MAX_CONFIG_BYTES

    path = tmp_path / "c.yaml"
    with open(path, "wb") as f:  # a sparse file: its size says it all, nothing of it need be read
        f.truncate(MAX_CONFIG_BYTES + 1)
    err = _refused(["train", "--config", str(path)], capsys)
    assert f"--config {path}: {MAX_CONFIG_BYTES + 1:,} bytes; a config file holds at most {MAX_CONFIG_BYTES:,}" in err
    path.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 - 1) + "steps: 7\n")  # just under the cap: read
    assert parse(["train", "--config", str(path)]).steps == 7
    reliability("hostile input", "`--config` of more than 1 MiB (a sparse file of any size)",
                "exit 2 before reading it, naming the file, its size and the cap")


def _nested(kind: str, levels: int) -> str:
    """A config whose taus value has `levels` levels in all (the mapping and its key's value counted), as JSON, as
    flow YAML and as block YAML (indentation)."""
    inner = levels - 2  # the top mapping and the innermost 0.5 are two of them
    if kind == "json":
        return '{"taus": ' + "[" * inner + "0.5" + "]" * inner + "}"
    if kind == "flow":
        return "taus: " + "[" * inner + "0.5" + "]" * inner + "\n"
    return "taus:\n" + "".join("  " * i + "- \n" for i in range(1, inner)) + "  " * inner + "- 0.5\n"


@pytest.mark.parametrize("kind", ["json", "flow", "block"])
def test_nesting_is_bounded_while_the_file_is_parsed(kind, tmp_path, capsys, reliability):
    from mft_cache.config import MAX_CONFIG_DEPTH

    path = tmp_path / ("c.json" if kind == "json" else "c.yaml")
    path.write_text(_nested(kind, MAX_CONFIG_DEPTH + 1))
    err = _refused(["sweep", "--config", str(path)], capsys)
    assert f"nested too deeply: more than {MAX_CONFIG_DEPTH} levels" in err, err
    path.write_text(_nested(kind, MAX_CONFIG_DEPTH))  # as deep as allowed: parsed, then refused as a value
    err = _refused(["sweep", "--config", str(path)], capsys)
    assert "nested too deeply" not in err and "taus: item 0" in err and "not a finite number" in err, err
    reliability("hostile input", f"`--config` nested {MAX_CONFIG_DEPTH + 1} levels deep ({kind} "
                f"{'JSON' if kind == 'json' else 'YAML'})", "exit 2 naming the file: \"nested too deeply\", refused "
                "as it is parsed (no RecursionError); one level less is parsed")


@pytest.mark.parametrize("tail, words", [
    ("train:\n  lr: *a8\n", ["lr", "not a valid value for --lr"]),
    ("train:\n  peft_targets: *a8\n", ["peft_targets", "item 0"]),
    ("train:\n  stepz: *a8\n", ["unknown key 'stepz'"]),
    ("*a8 : 1\n", ["not valid YAML"]),  # a list as a key
])
def test_an_alias_bomb_is_never_expanded_into_a_message(tail, words, tmp_path, capsys, reliability):
    anchors = bomb().partition("sweep:")[0]  # the study section's anchors a0 ... a8
    (tmp_path / "c.yaml").write_text(anchors + tail)
    err = _refused(["train", "--config", str(tmp_path / "c.yaml")], capsys)
    assert str(tmp_path / "c.yaml") in err and all(w in err for w in words), err
    if "stepz" in tail:
        reliability("hostile input", "`--config` with a YAML alias bomb (10^9 numbers from a few hundred bytes) "
                    "under an option, an unknown key or as a key", "exit 2 naming the file and the key; a message "
                    "of under 1,000 characters, nothing expanded")
