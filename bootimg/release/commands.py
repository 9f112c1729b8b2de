"""`bootimg verify`, `bootimg mount`, `bootimg umount`."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import BootimgError

# Exit status: 0 authenticated (intact and signed by a key given with --key), 1 a problem,
# 3 intact as built but not authenticated (no --key: nothing says who signed it).
EXIT_NOT_AUTHENTICATED = 3


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..signing import PublicKey
    from .verify import verify_release

    keys = [PublicKey.from_file(k) for k in args.key] if args.key else None
    report = verify_release(args.release, keys, objects=args.objects)
    code = 1 if not report.ok else 0 if report.authenticated else EXIT_NOT_AUTHENTICATED
    if args.json:
        json.dump({"release": args.release, **report.to_json()}, sys.stdout, indent=2, sort_keys=True)
        print()
        return code
    for problem in report.problems:
        print(f"{args.release}/{problem}", file=sys.stderr)
    for note in report.notes:
        print(f"{args.release}/{note}", file=sys.stderr)
    counts = f"{report.images} images, {report.objects} objects"
    if not report.ok:
        print(f"{args.release}: NOT OK: {len(report.problems)} problem(s)", file=sys.stderr)
    elif report.authenticated:
        print(f"{args.release}: OK: {counts}, signed by {report.signed_by} (a key given with --key)")
    else:
        signer = (f"signed by {report.signed_by}, a key its own root image carries" if report.signed_by
                  else "signature not checked" if report.notes else "not signed")
        print(f"{args.release}: CONSISTENT, NOT AUTHENTICATED: {counts}, {signer}; no --key given, so this "
              "proves nothing about who signed it")
    return code


def _cmd_mount(args: argparse.Namespace) -> int:
    from .mount import mount_release, unmount_release

    if args.unmount:
        if args.dir is not None:
            raise BootimgError("--unmount takes one argument: the directory (bootimg mount --unmount DIR)")
        print(f"{unmount_release(args.release)}: unmounted")
        return 0
    if args.dir is None:
        raise BootimgError("needs RELEASE and DIR (bootimg mount RELEASE DIR)")
    m = mount_release(args.release, args.dir, image=args.image, verity=not args.no_verity)
    how = "verity=require" if m.verity else "without runtime verification (--no-verity)"
    print(f"{m.target}: image '{m.image}' of {args.release} (fs-verity digest {m.digest}), read-only, {how}; "
          f"bootimg umount {m.target} undoes it")
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    from .mount import unmount_release

    print(f"{unmount_release(args.dir)}: unmounted")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="check a release: digests, objects, signatures",
        description="Recompute every digest of a release and check its signatures. Who signed it is only "
                    "checked against keys given with --key (exit 0); without --key the release is only checked "
                    "against itself (exit 3 when consistent), which proves nothing about who signed it. "
                    "Exit 1: a problem, every one named.")
    p.add_argument("release", metavar="OUT")
    p.add_argument("--key", action="append", metavar="PUB",
                   help="trusted public key (repeatable): the release must be signed by one of them")
    p.add_argument("--objects", metavar="DIR", help="the object store of an installed release, shared with other "
                   "releases (a device's /bootimg/objects): only the objects this release needs are checked")
    p.add_argument("--json", action="store_true", help="print the result as JSON (status: authenticated, "
                   "consistent or failed; problems; notes)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("mount", help="mount an image of a release to look inside it (root)",
                       description="Mount an image of a release read-only the composefs way: its EROFS image "
                                   "(loop) under an overlay with the release's objects/ as the data-only layer "
                                   "and verity=require. The image's digest must be the one release.json records. "
                                   "`bootimg mount --unmount DIR` (or `bootimg umount DIR`) undoes it.")
    p.add_argument("release", metavar="RELEASE", help="release directory (bootimg build -o RELEASE); with --unmount: DIR")
    p.add_argument("dir", metavar="DIR", nargs="?", help="an existing directory to mount it on")
    p.add_argument("--image", default="root", metavar="NAME", help="which image: root (default) or a container's name")
    p.add_argument("--no-verity", action="store_true",
                   help="mount without verity=require (for a build host whose filesystem has no fs-verity): "
                        "objects are read without runtime verification")
    p.add_argument("--unmount", action="store_true", help="undo a bootimg mount at the directory given")
    p.set_defaults(func=_cmd_mount)
    p = sub.add_parser("umount", help="undo bootimg mount", description="Unmount what `bootimg mount` mounted at DIR.")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_cmd_umount)
