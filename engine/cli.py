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

from engine.errors import ConfigError, Interrupted, ReportedElsewhere, UserError
from engine.paths import check_kind

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


class JoinRepeated(argparse.Action):
    """A string option that may be given several times: `--load a --load b` is
    `--load a,b` (its field stays one comma-separated string, as a saved config holds it)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        previous = getattr(namespace, self.dest, "")
        setattr(namespace, self.dest, f"{previous},{values}" if previous else values)


def repeated(flag: str, value: str) -> list[str]:
    """The values of a repeatable option (JoinRepeated); an empty one is refused."""
    values = value.split(",")
    if not all(v.strip() for v in values):
        raise ConfigError(f"--{flag} {value!r}: an empty path in the list")
    return values


def build_parser(cls: Type[T], description: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser with one `--name` option per field of the dataclass `cls`.
    Field metadata may give `help` and `choices`, `positional` for an optional
    positional argument, or `repeatable` for a string option given several times
    (JoinRepeated; its default must be ""); bools become --flag / --no-flag. Abbreviations
    are off: a recorded command must mean the same after an option is added."""
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
        elif f.metadata.get("repeatable"):
            if default != "":  # JoinRepeated would join the values to the default
                raise TypeError(f"{cls.__name__}.{f.name}: a repeatable option must default to ''")
            parser.add_argument(f"--{f.name}", action=JoinRepeated, default=default, help=help_text)
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
        given = explicit_options(cls, argv)
        args = {**args, **read_config_file(cls, args["config"], given),
                **given, "config": args["config"]}
    return cls(**args)


# Never taken from a config file: a new run gets a new folder, and records its own --config.
NOT_FROM_FILE = ("run_dir", "config")
# Written by a run into its config.json beside its options (engine/run._train).
RUN_KEYS = ("world_size",)
# What a seed may be: numpy takes seeds in [0, 2**32).
SEED_RANGE = (0, 2 ** 32)
KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def read_config_file(cls: Type[T], path: str, given: dict | None = None) -> dict[str, Any]:
    """The settings of a run's config.json, each checked as its flag would be (type,
    choices; an unknown key or a null is an error). The file must be a config of this
    script: it holds one of the fields `cls` adds to the config it extends. `given`: the
    flags given beside --config."""
    check_kind("--config", path, "file")
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
    unknown = sorted(saved.keys() - known - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key {', '.join(map(json.dumps, unknown))} "
                          "(not an option of this script)")
    for f in fields(cls):
        if f.name in saved:
            check_file_value(f, saved[f.name], path)
    check_world_size(cls, path, saved, given or {})
    return {k: v for k, v in saved.items() if k in known and k not in NOT_FROM_FILE}


def check_file_value(f: dataclasses.Field, value: Any, path: str) -> None:
    """A config file's value as argparse would take the flag's: of its type (an int for a
    float is fine, a bool must be true or false), one of its choices, never null."""
    kind = _arg_type(f.type)
    where = f'--config {path}: "{f.name}"'
    if value is None:
        if "None" not in str(f.type):
            raise ConfigError(f"{where} is null; give {KIND_NAMES.get(kind, kind.__name__)} "
                              "or leave the key out")
        return
    fits = (isinstance(value, bool) if kind is bool else not isinstance(value, bool) and
            isinstance(value, (int, float) if kind is float else kind))
    if not fits:
        raise ConfigError(f"{where} must be {KIND_NAMES.get(kind, kind.__name__)}, "
                          f"got {json.dumps(value)}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, "
                          f"got {json.dumps(value)}")


def check_world_size(cls: Type[T], path: str, saved: dict, given: dict) -> None:
    """A config of a run on N processes, used on M: the global batch is batch size x
    grad_accumulation x processes, so it would change without a word. Refused unless the
    flags beside --config choose it: --grad_accumulation, or every batch size."""
    if "world_size" not in saved:
        return
    old = saved["world_size"]
    if not isinstance(old, int) or isinstance(old, bool) or old < 1:
        raise ConfigError(f'--config {path}: "world_size" must be a positive integer, '
                          f"got {json.dumps(old)}")
    new = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, as engine/distributed reads it
    sizes = [f.name for f in fields(cls) if f.name.startswith("batch_size")]
    if old == new or "grad_accumulation" in given or (sizes and set(sizes) <= given.keys()):
        return
    factor = old * saved.get("grad_accumulation", 1)
    keep = f"pass --grad_accumulation {factor // new} to keep it, or " if factor % new == 0 else ""
    raise ConfigError(f"--config {path}: a run on {old} processes, this one has {new}: the "
                      "global batch (batch size x grad_accumulation x processes) would change; "
                      f"{keep}give --grad_accumulation or every batch size "
                      f"({', '.join('--' + s for s in sizes)}) to choose it")


def check_ranges(cfg: Any) -> None:
    """Every int option of `cfg` within the [low, high) its class gives in INT_RANGES
    (high None: no upper bound). An int option without a range is a programming error."""
    for f in fields(cfg):
        if _arg_type(f.type) is not int:
            continue
        if f.name not in type(cfg).INT_RANGES:
            raise TypeError(f"{type(cfg).__name__}.{f.name}: an int option without INT_RANGES")
        low, high = type(cfg).INT_RANGES[f.name]
        value = getattr(cfg, f.name)
        if value < low or (high is not None and value >= high):
            bound = (f"an integer in [{low}, {high})" if high is not None else
                     {0: "0 or positive", 1: "positive"}.get(low, f"at least {low}"))
            raise ConfigError(f"--{f.name} must be {bound}, got {value}")


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
            if not isinstance(err, ReportedElsewhere):
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
