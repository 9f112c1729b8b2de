"""`bootimg build`: the whole build from the command line."""

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
    from . import BuildOptions, build

    manifest = load_manifest(args.manifest, check_inputs=True)
    key = SecretKey.from_file(args.key) if args.key else None
    options = BuildOptions(
        out=Path(args.output), signing_key=key,
        verity_key_pem=_read(args.verity_key, "fs-verity signing key") if args.verity_key else None,
        verity_cert_pem=_read(args.verity_cert, "fs-verity certificate") if args.verity_cert else None,
        force=args.force)
    result = build(manifest, options)
    if args.json:
        json.dump({"release": result.release, "sharing": result.sharing}, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    rel, share = result.release, result.sharing
    print(f"{result.out}: {rel['name']} {rel['version']}")
    for name, entry in sorted(rel["images"].items(), key=lambda kv: (kv[1]["role"] != "root", kv[0])):
        print(f"  {entry['role']:<9} {name:<16} {entry['digest']}  {entry['size']:>10} bytes")
    print(f"  kernel argument: {rel['root']['kernel_argument']}")
    print(f"  objects: {share['objects']} ({share['object_bytes']} bytes); shared between images: "
          f"{share['shared_objects']} objects, {share['shared_bytes']} bytes; sharing ratio {share['sharing_ratio']}")
    if key is not None:
        sealed = rel["trust"] == "sealed"
        print(f"  signed by {key.keyid}" + (" (trust profile 'sealed': the boot checks the root digest on the kernel "
                                           "command line; the signature is for `bootimg verify --key`)" if sealed else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a signed release from a manifest",
                       description="Build the images, objects and signed release.json a manifest describes.")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="release directory to create")
    p.add_argument("--key", metavar="SECRET.key", help="release signing key (trust profile 'signed')")
    p.add_argument("--verity-key", metavar="KEY.pem", help="key for fs-verity PKCS#7 image signatures")
    p.add_argument("--verity-cert", metavar="CERT.pem", help="certificate for --verity-key")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a release (waits for another build "
                   "of OUT to finish first)")
    p.add_argument("--json", action="store_true", help="print release.json and the sharing report as JSON")
    p.set_defaults(func=_cmd_build)
