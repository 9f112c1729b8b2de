"""`bootimg build` and `bootimg validate`: the whole build, and the check of its inputs, from the
command line (validate lives here because ``--root`` checks the root with the boot layer)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..disk.commands import add_disk_arguments
from ..errors import BootimgError


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise BootimgError(f"cannot read {what}: {err.strerror}", file=path) from None


def _verity_note(out: Path) -> None:
    """One note when the release's objects have no fs-verity here (the build host's filesystem
    cannot enable it): the target enables it on install, but mounting it here needs --no-verity."""
    from ..release.mount import objects_verity

    if objects_verity(out / "objects") is False:
        print(f"bootimg build: note: {out}/objects have no fs-verity on this build host (the target enables it "
              f"when the release is installed); to look inside here: bootimg mount --no-verity {out} DIR",
              file=sys.stderr)


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
    result = build(manifest, options, boot_check=not args.no_boot_check)
    _verity_note(result.out)
    disk = _disk(args, result.out) if args.disk else None
    if args.json:
        data = {"release": result.release, "sharing": result.sharing,
                **{Path(r.file).stem: r.data for r in result.reports}}
        if disk:
            data["disk"] = disk.to_json()
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
    if key is not None:
        sealed = rel["trust"] == "sealed"
        print(f"  signed by {key.keyid}" + (" (trust profile 'sealed': the boot checks the root digest on the kernel "
                                           "command line; the signature is for `bootimg verify --key`)" if sealed else ""))
    for report in result.reports:
        for line in report.summary:
            print(f"  {line}")
    if disk is not None:
        from ..disk.commands import print_disk

        print_disk(disk, False)
    return 0


def _disk(args: argparse.Namespace, release: Path):
    """``build --disk``: the release on a bootable disk, in the same run."""
    from ..disk.commands import boot_files, disk_options
    from ..disk.image import make_disk

    return make_disk(release, args.disk, disk_options(args, boot_files(args), force=args.force))


def _cmd_validate(args: argparse.Namespace) -> int:
    from ..manifest.commands import validate_command

    code, manifest = validate_command(args)
    if code or not args.root:
        return code
    from . import check_rootfs

    check = check_rootfs(manifest)     # BootCheckError: every problem, one line each
    print(f"{args.file}: rootfs {manifest.rootfs.source.path} can boot a verified composefs root: {check.summary()}",
          file=sys.stderr if args.json else sys.stdout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..manifest.commands import add_arguments

    p = sub.add_parser(
        "validate",
        help="check a manifest and report every problem with its line",
        description="Check a bootimg manifest (apiVersion bootimg/v1) against its schema and "
                    "cross-references; with --root, also whether its root can boot a verified composefs root. "
                    "Exit 0 valid, 1 invalid, 2 unreadable.",
    )
    add_arguments(p)
    p.add_argument("--root", action="store_true",
                   help="also load the rootfs source and check that it can boot a verified composefs root "
                        "(kernel >= 6.6 with EROFS, overlayfs and fs-verity; systemd; dracut; the initramfs tools)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("build", help="build a signed release from a manifest",
                       description="Build the images, objects and signed release.json a manifest describes. "
                                   "The root is checked first: it must be able to boot a verified composefs root.")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="release directory to create")
    p.add_argument("--key", metavar="SECRET.key", help="release signing key (trust profile 'signed')")
    p.add_argument("--verity-key", metavar="KEY.pem", help="key for fs-verity PKCS#7 image signatures")
    p.add_argument("--verity-cert", metavar="CERT.pem", help="certificate for --verity-key")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a release (waits for another build "
                   "of OUT to finish first)")
    p.add_argument("--no-boot-check", action="store_true",
                   help="skip the check that the root can boot a verified composefs root (kernel, systemd, "
                        "dracut, initramfs tools): for a release that is never booted as a root")
    p.add_argument("--json", action="store_true", help="print release.json, the sharing and sandbox reports as JSON")
    p.add_argument("--disk", metavar="DISK", help="also lay the release out on a bootable disk (see `bootimg disk`)")
    add_disk_arguments(p)
    p.set_defaults(func=_cmd_build)
