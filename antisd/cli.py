"""One way to configure a script: a dataclass whose fields are its flags, parsed in layers.

    cfg = parse_layered(EvalConfig, argv, __doc__)

Precedence, lowest first: the dataclass defaults < `base_layers` (dicts, in order) < the YAML file of
the dataclass's `config` field (`--config FILE`) < `override_files` (YAML, in order) < CLI flags.
A YAML file may name another as `include: FILE` (relative to itself): that one is read first, as
a lower layer, so a recipe holds only what differs from the setup it shares with others.
Flags are the field names; `--max_steps` and `--max-steps` both work (transformers' HfArgumentParser).
`--help` prints `description` as written and every field's default (the layers' when given). A YAML
key that is no field is an error naming the file and keys; keys in `ignored_keys` are skipped. A
`bool | None` field takes `--x`, `--x false` and `--no-x`; a ValueError from the dataclass (e.g. its
`__post_init__` checks) is reported as a usage error.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import yaml
from transformers import HfArgumentParser

T = TypeVar("T")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written; `(default: ...)` after every flag's help."""


class DataclassParser(HfArgumentParser):
    """HfArgumentParser that shows every default and gives `bool | None` fields a bare and a --no- form."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        first_new = len(parser._actions)
        HfArgumentParser._parse_dataclass_field(parser, field)
        action = parser._actions[first_new]
        action.help = action.help or "(default: %(default)s)"  # argparse shows defaults only after help text
        if field.type == bool | None and field.default is None:  # HfArgumentParser would demand a value
            action.nargs, action.const = "?", True
            dashed = field.name.replace("_", "-")
            negatives = dict.fromkeys([f"--no-{field.name}", f"--no_{field.name}", f"--no-{dashed}"])
            parser.add_argument(*negatives, dest=field.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"the same as --{field.name} false")


def yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """(name, values) of `path` and the files it includes, lowest first."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such config file" + (f" (included by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise SystemExit(f"{path}: includes itself through {' -> '.join(map(str, seen))}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: a config file holds a mapping of field: value")
    include = values.pop("include", None)
    below = yaml_layers(path.parent / include, (*seen, path.resolve())) if include else []
    return [*below, (str(path), values)]


def parse_layered(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None, *,
                  base_layers: Sequence[Mapping] = (), override_files: Sequence[str | Path] = (),
                  ignored_keys: Collection[str] = ("config",)) -> T:
    """An instance of the dataclass `cls` from the layers in the module docstring's order."""
    parser = DataclassParser(cls, description=description, formatter_class=HelpFormatter)
    layers = [(f"base layer {i}", dict(values)) for i, values in enumerate(base_layers)]
    files = list(override_files)
    if "config" in cls.__dataclass_fields__:
        config_flag = argparse.ArgumentParser(add_help=False)
        config_flag.add_argument("--config")
        config_file = config_flag.parse_known_args(argv)[0].config
        files = [config_file, *files] if config_file else files
    for path in map(Path, files):
        layers.extend(yaml_layers(path))
    for name, values in layers:
        unknown = sorted(set(values) - set(cls.__dataclass_fields__) - set(ignored_keys))
        if unknown:
            raise SystemExit(f"{name}: unknown config keys {unknown}")
        values = {k: v for k, v in values.items() if k not in ignored_keys}
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # a layer supplied it
                value = values[action.dest]
                if action.choices is not None and value not in action.choices:
                    raise SystemExit(f"{name}: {action.dest} must be one of {list(action.choices)}, got {value!r}")
    namespace = parser.parse_args(argv)
    try:
        return cls(**vars(namespace))
    except ValueError as err:
        parser.error(str(err))
