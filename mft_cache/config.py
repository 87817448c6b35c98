"""One frozen dataclass per command; the command line is generated from it.

Each field is declared with `opt(default, "help", group="...")`; the help doubles as `--help`, and the group (one of
GROUPS) is the section of `--help` that lists it. `__post_init__` of each config raises ValueError naming the flag
for bad values.
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


# the sections of `--help`, in the order a command lists them, each with the line printed under its title; a command
# lists those its options use (its own group, `sweep` or `study`, first: what it adds to the options of `mft train`)
GROUPS = {
    "sweep": "what `mft sweep` varies: one run per value, per seed",
    "study": "what `mft study` runs and where it reports",
    "regime": "what `mft regime` runs: domains, data budgets, the shared grid, the reference checkpoint",
    "data": "what is read and how rows are made of it",
    "teacher": "the model whose predictions are cached, and where it runs",
    "cache format": "what the cache keeps of each position, and how it is stored",
    "model and adapters": "the student, and the adapter trained instead of all of its weights",
    "objective": "where the targets come from and what the loss makes of them",
    "optimisation": "steps, batches, learning rate, optimiser",
    "evaluation": "the validation sets, and when they are read",
    "output": "the folder written, and where else the results go",
    "performance": "memory and speed",
}
MAX_LIST_ITEMS = 1024  # values in one list option (--taus, --seeds, ...): more is refused


def opt(default, help: str, choices=None, *, group: str | None = None, items: type | None = None):
    """A config field: its default, its --help text, its choices (a tuple, or a function returning one), its
    `--help` group (a key of GROUPS) and, for a comma-separated list held as a string, the type of its items
    (a config file may then give it as a list)."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"option group {group!r} is not one of {list(GROUPS)}")
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "group": group,
                                                        "items": items})


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


def _help(help_: str, default) -> str:
    """The help with its default, said once: a help that states its default in words keeps that one alone."""
    return help_ if "(default" in help_ else f"{help_} (default: {default})"


def add_arguments(parser: argparse.ArgumentParser, *classes) -> dict[str, argparse._ArgumentGroup]:
    """Every field of `classes` as a flag of `parser`, in one argument group per GROUPS name (in GROUPS' order;
    a field without a group goes to a last group, "other options"). Returns the groups by name."""
    fields = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields += [(f, _base_type(hints[f.name])) for f in dataclasses.fields(cls)]
    order = [*GROUPS, None]
    used = sorted({f.metadata.get("group") for f, _ in fields}, key=order.index)
    groups = {g: parser.add_argument_group(g or "other options", GROUPS.get(g)) for g in used}
    for f, tp in sorted(fields, key=lambda ft: order.index(ft[0].metadata.get("group"))):  # stable: field order
        group = groups[f.metadata.get("group")]
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if callable(choices):  # a registry, read when the parser is built
            choices = choices()
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool and f.name.startswith("no_"):  # BooleanOptionalAction would read --no-x as x = False
            action = group.add_argument(flag(f.name), action="store_true", default=default, help=help_)
        elif tp is bool:
            action = group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                                        help=help_)
            action.help = _help(help_, default)  # argparse 3.10 appends its own "(default: ...)" to a help it is given
        else:
            action = group.add_argument(flag(f.name), type=tp, default=default, choices=choices,
                                        help=_help(help_, default), metavar=f.name.upper() if not choices else None)
        action.items = f.metadata.get("items")  # read by config files: a list for a comma-separated option
    return {g: groups[g] for g in used if g is not None}


def from_namespace(cls, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# -- config files: `--config FILE` (YAML or JSON), its keys set as defaults, the flags given win --------------
COMMANDS = ("cache", "train", "sweep", "study", "regime")  # a top-level key naming one of them, holding a mapping, is a section


def add_config_argument(parser: argparse.ArgumentParser, section: str | None = None) -> None:
    """--config; `section`: the section of the file the command reads, where it is not the command's own."""
    where = "a section named after the command" if section is None else f"a section `{section}:`"
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of options: keys are the option names with underscores (as config.json "
                        f"writes them), flat or under {where}; flags given here override it")


MAX_CONFIG_BYTES = 1 << 20  # a config file holds a few KiB; more is refused before it is read
MAX_CONFIG_DEPTH = 32  # levels of values in values (a section's list's item is at level 4); deeper is refused


class _TooDeep(Exception):
    pass


def _read_config_text(path: str) -> str:
    """The text of --config `path`: a regular file (a link to one is the user's to make) of at most MAX_CONFIG_BYTES,
    checked before anything is read: a FIFO or a device (`/dev/zero`) is refused, never read or waited on."""
    import os
    import stat

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"--config {path}: not a regular file (a folder, a FIFO or a device); give a YAML or "
                             "JSON file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"--config {path}: {st.st_size:,} bytes; a config file holds at most "
                             f"{MAX_CONFIG_BYTES:,}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # swapped for a FIFO since: no wait
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError(f"--config {path}: not a regular file; give a YAML or JSON file")
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"--config {path}: more than {MAX_CONFIG_BYTES:,} bytes; a config file holds at most that")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: cannot read it (not UTF-8 text: {e.reason} at byte {e.start})") from None


def _depth(value) -> int:
    """The nesting depth of a parsed JSON value, counted as the YAML loader counts it (every value a level: `1` is
    1, `{"taus": [0.5]}` is 3), without recursion; stops counting past MAX_CONFIG_DEPTH."""
    deepest, todo = 0, [(value, 1)]
    while todo and deepest <= MAX_CONFIG_DEPTH:
        value, level = todo.pop()
        deepest = max(deepest, level)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        todo.extend((child, level + 1) for child in children)
    return deepest


def _yaml_loader():
    """yaml.SafeLoader that refuses nesting deeper than MAX_CONFIG_DEPTH as it composes (before Python's recursion
    limit, and before an alias is ever expanded: aliases are composed as references to one node)."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_CONFIG_DEPTH:
                    raise _TooDeep
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return Loader


def read_config_file(path: str, command: str) -> dict:
    """The file's keys for `command`: its flat keys, then those of its section `command:` (which win). The file is
    untrusted: its size, its nesting and the values shown in messages are bounded (see _read_config_text, _shown)."""
    import json

    import yaml

    text = _read_config_text(path)
    kind = "JSON" if path.endswith(".json") else "YAML"
    deep = ValueError(f"--config {path}: not valid {kind} (nested too deeply: more than {MAX_CONFIG_DEPTH} levels)")
    try:
        data = json.loads(text) if kind == "JSON" else yaml.load(text, Loader=_yaml_loader())
    except (_TooDeep, RecursionError):
        raise deep from None
    except (ValueError, yaml.YAMLError) as e:  # ValueError: also an integer of over 4,300 digits
        raise ValueError(f"--config {path}: not valid {kind} ({_bounded(e)})") from None
    if kind == "JSON" and _depth(data) > MAX_CONFIG_DEPTH:
        raise deep
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must hold a mapping of option names to values")
    sections = {k: v for k, v in data.items() if k in COMMANDS and isinstance(v, dict)}
    return {**{k: v for k, v in data.items() if k not in sections}, **sections.get(command, {})}


def _bounded(e: Exception, limit: int = 500) -> str:
    """A parser's error message, for ours: bounded in length (it may quote the input)."""
    text = str(e)
    return text if len(text) <= limit else text[:limit] + "..."


def _shown(value) -> str:
    """A value from a file for a message: its repr, bounded in length and depth (a file may hold a huge or deeply
    nested value, or a YAML alias bomb, whose full repr would not end)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 6, 4, 60, 60
    return r.repr(value)


def _list_value(action: argparse.Action, key: str, value: list, path: str) -> str:
    """A list from the file for a comma-separated option, as the comma-separated string the flag takes (which
    then parses to the same values); an item of the wrong type, a repeated one or too many are refused."""
    name, items = action.option_strings[0], action.items
    if len(value) > MAX_LIST_ITEMS:
        raise ValueError(f"--config {path}: {key}: a list of {len(value):,} values; {name} takes at most "
                         f"{MAX_LIST_ITEMS}")
    kind = {int: "an integer", float: "a finite number", str: "a non-empty name without commas"}[items]
    out, seen = [], set()
    for i, item in enumerate(value):
        bad = ValueError(f"--config {path}: {key}: item {i}, {_shown(item)}, is not {kind} (a list for {name} "
                         "holds only those)")
        if isinstance(item, bool) or item is None or isinstance(item, (list, dict)):
            raise bad
        if items is str:
            if not isinstance(item, str) or not item.strip() or "," in item:
                raise bad
            item = item.strip()
        elif isinstance(item, str):  # YAML reads 2e-4 (no dot) as a string, as the flag would take it
            try:
                item = items(item.strip())
            except ValueError:
                raise bad from None
        elif items is int and isinstance(item, float):
            if not item.is_integer():  # also refuses inf and nan
                raise bad
            item = int(item)
        elif items is float and isinstance(item, int):
            try:
                item = float(item)
            except OverflowError:
                raise bad from None
        elif not isinstance(item, items):
            raise bad
        if items is float and not math.isfinite(item):
            raise bad
        if item in seen and items is not str:  # as the flag: a repeated number is refused, a repeated name not
            raise ValueError(f"--config {path}: {key}: item {i}, {_shown(item)}, is given twice")
        seen.add(item)
        out.append(repr(item) if items is float else str(item))
    return ",".join(out)


def _coerce(action: argparse.Action, key: str, value, path: str):
    """A value from the file as the flag would have parsed it; a wrong type or choice is refused naming the key.
    A comma-separated option (`items` set) also takes a list."""
    wrong = ValueError(f"--config {path}: {key}: {_shown(value)} is not a valid value for {action.option_strings[0]}")
    if action.nargs == 0:  # --x/--no-x and store_true: a YAML/JSON boolean only
        if not isinstance(value, bool):
            raise wrong
        return value
    if isinstance(value, list) and getattr(action, "items", None) is not None:
        return _list_value(action, key, value, path)
    tp = action.type or str
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        raise wrong
    if tp is int and isinstance(value, float):
        if not value.is_integer():
            raise wrong
        value = int(value)
    try:
        value = tp(value) if isinstance(value, str) or tp in (str, float) else value  # numbers: 5 for a float
    except (TypeError, ValueError, OverflowError):
        raise wrong from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"--config {path}: {key}: {_shown(value)} is not one of {list(action.choices)}")
    return value


def config_defaults(parser: argparse.ArgumentParser, path: str, command: str, ignored=(),
                    section: str | None = None) -> dict:
    """The file's values for the options of `parser` (those of `mft command`; its keys are read from the file's
    flat keys and its section `section`, by default the command's own), typed; a key that is no option (nor in
    `ignored`, the bookkeeping keys a run's config.json holds) is refused naming the key and the file."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in read_config_file(path, section or command).items():
        if key in ignored:
            continue
        if key not in actions:
            near = str(key).replace("-", "_")
            hint = f" (did you mean {near!r}?)" if near in actions else ""
            raise ValueError(f"--config {path}: unknown key {_shown(key)}: not an option of mft {command}{hint}")
        values[key] = _coerce(actions[key], key, value, path)
    return values
