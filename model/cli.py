"""Shared command-line plumbing: config files, a clear one-line error for bad input."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


def load_config_file(path: str) -> dict:
    """Settings from TOML, YAML or JSON; keys are flag names, dashed or underscored."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path} does not exist")
    text = file.read_text(encoding="utf-8")
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


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; values from --config become defaults, so flags on the command line still win."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    config_path = finder.parse_known_args(argv)[0].config
    if not config_path:
        return parser.parse_args(argv)
    settings = load_config_file(config_path)
    valid = {action.dest for action in parser._actions} - {"help", "config", "command"}
    unknown = sorted(set(settings) - valid)
    if unknown:
        names = ", ".join(k.replace("_", "-") for k in unknown)
        raise UsageError(f"config file {config_path} has unknown settings: {names}")
    # A required flag that the file supplies is no longer required on the command line.
    for action in parser._actions:
        if action.dest in settings:
            action.required = False
    parser.set_defaults(**settings)
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
