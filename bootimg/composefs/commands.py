"""Sub-commands of the composefs core: `bootimg mkcomposefs` and `bootimg composefs-info`."""

from __future__ import annotations

import argparse


def _cmd_mkcomposefs(args: argparse.Namespace) -> int:
    from . import mkcomposefs

    return mkcomposefs.run(args)


def _cmd_composefs_info(args: argparse.Namespace) -> int:
    from . import info

    return info.run(args)


def _add_mkcomposefs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mkcomposefs",
        help="build a composefs image (a drop-in for mkcomposefs 1.0.8)",
        description="Build a composefs image from a directory or a composefs dump file.",
    )
    p.add_argument("source", metavar="SOURCE", help="directory to scan, or dump file with --from-file ('-' = stdin)")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="image to write ('-' = stdout)")
    p.add_argument("--from-file", action="store_true", help="SOURCE is a composefs dump file")
    p.add_argument("--digest-store", metavar="PATH", help="copy external files into this object store")
    p.add_argument("--print-digest", action="store_true", help="print the image's fs-verity digest")
    p.add_argument("--print-digest-only", action="store_true", help="print the digest, write no image")
    p.add_argument("--use-epoch", action="store_true", help="set every mtime to 0")
    p.add_argument("--skip-devices", action="store_true", help="leave out block and character devices")
    p.add_argument("--skip-xattrs", action="store_true", help="leave out all xattrs")
    p.add_argument("--user-xattrs", action="store_true", help="keep only user.* xattrs")
    p.add_argument("--min-version", type=int, default=None, metavar="N",
                   help="lowest format version (default 0; with only --max-version given: 0)")
    p.add_argument("--max-version", type=int, default=None, metavar="N",
                   help="highest format version (default 1; with only --min-version given: 0, raised to the minimum)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="hashing threads (default: CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_cmd_mkcomposefs)


def _add_composefs_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "composefs-info",
        help="inspect composefs images (same output as composefs-info 1.0.8)",
        description="Inspect composefs images.",
    )
    p.add_argument("command", choices=["ls", "dump", "objects", "missing-objects", "measure-file"])
    p.add_argument("files", metavar="IMAGE", nargs="+")
    p.add_argument("--basedir", metavar="PATH", help="object store for missing-objects")
    p.add_argument("--filter", metavar="NAME", action="append", default=[],
                   help="only show this top-level entry (repeatable)")
    p.set_defaults(func=_cmd_composefs_info)


def register(sub: argparse._SubParsersAction) -> None:
    _add_mkcomposefs(sub)
    _add_composefs_info(sub)
