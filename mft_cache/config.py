"""One frozen dataclass per command; the command line is generated from it.

Each field is declared with `opt(default, "help")`; the help doubles as `--help`. `__post_init__`
of each config raises ValueError naming the flag for bad values.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing


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
        if tp is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            parser.add_argument(flag(f.name), type=tp, default=default, choices=choices,
                                help=f"{help_} (default: {default})", metavar=f.name.upper() if not choices else None)


def from_namespace(cls, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
