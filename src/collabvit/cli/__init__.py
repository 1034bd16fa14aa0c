"""The `collabvit` command: one module per command, each parsing its flags into the config
dataclasses, calling the library and printing.

Flags are generated from the configs' fields (flags.py): kebab-case, plus the reference
implementation's snake_case spellings (``--masking_mode``, ``--uncer_th``, ``--data_path``).
User mistakes exit with status 2 and one line on stderr, never a traceback. torch, timm and
matplotlib are imported only when a command runs, so help and usage errors answer at once,
and the light edge (`collabvit edge --onnx`) runs where they are not installed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from collabvit import __version__
from collabvit.cli import edge, export, reproduce, serve, sweep, train, visualize
from collabvit.cli import eval as eval_command
from collabvit.cli.common import Parser

# the commands in the order `collabvit --help` lists them
COMMANDS = {"eval": eval_command, "reproduce": reproduce, "train": train, "sweep": sweep,
            "serve": serve, "edge": edge, "export": export, "visualize": visualize}  # fmt: skip
# What `pip install 'collabvit[full]'` adds to the torch-free base install.
FULL_INSTALL = ("torch", "torchvision", "timm", "safetensors", "matplotlib", "fastapi", "uvicorn",
                "prometheus_client", "onnx", "onnxscript")  # fmt: skip
# the libraries with an extra of their own: the light edge's runtime, the replicated server's
OWN_EXTRAS = {"onnxruntime": "edge", "ray": "ray"}


def build_parser() -> Parser:
    parser = Parser(prog="collabvit", description=(
        "Attention-aware collaborative inference between an edge ViT and a server ViT "
        "(Im et al., IEEE IoT Journal 2024)."))  # fmt: skip
    parser.add_argument("--version", action="version", version=f"collabvit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module in COMMANDS.items():
        command = commands.add_parser(name, help=module.SUMMARY, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ModuleNotFoundError as error:  # a light install (no torch) running a full command
        missing = (error.name or "").split(".")[0]
        extra = OWN_EXTRAS.get(missing, "full" if missing in FULL_INSTALL else None)
        if extra is None:
            raise
        print(f"collabvit {args.command}: error: this needs {missing}, which is not installed "
              f"here: pip install 'collabvit[{extra}]'", file=sys.stderr)  # fmt: skip
        return 2
