"""`bootimg verify`."""

from __future__ import annotations

import argparse
import sys


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..signing import PublicKey
    from .verify import verify_release

    keys = [PublicKey.from_file(k) for k in args.key] if args.key else None
    report = verify_release(args.release, keys)
    for problem in report.problems:
        print(f"{args.release}/{problem}" if not problem.startswith("/") else problem, file=sys.stderr)
    if not report.ok:
        print(f"{args.release}: NOT OK: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.release}: OK: {report.images} images, {report.objects} objects, {report.signature}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a release: digests, objects, signatures",
                       description="Recompute every digest of a release and check its signatures.")
    p.add_argument("release", metavar="OUT")
    p.add_argument("--key", action="append", metavar="PUB", help="trusted public key (repeatable); "
                   "default: the keys the release's root image carries")
    p.set_defaults(func=_cmd_verify)
