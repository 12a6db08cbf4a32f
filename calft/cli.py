"""Command-line flags from a config dataclass (calft.train's TrainConfig, calft.eval's EvalConfig):
one flag per field (--field-name), its help, type, choices and default from the field; old
spellings kept as aliases that print a deprecation note. And the one comma-list splitter.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import field


def knob(default, help, choices=None, aliases=()):
    """A config field: its default, help text (units, sentinels), allowed values and old flag
    spellings (`"--old"` takes the same value; `("--old", value)` sets the field to value)."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


def comma_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: the comma-separated lists of the CLIs."""
    return [item.strip() for item in str(text).split(",") if item.strip()]


class _Deprecated(argparse.Action):
    """An old flag spelling: a note on stderr, then the value goes to the field's flag."""

    def __init__(self, option_strings, dest, new_flag, const=None, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, nargs=0 if const is not None else None, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.const is not None else values)


def flag_name(field_name: str) -> str:
    """A config field's flag: "family_balance" -> "--family-balance"."""
    return "--" + field_name.replace("_", "-")


def as_flags(values: dict) -> str:
    """The flags that set these field values, the inverse of add_flags' parsing:
    {"lr": 0.5, "family_balance": False, "adapter": ["a", "b"]} -> "--adapter a --adapter b
    --no-family-balance --lr 0.5" (shell-quoted, fields sorted)."""
    def one(name, value):
        flag = flag_name(name)
        if isinstance(value, bool):
            return flag if value else "--no-" + flag[2:]
        if isinstance(value, list):
            return " ".join(f"{flag} {shlex.quote(str(v))}" for v in value)
        return f"{flag} {shlex.quote(str(value))}"
    return " ".join(one(k, v) for k, v in sorted(values.items()))


def add_flags(parser: argparse.ArgumentParser, config_cls, groups: dict, extra_help=None) -> None:
    """One flag per field of `config_cls`; `groups` maps the field opening each group to its title;
    extra_help(name) -> text appended to a field's default in its help (e.g. per-recipe values)."""
    group = parser
    for f in dataclasses.fields(config_cls):
        if f.name in groups:
            group = parser.add_argument_group(groups[f.name])
        extra = extra_help(f.name) if extra_help else ""
        help = f"{f.metadata['help']} (default: {f.default!r}{'; ' + extra if extra else ''})"
        flag = flag_name(f.name)
        typ_name = f.type if isinstance(f.type, str) else f.type.__name__
        if typ_name == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
            typ = None
        elif typ_name == "list":
            group.add_argument(flag, action="append", metavar="VALUE", help=help + "; repeatable")
            typ = None
        else:
            typ = {"int": int, "float": float, "str": str}[typ_name]
            choices = f.metadata["choices"]
            group.add_argument(flag, type=typ, choices=choices, help=help,
                               metavar="{" + ",".join(choices) + "}" if choices else typ.__name__.upper())
        for alias in f.metadata.get("aliases", ()):
            old, const = (alias, None) if isinstance(alias, str) else alias
            new = flag if const is None or const else "--no-" + flag[2:]
            group.add_argument(old, dest=f.name, action=_Deprecated, new_flag=new, const=const, type=typ,
                               help=argparse.SUPPRESS)
