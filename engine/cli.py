"""The command-line side of every script: a config dataclass turned into argparse, and
one error handler. Torch-free, so that grid.py and report.py parse options without the model."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
from dataclasses import fields
from typing import Any, Callable, Sequence, Type, TypeVar, get_args, get_origin

from engine.errors import ConfigError, Interrupted, UserError

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
    """The config of the command line. A config with a `config` field takes
    `--config RUN/config.json`: a new run from that run's settings (its run_dir
    dropped), the flags given beside it winning."""
    args = vars(build_parser(cls, description).parse_args(argv))
    if args.get("config"):
        args = {**args, **read_config_file(cls, args["config"]),
                **explicit_options(cls, argv), "config": args["config"]}
    return cls(**args)


# Never taken from a config file: a new run gets a new folder, and records its own --config.
NOT_FROM_FILE = ("run_dir", "config")


def read_config_file(cls: Type[T], path: str) -> dict[str, Any]:
    """The settings of a run's config.json that `cls` knows. The file must be a config of
    this script: it holds one of the fields `cls` adds to the config it extends."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror})") from None
    known = {f.name for f in fields(cls)}
    base = next((b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)), None)
    own = known - {f.name for f in fields(base)} if base else known
    if not isinstance(saved, dict) or not own & saved.keys():
        raise ConfigError(f"--config {path}: not a config of this script (a run's config.json "
                          f"holds some of {', '.join(sorted(own)[:4])}, ...)")
    return {k: v for k, v in saved.items() if k in known and k not in NOT_FROM_FILE}


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
    with quiet_unless_main():
        try:
            main()
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except Interrupted as stop:
            if int(os.environ.get("RANK", "0")) == 0:  # every process stopped at the same step
                print(str(stop), file=sys.stderr)
            return stop.exit_code
    return 0


@contextlib.contextmanager
def quiet_unless_main():
    """Under torchrun every process runs the script: only rank 0 prints and warns (the
    others' errors still reach stderr)."""
    if int(os.environ.get("RANK", "0")) == 0:
        yield
        return
    logging.getLogger().setLevel(logging.ERROR)
    with open(os.devnull, "w", encoding="utf-8") as devnull, contextlib.redirect_stdout(devnull):
        yield
