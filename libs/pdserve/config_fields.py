"""How a config dataclass's fields become flags and environment variables, and back into a validated config.

A field is declared with `opt(default, help, ...)`; `add_arguments` makes one flag per field (`--field-name`),
`build` takes each value from the flag, else `PDSERVE_<FIELD>`, else the default, converts it to the field's type
and lets the dataclass validate it. `fail` raises the ConfigError that names the flag, the variable and the fix.
Kept apart from config.py, which holds the configs themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import field
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag / variable and the fix."""


def opt(default: Any, help: str, *, secret: bool = False, **kw: Any) -> Any:
    """A config field; secret ones stay out of repr() (and so out of logs and tracebacks)."""
    return field(default=default, repr=not secret, metadata={"help": help, **kw})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "PDSERVE_" + name.upper()


def fail(name: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{flag(name)} / {env_name(name)}: {problem}; {fix}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field; defaults stay None so that env vars and defaults apply in build().

    A field's metadata may name the default as users should read it (shown_default, where the real one is None or
    depends on other fields) and a help group (group) its flag is listed under."""
    hints = get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("env_only"):
            continue
        kind = _base_type(hints[f.name])
        shown = f.metadata.get("shown_default", f.default)
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f.name)}" + (
            "]" if shown in (None, "") else f"; default {shown}]")
        title = f.metadata.get("group")
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        where = parser if title is None else groups[title]
        if kind is bool:
            where.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            where.add_argument(flag(f.name), dest=f.name, default=None, help=help_text, metavar=f.name.upper())


def build(cls: type[C], args: argparse.Namespace | dict | None = None, env: dict[str, str] | None = None, **overrides: Any) -> C:
    """Config from flags (args), then PDSERVE_* env vars, then defaults; converted and validated."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    values.update(overrides)
    env = os.environ if env is None else env
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        raw = values.get(f.name)
        if raw is None:
            raw = env.get(env_name(f.name))
        if raw is None:
            continue
        kwargs[f.name] = _convert(f.name, raw, hints[f.name])
    return cls(**kwargs)


def _base_type(hint: Any) -> Any:
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is Literal:
        return str
    if args and get_origin(hint) is not Literal:
        return _base_type(args[0])
    return hint


def _convert(name: str, raw: Any, hint: Any) -> Any:
    if get_origin(hint) is Literal:
        if raw not in get_args(hint):
            fail(name, f"{raw!r} is not one of {', '.join(map(str, get_args(hint)))}", "pick one of those")
        return raw
    kind = _base_type(hint)
    if not isinstance(raw, str) or kind is str:
        return raw
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        fail(name, f"{raw!r} is not a valid {kind.__name__}", f"give a {kind.__name__}")
