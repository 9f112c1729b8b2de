"""`bootimg install`, `bootimg gc` and `bootimg status`: a device's releases."""

from __future__ import annotations

import argparse
import json
import sys


def _target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where (default: this device, booted by bootimg)")
    g.add_argument("--root", metavar="DIR", help="a mounted data partition (with --esp)")
    g.add_argument("--esp", metavar="DIR", help="a mounted ESP (with --root)")
    g.add_argument("--disk", metavar="IMG", help="a disk image bootimg disk made (its data partition is loop-mounted: root)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _print(args: argparse.Namespace, data: dict, text: str) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(text)


def _cmd_install(args: argparse.Namespace) -> int:
    from ..signing import PublicKey
    from .install import install
    from .source import open_source
    from .target import open_target

    keys = [PublicKey.from_file(k) for k in args.key] if args.key else None
    with open_target(root=args.root, esp=args.esp, disk=args.disk) as target, open_source(args.source) as source:
        if args.data_partuuid:
            target.data_partuuid = args.data_partuuid.lower()
        r = install(source, target, keys=keys, log=(lambda m: None) if args.json else
                    (lambda m: print(f"bootimg install: {m}", file=sys.stderr)))
    total = r.objects_transferred + r.objects_present
    text = (f"{target.where}: {'already had' if r.already_installed else 'installed'} {r.name} {r.version} "
            f"(security_version {r.security_version}, signed by {r.signed_by}) at {r.release_path} in {r.seconds:.1f} s; "
            f"next boot: {r.entry}\n"
            f"  objects: {r.objects_transferred} of {total} copied ({r.bytes_transferred} bytes), "
            f"{r.objects_present} already present ({r.bytes_present} bytes); images {r.images_bytes} bytes, "
            f"kernel + initramfs {r.boot_bytes} bytes; fs-verity {r.fsverity}")
    for note in r.notes:
        text += f"\n  note: {note}"
    _print(args, r.to_json(), text)
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from .gc import gc
    from .target import open_target

    with open_target(root=args.root, esp=args.esp, disk=args.disk) as target:
        r = gc(target, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    text = (f"{target.where}: kept {len(r.kept_releases)} releases ({', '.join(r.kept_releases) or 'none'}); "
            f"{verb} {len(r.removed_releases)} releases, {len(r.removed_kernel_dirs)} kernel directories, "
            f"{r.objects_removed} objects ({r.bytes_freed} bytes); {r.objects_kept} objects kept")
    _print(args, r.to_json(), text)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import render, status
    from .target import open_target

    with open_target(root=args.root, esp=args.esp, disk=args.disk, write=False) as target:
        st = status(target)
    _print(args, st.to_json(), render(st))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install", help="install a release next to the running one, as the next boot",
                       description="Authenticate a release against the keys the installed system trusts, refuse a "
                                   "lower rollback index, copy only the objects the shared store lacks (fs-verity "
                                   "enabled), write the release atomically and stage it as the next boot with "
                                   "systemd-boot's boot counting.")
    p.add_argument("source", metavar="SOURCE", help="a release directory (with boot/ from `bootimg initramfs -o "
                   "RELEASE/boot`), a tar(.gz|.zst) of one, or an http(s) URL of either")
    p.add_argument("--key", action="append", metavar="PUB", help="trust these keys instead of the installed system's")
    p.add_argument("--data-partuuid", metavar="UUID", help="the data partition's PARTUUID, for the first install "
                   "onto an ESP without bootimg entries (otherwise taken from the installed entries)")
    _target_args(p)
    p.set_defaults(func=_cmd_install)

    p = sub.add_parser("gc", help="remove releases and objects no boot entry needs",
                       description="Keep every release a loader entry points at (and the booted one); remove the "
                                   "other release directories, unused kernels on the ESP and unreferenced objects.")
    p.add_argument("--dry-run", action="store_true", help="only say what would go")
    _target_args(p)
    p.set_defaults(func=_cmd_gc)

    p = sub.add_parser("status", help="installed, booted and next releases, rollback minimum, store",
                       description="What the loader can boot (good, trying with tries left, bad), what was booted "
                                   "and boots next, the rollback minimum and the object store's sharing.")
    _target_args(p)
    p.set_defaults(func=_cmd_status)
