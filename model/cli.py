"""Shared command-line plumbing: parsers generated from dataclasses, config files, checked paths, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import tomllib
import typing
from pathlib import Path


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


def option(default, help: str, group: str = "", **argparse_kwargs) -> dataclasses.Field:
    """A dataclass field that `dataclass_parser` turns into a flag (help, group, choices, metavar)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **argparse_kwargs})


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A `python -m model` command's parser: defaults shown in --help, and --config (parse_with_config)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", help="TOML/YAML/JSON file with these flags as keys")
    return parser


def dataclass_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per field of `cls`: its name dashed, its type, default and help; bools get --x/--no-x."""
    parser = command_parser(prog, description)
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        group_name = meta.pop("group", "")
        target = groups.setdefault(group_name, parser.add_argument_group(group_name)) if group_name else parser
        flag = "--" + f.name.replace("_", "-")
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        required = f.default is dataclasses.MISSING
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **meta)
        else:
            target.add_argument(flag, type=kind, required=required, default=None if required else f.default, **meta)
    return parser


def from_namespace(cls: type, args: argparse.Namespace):
    """The dataclass `cls` built from the parsed flags (its own validation runs there)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def load_config_file(path: str) -> dict:
    """Settings from TOML, YAML or JSON; keys are flag names, dashed or underscored."""
    file = Path(path)
    text, _ = read_utf8_text(file, "config file")
    try:
        if file.suffix == ".toml":
            data = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            import yaml  # only needed for YAML configs

            data = yaml.safe_load(text) or {}
        elif file.suffix == ".json":
            data = json.loads(text)
        else:
            raise UsageError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except UsageError:
        raise
    except Exception as exc:  # each parser has its own error type
        raise UsageError(f"config file {path} could not be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a table of flag = value pairs")
    return {key.replace("-", "_"): value for key, value in data.items()}


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _checked_scalar(action: argparse.Action, value, where: str):
    kind = action.type or str
    if isinstance(value, dict | list):
        raise UsageError(f"{where} must be one value, not a {'table' if isinstance(value, dict) else 'list'}")
    # bool is an int subclass in Python, so it is refused first: `rnn-size = true` is not 1.
    numeric = {int: int, float: int | float}.get(kind)
    if isinstance(value, bool) or not isinstance(value, numeric or str):
        raise UsageError(f"{where} must be {TYPE_NAMES.get(kind, 'a string')}, not {json.dumps(value)}")
    try:
        value = kind(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where} must be one of {', '.join(map(str, action.choices))}, not {json.dumps(value)}")
    return value


def checked_setting(action: argparse.Action, value, source: str):
    """A config file's value for `action`, held to the same types and choices as the flag on the command line."""
    where = f"{source}: {action.option_strings[0].lstrip('-')}"
    if action.nargs == 0:  # --x/--no-x and store_true flags
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, not {json.dumps(value)}")
        return value
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not values:
            raise UsageError(f"{where} needs at least one value")
        return [_checked_scalar(action, v, where) for v in values]
    return _checked_scalar(action, value, where)


def given_on_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags that argv itself gives, told apart from defaults: argparse only fills in
    a default where the namespace has no value yet, so every destination starts out as a marker."""
    unset = object()
    marked = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parser.parse_args(argv, namespace=marked)
    return {name for name, value in vars(marked).items() if value is not unset}


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; values from --config become defaults, so flags on the command line still win.

    The namespace's `given` holds the names of the settings the user chose, on the command line or in the
    file, as opposed to defaults (train --resume keeps the run's own value for every other setting).
    """
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    config_path = finder.parse_known_args(argv)[0].config
    settings = {}
    if config_path:
        settings = load_config_file(config_path)
        actions = {action.dest: action for action in parser._actions if action.option_strings}
        valid = set(actions) - {"help", "config"}
        unknown = sorted(set(settings) - valid)
        if unknown:
            names = ", ".join(k.replace("_", "-") for k in unknown)
            raise UsageError(f"config file {config_path} has unknown settings: {names}")
        source = f"config file {config_path}"
        settings = {key: checked_setting(actions[key], value, source) for key, value in settings.items()}
        # A required flag that the file supplies is no longer required on the command line.
        for key in settings:
            actions[key].required = False
        parser.set_defaults(**settings)
    args = parser.parse_args(argv)
    args.given = frozenset(given_on_command_line(parser, argv) | set(settings)) - {"config", "help"}
    return args


def check_input_file(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is a readable file; otherwise one line saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    return path


def read_utf8_text(path: str | Path, what: str) -> tuple[str, bytes]:
    """The file's text and its bytes; one line for a missing file, a folder, or bytes that are not UTF-8
    (naming the first bad byte and where it is, so it can be found)."""
    path = check_input_file(path, what)
    data = path.read_bytes()
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{what} {path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} is invalid; "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def writable_dir(path: str | Path, what: str) -> Path:
    """Create the folder `path` if needed and prove it takes files (a permission check alone misses root on a
    read-only mount); one line if it cannot."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be written: {exc.strerror or exc}") from None
    return path


def check_output_file(path: str | Path, what: str, inputs: list[str | Path]) -> Path:
    """A file to be written: not a folder, not one of the inputs, in a folder that can be written."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory; give a file name")
    for source in inputs:
        if Path(source).exists() and path.exists() and path.samefile(source):
            raise UsageError(f"{what} {path} is also an input; write to a new file")
    writable_dir(path.parent, f"the folder of {what}")
    return path


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
