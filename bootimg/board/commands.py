"""`bootimg board prepare|rootfs|boot-baseline`: the test rig's Debian root and its plain baseline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import BootimgError


def _spec(args: argparse.Namespace):
    from .rootfs import RootfsSpec

    return RootfsSpec.for_arch(args.arch, **({"mirror": args.mirror} if args.mirror else {}))


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .board import prepare

    board = prepare(_spec(args), cache=args.cache, rebuild=args.rebuild)
    r, b = board.rootfs, board.baseline
    if args.json:
        json.dump({"cache": str(board.cache), "rootfs": {"tarball": str(r.tarball), "key": r.key,
                                                          "cached": r.cached, "seconds": round(r.seconds, 2)},
                   "kver": board.kver, "kernel": str(b.kernel), "initrd": str(b.initrd),
                   "initrd_size": b.initrd_size, "boot_key": b.key, "boot_cached": b.cached,
                   "boot_seconds": round(b.seconds, 2)}, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    state = lambda cached, secs: "cached" if cached else f"built in {secs:.0f} s"  # noqa: E731
    print(f"rootfs  {r.tarball} ({r.info.get('tarball_bytes', 0) / 1e6:.0f} MB, "
          f"{state(r.cached, r.seconds)})")
    print(f"kernel  {b.kernel} ({board.kver})")
    print(f"initrd  {b.initrd} ({b.initrd_size / 1e6:.1f} MB, {state(b.cached, b.seconds)})")
    return 0


def _cmd_boot_baseline(args: argparse.Namespace) -> int:
    from .board import baseline_cmdline, boot_baseline, prepare

    if args.times < 1:
        raise BootimgError("--times must be at least 1")
    board = prepare(_spec(args), cache=args.cache)
    append = args.cmdline if args.cmdline is not None else baseline_cmdline(args.append or "",
                                                                            console=board.rootfs.target.console)

    def report(i: int, result) -> None:
        if not args.json:
            print(f"boot {i}/{args.times}: {result.summary()}", flush=True)

    run = boot_baseline(board, times=args.times, timeout=args.timeout, append=append,
                        work_dir=args.work_dir, serial_logs=args.serial_logs, keep=args.keep,
                        on_result=report)
    ready = sum(r.ok for r in run.results)
    if args.json:
        json.dump({"kver": board.kver, "cmdline": append, "ready": ready, "boots": [
            {"exit_reason": r.exit_reason, "stage": r.stage, "marker": r.marker,
             "host_seconds_to_marker": round(r.duration, 3) if r.ok else None,
             "wall_seconds": round(r.wall, 3), "startup": r.startup,
             "serial_log": str(r.serial_log) if r.serial_log else None} for r in run.results],
            "median": {k: run.median(k) for k in ("kernel", "initrd", "userspace", "total", "host")}},
            sys.stdout, indent=2, sort_keys=True)
        print()
    elif ready:
        med = {k: run.median(k) for k in ("total", "kernel", "initrd", "userspace", "host")}
        parts = ", ".join(f"{k} {v:.3f}s" for k, v in med.items() if v is not None and k != "host")
        print(f"baseline: {ready}/{args.times} ready on {board.kver}; medians: {parts}; "
              f"host time to marker {med['host']:.1f}s")
    if ready != args.times:
        failed = next(r for r in run.results if not r.ok)
        print(f"bootimg board boot-baseline: {args.times - ready} of {args.times} boot(s) failed: "
              f"{failed.summary()}", file=sys.stderr)
        return 1
    return 0


def _cmd_rootfs(args: argparse.Namespace) -> int:
    from .board import prepare
    from .system import ensure_tree

    board = prepare(_spec(args), cache=args.cache, initramfs=False)
    tree = ensure_tree(board, Path(args.build_dir).absolute())
    print(f"{tree}: the board's Debian root ({board.kver}); {tree.parent / 'authorized_keys'}: the vm ssh key")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    board = sub.add_parser("board", help="the QEMU test rig: its Debian root, the plain baseline",
                           description="A QEMU (TCG) board with a Debian bookworm root, a 6.12 "
                                       "kernel and a dracut initramfs, cached in "
                                       "$BOOTIMG_CACHE/board (default /var/cache/bootimg/board).")
    bsub = board.add_subparsers(dest="board_cmd", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache", metavar="DIR", help="cache directory (default $BOOTIMG_CACHE/board "
                                                      "or /var/cache/bootimg/board)")
        p.add_argument("--mirror", metavar="URL", help="Debian mirror (default http://deb.debian.org/debian)")
        p.add_argument("--arch", default="amd64", metavar="ARCH",
                       help="the root's architecture: amd64 (default) or arm64 (through qemu-user on an x86_64 host)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = bsub.add_parser("prepare", help="build (or reuse) the root filesystem, kernel and initramfs",
                        description="Build the cached Debian root tarball (debootstrap), then the "
                                    "kernel + dracut initramfs; reuse both when cached.")
    common(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild even when cached")
    p.set_defaults(func=_cmd_prepare)

    p = bsub.add_parser("boot-baseline", help="boot the plain ext4 root and report the boot time",
                        description="Make an ext4 disk of the root tree itself and boot it under "
                                    "QEMU; print the readiness marker and boot time of each boot.")
    common(p)
    p.add_argument("--times", type=int, default=1, metavar="N", help="number of boots (default 1)")
    p.add_argument("--timeout", type=float, default=180.0, metavar="S",
                   help="watchdog per boot, seconds (default 180)")
    p.add_argument("--append", metavar="ARGS", help="extra kernel command line arguments")
    p.add_argument("--cmdline", metavar="CMDLINE", help="the whole kernel command line (replaces the default)")
    p.add_argument("--serial-logs", metavar="DIR", help="write each boot's console to DIR/boot-N.log")
    p.add_argument("--work-dir", metavar="DIR", help="where the disk image is made (default: the cache)")
    p.add_argument("--keep", action="store_true", help="keep the extracted tree and disk image")
    p.set_defaults(func=_cmd_boot_baseline)

    p = bsub.add_parser("rootfs", help="extract the board's root where manifests/board.yaml reads it",
                        description="Extract the cached Debian root to BUILD/board/rootfs and write the vm ssh "
                                    "client's public key to BUILD/board/authorized_keys: the inputs of "
                                    "manifests/board.yaml (with --arch arm64: BUILD/board-arm64/, the inputs of "
                                    "manifests/board-arm64.yaml). Then: bootimg build, bootimg disk, bootimg qemu.")
    common(p)
    p.add_argument("--build-dir", default="build", metavar="DIR", help="default build")
    p.set_defaults(func=_cmd_rootfs)
