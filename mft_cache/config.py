"""One frozen dataclass per command; the command line is generated from it.

Each field is declared with `opt(default, "help")`; the help doubles as `--help`. `__post_init__`
of each config raises ValueError naming the flag for bad values.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import typing

_COMMAND_LINE: list[str] | None = None  # what `mft` was given, for model cards


def set_command_line(argv: list[str]) -> None:
    global _COMMAND_LINE
    _COMMAND_LINE = list(argv)


def command_line() -> str:
    """The command as typed (`mft train ...`), or this process's argv when `mft` was not the entry point."""
    return shlex.join(["mft", *_COMMAND_LINE]) if _COMMAND_LINE is not None else shlex.join(sys.argv)


def opt(default, help: str, choices=None):
    """A config field: its default, its --help text, and its choices (a tuple, or a function returning one)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_finite(cfg) -> None:
    """Refuse inf and NaN in every float option, naming the flag: argparse's float() accepts "inf" and "nan", and
    a NaN passes no comparison, so range checks alone let `--lr inf` train to NaN weights."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(f.name)} must be a finite number; got {value}")


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if callable(choices):  # a registry, read when the parser is built
            choices = choices()
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool and f.name.startswith("no_"):  # BooleanOptionalAction would read --no-x as x = False
            parser.add_argument(flag(f.name), action="store_true", default=default, help=help_)
        elif tp is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            parser.add_argument(flag(f.name), type=tp, default=default, choices=choices,
                                help=f"{help_} (default: {default})", metavar=f.name.upper() if not choices else None)


def from_namespace(cls, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# -- config files: `--config FILE` (YAML or JSON), its keys set as defaults, the flags given still win ---------
COMMANDS = ("cache", "train", "sweep", "study")  # a top-level key naming one of them, holding a mapping, is a section


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of options: keys are the option names with underscores (as config.json "
                        "writes them), flat or under a section named after the command; flags given here override it")


def read_config_file(path: str, command: str) -> dict:
    """The file's keys for `command`: its flat keys, then those of its section `command:` (which win)."""
    import json
    from pathlib import Path

    import yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({e})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must hold a mapping of option names to values")
    sections = {k: v for k, v in data.items() if k in COMMANDS and isinstance(v, dict)}
    return {**{k: v for k, v in data.items() if k not in sections}, **sections.get(command, {})}


def _coerce(action: argparse.Action, key: str, value, path: str):
    """A value from the file as the flag would have parsed it; a wrong type or choice is refused naming the key."""
    wrong = ValueError(f"--config {path}: {key}: {value!r} is not a valid value for {action.option_strings[0]}")
    if action.nargs == 0:  # --x/--no-x and store_true: a YAML/JSON boolean only
        if not isinstance(value, bool):
            raise wrong
        return value
    tp = action.type or str
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        raise wrong
    if tp is int and isinstance(value, float):
        if not value.is_integer():
            raise wrong
        value = int(value)
    try:
        value = tp(value) if isinstance(value, str) or tp in (str, float) else value  # numbers: 5 for a float
    except (TypeError, ValueError):
        raise wrong from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"--config {path}: {key}: {value!r} is not one of {list(action.choices)}")
    return value


def config_defaults(parser: argparse.ArgumentParser, path: str, command: str, ignored=()) -> dict:
    """The file's values for the options of `parser`, typed; a key that is no option (nor in `ignored`, the
    bookkeeping keys a run's config.json holds) is refused naming the key and the file."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in read_config_file(path, command).items():
        if key in ignored:
            continue
        if key not in actions:
            hint = f" (did you mean {key.replace('-', '_')!r}?)" if key.replace("-", "_") in actions else ""
            raise ValueError(f"--config {path}: unknown key {key!r}: not an option of mft {command}{hint}")
        values[key] = _coerce(actions[key], key, value, path)
    return values
