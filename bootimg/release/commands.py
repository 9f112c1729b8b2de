"""`bootimg build` and `bootimg verify`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import BootimgError


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise BootimgError(f"cannot read {what}: {err.strerror}", file=path) from None


def _cmd_build(args: argparse.Namespace) -> int:
    from ..manifest import load_manifest
    from ..signing import SecretKey
    from .build import BuildOptions, build_release

    manifest = load_manifest(args.manifest, check_inputs=True)
    key = SecretKey.from_file(args.key) if args.key else None
    options = BuildOptions(
        out=Path(args.output), signing_key=key,
        verity_key_pem=_read(args.verity_key, "fs-verity signing key") if args.verity_key else None,
        verity_cert_pem=_read(args.verity_cert, "fs-verity certificate") if args.verity_cert else None,
        force=args.force)
    result = build_release(manifest, options)
    if args.json:
        data = {"release": result.release, "sharing": result.sharing}
        data.update({Path(r.file).stem: r.data for r in result.reports})
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    rel, share = result.release, result.sharing
    print(f"{result.out}: {rel['name']} {rel['version']}")
    for name, entry in sorted(rel["images"].items(), key=lambda kv: (kv[1]["role"] != "root", kv[0])):
        print(f"  {entry['role']:<9} {name:<16} {entry['digest']}  {entry['size']:>10} bytes")
    print(f"  kernel argument: {rel['root']['kernel_argument']}")
    print(f"  objects: {share['objects']} ({share['object_bytes']} bytes); shared between images: "
          f"{share['shared_objects']} objects, {share['shared_bytes']} bytes; sharing ratio {share['sharing_ratio']}")
    if (result.out / "release.json.minisig").exists():
        print(f"  signed by {key.keyid}")
    for report in result.reports:
        for line in report.summary:
            print(f"  {line}")
    return 0


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
    p = sub.add_parser("build", help="build a signed release from a manifest",
                       description="Build the images, objects and signed release.json a manifest describes.")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="release directory to create")
    p.add_argument("--key", metavar="SECRET.key", help="release signing key (trust profile 'signed')")
    p.add_argument("--verity-key", metavar="KEY.pem", help="key for fs-verity PKCS#7 image signatures")
    p.add_argument("--verity-cert", metavar="CERT.pem", help="certificate for --verity-key")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print release.json, the sharing and sandbox reports as JSON")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("verify", help="check a release: digests, objects, signatures",
                       description="Recompute every digest of a release and check its signatures.")
    p.add_argument("release", metavar="OUT")
    p.add_argument("--key", action="append", metavar="PUB", help="trusted public key (repeatable); "
                   "default: the keys the release's root image carries")
    p.set_defaults(func=_cmd_verify)
