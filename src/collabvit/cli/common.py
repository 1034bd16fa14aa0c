"""What every command of the command line shares: one-line errors and warnings, the checks of
files given on it (before any work starts), and the model and data specs built from its flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from collabvit.cli.flags import EDGE_FLAGS, SERVER_FLAGS, add_config_arguments, given_values
from collabvit.config import DataSpec, ModelSpec, RunConfig
from collabvit.lite.config import TOKEN_ENV
from collabvit.lite.specs import EdgeConfig, shipped_pair


class UsageError(Exception):
    """A user mistake found after parsing; reported in one line with status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(command: str, error: BaseException | str) -> int:
    """Report a user mistake in one line; the command's exit status (2)."""
    print(f"collabvit {command}: error: {error}", file=sys.stderr)
    return 2


def warn(command: str, message: str) -> None:
    print(f"collabvit {command}: warning: {message}", file=sys.stderr)


def progress(run: RunConfig) -> bool | None:
    """progress_bar's `enabled`: off with --quiet, else its own choice (a bar on a terminal,
    periodic lines in a log)."""
    return False if run.quiet else None


def check_output_file(path: str | None) -> None:
    """An output file must be writable before any work starts (its folder is created)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{path} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the folder of {path}: {error.strerror or error}") \
            from error  # fmt: skip
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target,
                                                                                   os.W_OK)):
        raise UsageError(f"{path} is not writable")


def check_output_dir(path: str, files: Sequence[str] = ()) -> Path:
    """An output folder, created and writable, where none of `files` is something else."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the folder {path}: {error.strerror or error}") from error
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{path} is not writable")
    for name in files:
        if (folder / name).exists() and not (folder / name).is_file():
            raise UsageError(f"{folder / name} exists and is not a file")
    return folder


def check_input_file(path: str | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{what} {path} does not exist")


def token(given: str | None) -> str | None:
    """The bearer token: the flag's, else the environment's (an empty one means none)."""
    return given if given is not None else (os.environ.get(TOKEN_ENV) or None)


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """Which models, which images: the flags of every command that runs the pair."""
    add_config_arguments(parser.add_argument_group("edge model"), ModelSpec, EDGE_FLAGS)
    add_config_arguments(parser.add_argument_group("server model"), ModelSpec, SERVER_FLAGS)
    add_config_arguments(parser.add_argument_group("data"), DataSpec)


def model_specs(args: argparse.Namespace, data: DataSpec) -> tuple[ModelSpec, ModelSpec]:
    """The edge's and the server's specs; a model not named is the data set's shipped one."""
    edge_name, server_name = shipped_pair(data.data_set)
    edge = {"name": edge_name, **given_values(ModelSpec, args, EDGE_FLAGS)}
    server = {"name": server_name, **given_values(ModelSpec, args, SERVER_FLAGS)}
    return ModelSpec(**edge), ModelSpec(**server)


def pair_specs(args: argparse.Namespace) -> tuple[ModelSpec, ModelSpec, DataSpec, RunConfig]:
    """The specs of a command that runs the pair: edge, server, data and run."""
    data = DataSpec(**given_values(DataSpec, args))
    return (*model_specs(args, data), data, RunConfig(**given_values(RunConfig, args)))


def edge_choices(args: argparse.Namespace) -> dict:
    """The EdgeConfig values given on the command line (the rest come from the model's
    default point), checked now so that a bad value fails before any model loads."""
    chosen = given_values(EdgeConfig, args)
    EdgeConfig(**chosen)
    return chosen


def load_pair(command: str, edge: ModelSpec, server: ModelSpec, data: DataSpec,
              run: RunConfig, warn_user: bool = True, with_server: bool = True):  # fmt: skip
    """models.pair.load_pair, its notes (a checkpoint's own warnings) said as warnings."""
    from collabvit.models.pair import load_pair as load

    pair = load(edge, server, data, run.device, with_server=with_server,
                precision=run.precision)  # fmt: skip
    for note in pair.warnings if warn_user else ():
        warn(command, note)
    return pair
