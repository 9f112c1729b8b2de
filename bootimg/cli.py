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

# Each module adds its sub-commands with register(subparsers); listed in help order, with the
# commands each registers (so that running one imports only its module: the manifest and
# signing modules cost ~0.3 s of imports that `bootimg mkcomposefs` has no use for).
COMMAND_MODULES = {
    "bootimg.composefs.commands": ("mkcomposefs", "composefs-info"),
    "bootimg.pipeline.commands": ("validate", "build"),
    "bootimg.signing.commands": ("keygen", "sign", "verify-signature"),
    "bootimg.release.commands": ("verify", "mount", "umount"),
    "bootimg.disk.commands": ("disk", "initramfs"),
    "bootimg.vm.commands": ("qemu",),
    "bootimg.device.commands": ("install", "gc", "status"),
    "bootimg.board.commands": ("board",),
    "bootimg.kpi.commands": ("kpi",),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of ``command``'s module when it is a known one."""
    parser = argparse.ArgumentParser(prog="bootimg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    modules = [m for m, commands in COMMAND_MODULES.items() if command in commands] or list(COMMAND_MODULES)
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def one_line(message: str) -> str:
    """A message quoting user input (a name, a field) with its control characters escaped, so
    that it stays one line on the terminal."""
    return message.translate(_CONTROL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        code = args.func(args) or 0
        # The process is about to exit: keep the interpreter's final garbage collection from
        # walking the (large, cyclic) trees a command built; the OS frees them at once.
        gc.freeze()
        return code
    except BootimgError as err:
        # One line per problem (an error of several problems, e.g. the boot check, lists them in
        # ``lines``); control characters are escaped, so a hostile name cannot break a line.
        for line in getattr(err, "lines", None) or [str(err)]:
            print(f"bootimg {args.cmd}: {one_line(line)}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # `bootimg composefs-info dump IMG | head`: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        # The environment refused something (permissions, a full disk, a vanished file) where no
        # step turned it into a BootimgError of its own: still one line naming the file.
        where = f"{err.filename}: " if err.filename else ""
        print(f"bootimg {args.cmd}: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
