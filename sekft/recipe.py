"""Recipes as files: `sekft-train --config recipe.toml` and `sekft-eval --config ...`.

A recipe is a TOML table whose keys are the command's option names (`max-steps` or
`max_steps`), with values typed as the options are: `lr = 1e-3`, `load-4bit = true`,
`targets = ["q_proj", "v_proj"]`. It supplies defaults; an option on the command line wins.
Paths in it are read as on the command line (relative to the working directory). A key the
command has no option for, or a value of the wrong type, is a ConfigError naming the file
and the key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sekft.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib
    tomllib = None


def read_recipe(path: Path) -> dict[str, Any]:
    """The TOML table in `path`, or a ConfigError naming the file (and line) when unreadable."""
    if tomllib is None:
        raise ConfigError(f"{path}: recipes need Python 3.11 or newer (tomllib)")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options by destination name, leaving out --help and --config."""
    return {
        a.dest: a for a in parser._actions
        if a.option_strings and a.dest not in ("help", "config")
    }


def _type_name(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "true or false"
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        return "a list of strings"
    return {int: "an integer", float: "a number"}.get(action.type, "a string")


def _check_value(path: Path, key: str, action: argparse.Action, value: Any) -> Any:
    """`value` as the option would hold it, or a ConfigError naming the key."""
    if isinstance(action, argparse._StoreTrueAction):
        ok = isinstance(value, bool)
    elif action.nargs in ("+", "*"):
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    elif isinstance(action, argparse._AppendAction):
        # A repeatable option (--template-var): the recipe lists its values.
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif action.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif action.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{path}: {key!r} must be {_type_name(action)}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{path}: {key!r} must be one of {', '.join(map(str, action.choices))}, "
                          f"got {value!r}")
    return value


def recipe_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The option values recipe `path` sets, by destination name, checked against `parser`."""
    options = _options(parser)
    values = {}
    for key, value in read_recipe(path).items():
        dest = key.replace("-", "_")
        if dest not in options:
            known = ", ".join(sorted(d.replace("_", "-") for d in options))
            raise ConfigError(f"{path}: unknown key {key!r}; {parser.prog} options: {known}")
        values[dest] = _check_value(path, key, options[dest], value)
    return values


def parse_with_recipe(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with the defaults of the recipe `--config FILE` names.

    Adds `--config` to `parser`; the namespace returned has no `config` attribute, so it maps
    onto the same fields as without a recipe. Options the recipe sets are no longer required
    on the command line.
    """
    parser.add_argument("--config", type=Path, help="TOML recipe: option names as keys; "
                        "command-line options override it")
    # The recipe is read before the real parse, which must already know its defaults.
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config", type=Path)
    found, _ = first.parse_known_args(argv)
    if found.config is not None:
        values = recipe_defaults(parser, found.config)
        for dest, action in _options(parser).items():
            if dest in values:
                action.required = False
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    del args.config
    return args
