"""The options of every command: each in a declared `--help` group, the groups listed in that order, each default
said once, help that describes (no measured figures, no history); comma-separated lists bounded; `mft plan` and
`mft train --plan` print the same."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import pytest

from conftest import make_texts, write_jsonl
from mft_cache.cli import main, parse
from mft_cache.config import GROUPS, MAX_LIST_ITEMS, add_arguments, opt, to_dict
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.study import StudyConfig
from mft_cache.trainer.config import SweepConfig, TrainConfig

CONFIGS = (TrainConfig, CacheConfig, SweepConfig, StudyConfig)
# the groups of `mft train --help`, in order
TRAIN_GROUPS = ["data", "model and adapters", "objective", "optimisation", "evaluation", "output", "performance"]


def help_text(capsys, monkeypatch, *argv: str) -> str:
    """`mft ARGV --help`, each option's help on one line."""
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def group_titles(text: str) -> list[str]:
    """The titles of the argument groups of a help text, in order (argparse's own "options" left out)."""
    return [m for m in re.findall(r"^(\S[^\n]*):$", text, re.M) if m != "options"]


# -- groups ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_option_has_a_declared_group(cls):
    missing = [f.name for f in dataclasses.fields(cls) if f.metadata.get("group") not in GROUPS]
    assert not missing, f"{cls.__name__}: fields without a group of {list(GROUPS)}: {missing}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_fields_are_declared_in_the_order_of_their_groups(cls):
    order = [list(GROUPS).index(f.metadata["group"]) for f in dataclasses.fields(cls)]
    assert order == sorted(order), [f.name for f in dataclasses.fields(cls)]


def test_train_uses_the_seven_groups():
    assert list(dict.fromkeys(f.metadata["group"] for f in dataclasses.fields(TrainConfig))) == TRAIN_GROUPS


def test_an_undeclared_group_is_refused():
    with pytest.raises(ValueError, match="option group 'optimization' is not one of"):
        opt(1, "x", group="optimization")


@pytest.mark.parametrize("command, groups", [
    ("train", TRAIN_GROUPS),
    ("plan", TRAIN_GROUPS),
    ("sweep", ["sweep", *TRAIN_GROUPS]),
    ("study", ["study", *TRAIN_GROUPS]),
    ("cache", ["data", "teacher", "cache format", "output", "performance"]),
])
def test_help_lists_the_groups_in_the_declared_order(command, groups, capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, command)
    assert group_titles(text) == groups
    for g in groups:
        assert f"\n{g}:\n  {GROUPS[g]}\n" in text  # the title, then its description


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("cache", CacheConfig), ("sweep", SweepConfig),
                                          ("study", StudyConfig)])
def test_each_option_is_listed_under_its_own_group(command, cls, capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, command)
    sections = dict(re.findall(r"^(\S[^\n]*):\n(.*?)(?=^\S|\Z)", text, re.M | re.S))
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"^  {flag}\b", sections[f.metadata["group"]], re.M), (f.name, f.metadata["group"])


def test_the_config_keys_and_the_keyword_api_are_the_field_names():
    """Grouping orders the fields, nothing else: config.json's keys are still the flat option names."""
    cfg = TrainConfig(tau=0.5, steps=3, peft="lora", cpu_allocator="lean")
    d = to_dict(cfg)
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig(**d) == cfg and all(not isinstance(v, dict) for v in d.values())


# -- what --help says -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["cache", "train", "plan", "sweep", "study", "regime"])
def test_every_default_is_said_once(command, capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, command)
    doubled = [line for line in text.splitlines() if line.count("(default") > 1]
    assert not doubled, doubled
    assert "--help" in text


@pytest.mark.parametrize("command", ["cache", "train", "plan", "sweep", "study", "regime"])
def test_no_option_says_its_default_twice(command):
    """Each option's help as argparse prints it (whatever the width it is wrapped to, and whatever the Python version
    adds to a boolean's): at most one "(default"; every option made from a config field says its default (but a
    --no-x switch, which is off unless given)."""
    from mft_cache.cli import _parser
    from mft_cache.regime import RegimeConfig

    classes = {"cache": [CacheConfig], "train": [TrainConfig], "plan": [TrainConfig],
               "sweep": [TrainConfig, SweepConfig], "study": [TrainConfig, StudyConfig],
               "regime": [TrainConfig, RegimeConfig]}[command]
    fields = {f.name for cls in classes for f in dataclasses.fields(cls) if not f.name.startswith("no_")}
    parser = _parser()[1][command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action)
        assert text.count("(default") <= 1, (action.option_strings, text)
        assert action.dest not in fields or "(default" in text, (action.option_strings, text)


def test_a_help_that_states_its_default_keeps_it_alone():
    @dataclasses.dataclass(frozen=True)
    class Options:
        size: int = opt(256, "tokens per row (default: 256, or the cache's)")
        rows: int = opt(0, "rows to read")
        strict: bool = opt(True, "refuse a bad row (default: refuse)")
        lenient: bool = opt(False, "go on past a bad row")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Options)
    helps = {a.dest: parser._get_formatter()._expand_help(a) for a in parser._actions if a.dest != "help"}
    assert helps == {"size": "tokens per row (default: 256, or the cache's)", "rows": "rows to read (default: 0)",
                     "strict": "refuse a bad row (default: refuse)", "lenient": "go on past a bad row (default: False)"}


def test_seq_len_says_its_default_once(capsys, monkeypatch):
    [line] = [x for x in help_text(capsys, monkeypatch, "train").splitlines() if x.lstrip().startswith("--seq-len")]
    assert line.count("(default") == 1 and line.endswith("(default: 0)"), line


# history (what changed, rather than what is) and measured figures (which belong in docs/MEMORY.md and
# BENCHMARKS.md, where they are dated and reproducible)
HISTORY = re.compile(r"\b(as before|as always|now|used to|no longer|any ?more|previously|formerly|of old)\b", re.I)
FIGURES = re.compile(r"\b\d+(\.\d+)?x\b|\d%|\bmeasured\b|\ba fifth\b|\btwice as\b", re.I)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_help_describes_without_figures_or_history(cls):
    for f in dataclasses.fields(cls):
        assert not HISTORY.search(f.metadata["help"]), (f.name, f.metadata["help"])
        assert not FIGURES.search(f.metadata["help"]), (f.name, f.metadata["help"])


def test_the_cpu_allocator_help_points_to_the_figures(capsys, monkeypatch):
    lines = help_text(capsys, monkeypatch, "train").splitlines()
    [i] = [i for i, x in enumerate(lines) if x.lstrip().startswith("--cpu-allocator {")]
    text = lines[i + 1]  # the help, under a flag too long to share its line
    assert "glibc" in text and "docs/MEMORY.md" in text and not FIGURES.search(text), text


# -- comma-separated lists -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, text, words", [
    ("taus", "0.1,x", ["--taus", "'x' is not a number"]),
    ("taus", "0.1,0.1", ["--taus", "given twice"]),
    ("taus", "0.1,nan", ["--taus", "not a finite number"]),
    ("seeds", "1,1.5", ["--seeds", "not an integer"]),
    ("lrs", "1e-4,inf", ["--lrs", "not a finite number"]),
])
def test_a_bad_list_is_refused_naming_the_flag(field, text, words):
    with pytest.raises(ValueError) as e:
        SweepConfig(**{field: text})
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("field, kind", [("taus", float), ("seeds", int), ("lrs", float)])
def test_a_huge_list_is_refused_at_once(field, kind):
    """More than MAX_LIST_ITEMS values is refused before any is parsed (a repeated-value check over 10^6 values
    would otherwise take minutes); MAX_LIST_ITEMS of them are taken."""
    values = [str(kind(i) if kind is int else i / 10**7) for i in range(1, 10**6 + 1)]
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"^--{field}: 1,000,000 values; at most {MAX_LIST_ITEMS}$"):
        SweepConfig(**{field: ",".join(values)})
    assert time.monotonic() - start < 5
    cfg = SweepConfig(**{field: ",".join(values[:MAX_LIST_ITEMS])})
    assert len({"taus": cfg.tau_values, "seeds": cfg.seed_values, "lrs": cfg.lr_values}[field]()) == MAX_LIST_ITEMS


def test_a_huge_list_on_the_command_line_exits_2(capsys):
    taus = ",".join(str(i / 10**6) for i in range(MAX_LIST_ITEMS + 1))
    assert main(["sweep", "--taus", taus, "--out", "/nonexistent/never"]) == 2
    assert f"at most {MAX_LIST_ITEMS}" in capsys.readouterr().err


# -- `mft plan` ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cache(llama, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("options")
    data = write_jsonl(d / "train.jsonl", make_texts(16, seed=21))
    build_cache(CacheConfig(model=str(llama), data=str(data), out=str(d / "cache"), seq_len=32, top_k=8))
    return d / "cache"


@pytest.fixture
def fixed_memory(monkeypatch):
    """The memory available, fixed: two plans made one after the other would otherwise read two MemAvailables."""
    from mft_cache.trainer import plan

    monkeypatch.setattr(plan, "available_memory", lambda device: (8 * 2**30, "MemAvailable (/proc/meminfo)"))


@pytest.mark.parametrize("extra", [[], ["--peft", "lora", "--base-dtype", "bfloat16", "--gradient-checkpointing"],
                                   ["--cpu-allocator", "lean", "--batch-size", "1"]])
def test_mft_plan_prints_what_train_plan_prints(small_cache, extra, tmp_path, capsys, fixed_memory):
    flags = ["--cache", str(small_cache), "--out", str(tmp_path / "r"), *extra]
    assert main(["train", *flags, "--plan"]) == 0
    train_text = capsys.readouterr().out
    assert main(["plan", *flags]) == 0
    plan_text = capsys.readouterr().out
    assert plan_text == train_text and "peak" in plan_text and "changes, cheapest first" in plan_text
    assert main(["train", *flags, "--plan-json"]) == 0
    train_json = capsys.readouterr().out
    for spelling in ("--json", "--plan-json"):
        assert main(["plan", *flags, spelling]) == 0
        assert capsys.readouterr().out == train_json
    assert json.loads(train_json)["seq_len"] == 32
    assert not (tmp_path / "r").exists()  # neither writes anything


def test_mft_plan_reads_the_train_section_of_a_config_file(small_cache, tmp_path, capsys, fixed_memory):
    (tmp_path / "c.yaml").write_text(f"train:\n  cache: {small_cache}\n  out: {tmp_path / 'r'}\n  batch_size: 2\n"
                                     "sweep:\n  taus: [0.5]\n")
    assert main(["plan", "--config", str(tmp_path / "c.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 2
    assert vars(parse(["plan", "--config", str(tmp_path / "c.yaml")]))["batch_size"] == 2
    (tmp_path / "bad.yaml").write_text("train:\n  stepz: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown key 'stepz'" in err and "mft plan" in err and "bad.yaml" in err


def test_mft_plan_refuses_bad_options_as_train_does(small_cache, tmp_path, capsys):
    for command in ("train", "plan"):
        argv = [command, "--cache", str(small_cache), "--out", str(tmp_path / "r"), "--lr", "-1"]
        assert main(argv + (["--plan"] if command == "train" else [])) == 2
        assert "--lr must be positive" in capsys.readouterr().err


def test_the_command_list_has_plan(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch)
    assert re.search(r"^    plan\s+the estimated peak memory", text, re.M), text
