"""`bootimg disk` and `bootimg initramfs`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..errors import BootimgError

_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1073741824``: bytes (binary units)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise BootimgError(f"bad size {text!r} (e.g. 4G, 512M or a number of bytes)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def disk_options(args: argparse.Namespace, boot=None, *, force: bool = False):
    from .image import DiskOptions

    return DiskOptions(format=args.format, size=parse_size(args.size) if args.size else None,
                       esp_size=parse_size(args.esp_size) if args.esp_size else None, uki=args.uki,
                       secureboot_key=Path(args.secureboot_key) if args.secureboot_key else None,
                       secureboot_cert=Path(args.secureboot_cert) if args.secureboot_cert else None,
                       boot=boot, force=force)


def print_disk(result, as_json: bool) -> None:
    if as_json:
        json.dump(result.to_json(), sys.stdout, indent=2, sort_keys=True)
        print()
        return
    p = result.partitions
    print(f"{result.path}: {result.format}, {result.size / (1 << 20):.0f} MiB, {result.arch}, "
          f"made in {result.seconds:.1f} s")
    print(f"  ESP   {p['esp']['size'] / (1 << 20):.0f} MiB  entry {result.entry} "
          f"({'UKI' if result.boot['uki'] else 'Type #1'}{', signed' if result.boot['signed'] else ''}), "
          f"kernel {result.boot['kver']}, initramfs {result.boot['initrd_size'] / 1e6:.1f} MB")
    print(f"  data  {p['data']['size'] / (1 << 20):.0f} MiB  PARTUUID {result.data_partuuid}, "
          f"{p['data']['content'] / 1e6:.1f} MB in {p['data']['entries']} entries")
    print(f"  command line: {result.cmdline}")


def add_disk_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["raw", "qcow2"], default="raw", help="disk image format (default raw)")
    p.add_argument("--size", metavar="SIZE", help="whole disk size, e.g. 4G (default: what it holds + 512 MiB)")
    p.add_argument("--esp-size", metavar="SIZE", help="ESP size (default: room for three kernels + initramfs)")
    p.add_argument("--uki", action="store_true", help="a Unified Kernel Image instead of a Type #1 entry")
    p.add_argument("--secureboot-key", metavar="KEY.pem", help="sign the UKI and systemd-boot with sbsign")
    p.add_argument("--secureboot-cert", metavar="CERT.pem", help="certificate for --secureboot-key")
    p.add_argument("--boot", metavar="DIR", help="kernel + initramfs from `bootimg initramfs -o DIR` "
                   "(default: built from the release, which needs root)")


def boot_files(args: argparse.Namespace):
    from .initramfs import load_boot_files

    return load_boot_files(args.boot) if args.boot else None


def _cmd_disk(args: argparse.Namespace) -> int:
    from .image import make_disk

    result = make_disk(args.release, args.output, disk_options(args, boot_files(args), force=args.force))
    print_disk(result, args.json)
    return 0


def _cmd_initramfs(args: argparse.Namespace) -> int:
    from .initramfs import build_initramfs, export_boot_files

    boot = build_initramfs(args.release, rebuild=args.rebuild)
    if args.output:
        export_boot_files(boot, args.output)
    where = args.output or boot.kernel.parent
    info = {"kver": boot.kver, "arch": boot.arch, "kernel": str(Path(where) / "vmlinuz"),
            "initrd": str(Path(where) / "initrd.img"), "initrd_size": boot.initrd_size, "cached": boot.cached,
            "seconds": round(boot.seconds, 1)}
    if args.json:
        json.dump(info, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(f"{where}: kernel {boot.kver} ({boot.arch}), initramfs {boot.initrd_size / 1e6:.1f} MB"
              f"{' (cached)' if boot.cached else f' in {boot.seconds:.0f} s'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("disk", help="a bootable GPT disk (UEFI, systemd-boot) of a release",
                       description="Lay out a release on a GPT disk image: an ESP with systemd-boot and the "
                                   "release's boot entry, and the ext4 (verity) data partition. Needs no root "
                                   "with --boot.")
    p.add_argument("release", metavar="RELEASE")
    p.add_argument("-o", "--output", required=True, metavar="DISK", help="disk image to write")
    add_disk_arguments(p)
    p.add_argument("--force", action="store_true", help="replace DISK if it exists (a regular file)")
    p.add_argument("--json", action="store_true", help="print what was made as JSON")
    p.set_defaults(func=_cmd_disk)

    p = sub.add_parser("initramfs", help="the kernel + initramfs of a release (dracut in its root)",
                       description="Run dracut inside the release's own root image (with its 90bootimg module) "
                                   "and give the kernel and initramfs; cached by the root digest. Needs root.")
    p.add_argument("release", metavar="RELEASE")
    p.add_argument("-o", "--output", metavar="DIR", help="copy vmlinuz, initrd.img and info.json here")
    p.add_argument("--rebuild", action="store_true", help="ignore the cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_initramfs)
