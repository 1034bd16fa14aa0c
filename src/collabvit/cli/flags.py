"""Command-line flags generated from the config dataclasses' fields (collabvit.config, lite).

Each field becomes one kebab-case flag (``masking_th`` -> ``--masking-th``) plus
the reference implementation's snake_case spelling (``--masking_th``), with the
help text, type and choices from the field's metadata. Values the user did not
give stay the dataclass's defaults, so a config is declared in exactly one place.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, fields

from collabvit.lite.modes import MASKING_MODES, canonical_uncertainty_mode

# The edge and the server are both ModelSpec; their flags keep the reference's names.
EDGE_FLAGS = {"name": "--model", "weights": "--model-weights", "kwargs": "--model-kwargs",
              "use_ema": "--use-ema"}  # fmt: skip
SERVER_FLAGS = {"name": "--server-model", "weights": "--server-weights",
                "kwargs": "--server-kwargs", "use_ema": "--server-use-ema"}  # fmt: skip


def _checked_number(parse: Callable, valid: Callable, expected: str) -> Callable:
    """An argparse type: parse a number and check its range, with a one-line reason."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from error
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _uncertainty_mode(text: str) -> str:
    try:
        return canonical_uncertainty_mode(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _number_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from error
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _cost_list(text: str) -> tuple[float, ...]:
    values = _number_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"costs must be >= 0, got {text!r}")
    return values


def _policy(text: str) -> tuple[str, tuple[float, ...]]:
    """MODE=TH,TH,... as given to --policy."""
    mode, sep, thresholds = text.partition("=")
    if not sep or mode not in MASKING_MODES:
        raise argparse.ArgumentTypeError(
            f"expected MODE=TH,TH,... with MODE one of {', '.join(MASKING_MODES)}, got {text!r}"
        )
    return mode, _number_list(thresholds)


TYPES: dict[str, Callable] = {
    "json": _json_object,
    "uncertainty_mode": _uncertainty_mode,
    "number_list": _number_list,
    "cost_list": _cost_list,
    "policy": _policy,
    "finite": _checked_number(float, math.isfinite, "a finite number"),
    "positive_int": _checked_number(int, lambda v: v >= 1, "a whole number >= 1"),
    "non_negative_int": _checked_number(int, lambda v: v >= 0, "a whole number >= 0"),
    "num_etas": _checked_number(int, lambda v: 1 <= v <= 1000, "a whole number in 1..1000"),
    "num_bins": _checked_number(int, lambda v: 1 <= v <= 10_000, "a whole number in 1..10000"),
    "cost": _checked_number(float, lambda v: math.isfinite(v) and v >= 0, "a cost >= 0"),
    "percent": _checked_number(float, lambda v: 0.0 <= v <= 100.0, "an accuracy in [0, 100]"),
    "open_fraction": _checked_number(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    "fraction": _checked_number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "probability": _checked_number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "positive": _checked_number(float, lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "non_negative": _checked_number(float, lambda v: math.isfinite(v) and v >= 0,
                                    "a number >= 0"),  # fmt: skip
    "port": _checked_number(int, lambda v: 1 <= v <= 65535, "a port in 1..65535"),
}


def _spellings(flag: str) -> list[str]:
    """A kebab-case flag and the reference's snake_case spelling of it."""
    snake = "--" + flag[2:].replace("-", "_")
    return [flag] if snake == flag else [flag, snake]


def _flag_of(item: Field, names: Mapping[str, str] | None) -> str:
    return (names or {}).get(item.name) or "--" + item.name.replace("_", "-")


def _default(item: Field):
    if item.default is not MISSING:
        return item.default
    return item.default_factory() if item.default_factory is not MISSING else None


def add_config_arguments(
    parser,
    config_type: type,
    names: Mapping[str, str] | None = None,
    exclude: tuple[str, ...] = (),
    **defaults,
) -> None:
    """Add one flag per field of `config_type` to `parser` (a parser or argument group).

    A switch (bool field) sets the opposite of the field's default. Fields whose
    metadata name the same ``exclusive`` group are mutually exclusive flags.

    Args:
        names: field -> flag, where the flag is not --<field-with-dashes>.
        exclude: fields that get no flag.
        defaults: field -> default shown in the help, where the command applies another
            default than the field's itself (given_values leaves unset flags out).
    """
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for item in fields(config_type):
        if item.name in exclude:
            continue
        meta = dict(item.metadata)
        group = meta.pop("exclusive", None)
        target = parser
        if group is not None:  # fields of one group: at most one of their flags
            if group not in exclusive:
                exclusive[group] = parser.add_mutually_exclusive_group()
            target = exclusive[group]
        help_text = meta.pop("help")
        aliases = meta.pop("aliases", ())
        flag = _flag_of(item, names)
        options: dict = {"help": help_text, "dest": flag[2:].replace("-", "_")}
        if isinstance(meta.get("type"), str):
            meta["type"] = TYPES[meta["type"]]
        if item.type in ("bool", bool):
            options["action"] = "store_false" if _default(item) else "store_true"
        elif "%(default)s" in help_text and meta.get("action") != "append":
            # shown in the help, but not set: given_values then tells typed flags from
            # defaults (an exported edge refuses only settings the user asked for)
            value = defaults.get(item.name, _default(item))
            shown = list(value) if isinstance(value, tuple) else value
            help_text = help_text.replace("%(default)s", str(shown).replace("%", "%%"))
            options["help"] = help_text
        options.update(meta)
        spellings = [s for name in (flag, *aliases) for s in _spellings(name)]
        target.add_argument(*dict.fromkeys(spellings), **options)


def given_values(
    config_type: type, args: argparse.Namespace, names: Mapping[str, str] | None = None
) -> dict:
    """The fields of `config_type` the command line set (lists as tuples), by field name.

    Unset options (None, or a switch left at its default) are left out, so the
    dataclass's own defaults apply to them.
    """
    values = {}
    for item in fields(config_type):
        value = getattr(args, _flag_of(item, names)[2:].replace("-", "_"), None)
        if value is None or (isinstance(value, bool) and value == _default(item)):
            continue
        if isinstance(value, list):
            value = tuple(value)
        values[item.name] = value
    return values
