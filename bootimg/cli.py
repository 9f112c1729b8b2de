"""The `bootimg` command line: a thin layer over the library API.

Every sub-command parses its arguments, calls one library function and turns a
``BootimgError`` into one line on stderr and a non-zero exit (no traceback).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

from .errors import BootimgError

# Each module adds its sub-commands with register(subparsers); listed in help order.
COMMAND_MODULES = (
    "bootimg.composefs.commands",
    "bootimg.manifest.commands",
    "bootimg.signing.commands",
    "bootimg.release.commands",
    "bootimg.board.commands",
    "bootimg.kpi.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bootimg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args) or 0
        # The process is about to exit: keep the interpreter's final garbage collection from
        # walking the (large, cyclic) trees a command built; the OS frees them at once.
        gc.freeze()
        return code
    except BootimgError as err:
        print(f"bootimg {args.cmd}: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # `bootimg composefs-info dump IMG | head`: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
