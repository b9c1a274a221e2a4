"""The command-line side of every script: a config dataclass turned into argparse, and
one error handler. Torch-free, so that grid.py and report.py parse options without the model."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from dataclasses import fields
from typing import Any, Callable, Sequence, Type, TypeVar, get_args, get_origin

from errors import Interrupted, UserError

T = TypeVar("T")


def _arg_type(field_type: Any):
    """The argparse type of a dataclass field annotation ('int', 'float | None', ...)."""
    if isinstance(field_type, str):
        base = field_type.replace(" ", "").replace("|None", "").replace("Optional[", "").rstrip("]")
        return {"int": int, "float": float, "str": str, "bool": bool}.get(base, str)
    if get_origin(field_type) is not None:
        args = [a for a in get_args(field_type) if a is not type(None)]
        return args[0] if args else str
    return field_type


def build_parser(cls: Type[T], description: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser with one `--name` option per field of the dataclass `cls`.
    Field metadata may give `help` and `choices`, or `positional` for an optional
    positional argument; bools become --flag / --no-flag. Abbreviations are off: a
    recorded command must mean the same after an option is added."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # argparse takes only plain negative numbers for values: let `--lr -1e-3` through too.
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    for f in fields(cls):
        kind = _arg_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", " ")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", type=kind, default=default, help=help_text)
        elif kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text,
                                choices=f.metadata.get("choices"))
    return parser


def parse_config(cls: Type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    args = build_parser(cls, description).parse_args(argv)
    return cls(**vars(args))


def explicit_options(cls: Type[T], argv: Sequence[str] | None) -> dict[str, Any]:
    """The options given on the command line (not their defaults): field name -> value."""
    parser = build_parser(cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def run_cli(main: Callable[[], Any]) -> int:
    """A script's entry point: bad input (a data file, a checkpoint, an option) becomes
    one clear message on stderr and exit code 2, not a traceback."""
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    return 0
