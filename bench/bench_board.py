#!/usr/bin/env python3
"""Benchmark the verified boot on the QEMU board: every figure of issue 14's table in one run.

Prints, side by side at the end:
- initrd phase, composefs + verity root / the same root on plain ext4 (systemd's own "Startup
  finished" initrd part, median of --boots boots each);
- boot to the default target, composefs + verity root / the integrity floor: the same root on
  ext4 with fs-verity enabled on every file (every read verified; ``integrity_floor_disk``), so
  that fs-verity's hashing and composefs' own cost are told apart; and each against plain ext4;
- the bytes the bootimg dracut module adds to the initramfs: the files only in the release's
  initramfs (against the board's plain one), compressed with the release initramfs' compressor;
- the whole initramfs of the board, compressed (and what the kernel unpacks);
- first boot of a fresh disk: the time bootimg-setup-root takes to enable fs-verity on every
  image and object (its own "bootimg-provision:" line), against the 141 s of the shell hook.

All boots of the comparison mask the boot-time containers, so they run the same units; they are
interleaved, so drifting host load hits every variant alike. With --full-system, also the full
system booted the way `bootimg disk` makes it boot (UEFI firmware -> systemd-boot -> kernel)
against QEMU loading the same kernel and initramfs directly, and switch-root -> container times.

QEMU runs under TCG here (no KVM): only ratios measured in one run mean anything.
Usage: .venv/bin/python bench/bench_board.py [--boots 3] [--build-dir build] [--full-system]
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import gzip
import lzma
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

DRIVER_INDEXES = ("usr/lib/modules/", "lib/modules/")
# What 90bootimg's module-setup.sh installs (bootimg.boot.dracut).
MODULE_FILES = ("usr/libexec/bootimg/", "etc/bootimg/", "usr/lib/systemd/system/bootimg-")
HOOK_PROVISIONING_S = 141.0        # issue 14: the shell hook's first boot, one `fsverity enable` per file
PROVISION_LINE = re.compile(r"bootimg-provision: fs-verity enabled on (\d+) files; all (\d+) files of \S+ have it "
                            r"\(([\d.]+) s, (\d+) threads\)")


def compress_like(kind: str | None, data: bytes) -> bytes:
    """``data`` compressed as the initramfs' own archive is (its compressor, dracut's settings)."""
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=8)
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=15).compress(data)
    if kind == "bzip2":
        return bz2.compress(data)
    return gzip.compress(data, 9, mtime=0) if kind else data


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def initramfs_figures(system) -> dict[str, str]:
    """What the bootimg dracut module adds to the release's initramfs, and the whole initramfs.

    The module's bytes are the files 90bootimg installs (MODULE_FILES; /usr/lib/initrd-release
    when dracut's base module, which writes one otherwise, is not in the initramfs), compressed
    together with the initramfs' own compressor. Files the profile's choice of dracut modules
    brings (a /bin/sh, dracut's own lists) are not the module's. The drivers bootimg adds to a
    profile's (EROFS, overlayfs, loop, TPM) are counted apart: a generic initramfs has them anyway."""
    from bootimg.boot.initramfs import KERNEL_MODULES, OPTIONAL_KERNEL_MODULES
    from bootimg.disk.cpio import read_initramfs

    base, ours = read_initramfs(system.board.initrd), read_initramfs(system.initrd, contents=True)
    files = ours.contents()
    dracut_modules = files.get("usr/lib/dracut/modules.txt", b"").decode().split()
    mine = {p: d for p, d in files.items() if p.startswith(MODULE_FILES)
            or (p == "usr/lib/initrd-release" and "base" not in dracut_modules)}
    drivers = {p: d for p, d in files.items() if p.startswith(DRIVER_INDEXES)
               and re.sub(r"\.ko(\.\w+)?$", "", p.rsplit("/", 1)[-1]).replace("-", "_")
               in (*KERNEL_MODULES, *OPTIONAL_KERNEL_MODULES)}
    print("initramfs: the bootimg module's files")
    for p, d in sorted(mine.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(d):>9,} B  /{p}")
    raw = b"".join(d for _, d in sorted(mine.items()))
    packed = len(compress_like(ours.compression, raw))
    print(f"  {len(raw):,} B in {len(mine)} files; {packed:,} B ({packed / 1024:.1f} KiB) compressed with "
          f"{ours.compression}; bootimg's drivers: " + ", ".join(f"/{p} {len(d):,} B" for p, d in sorted(drivers.items())))
    print(f"whole initramfs: {ours.size:,} B compressed ({ours.compression}), {ours.uncompressed_size or 0:,} B unpacked, "
          f"{len(files)} files, dracut modules {' '.join(dracut_modules)}; profile "
          f"{system.release.get('boot', {}).get('initramfs')}; the board's generic one: {base.size:,} B "
          f"({base.compression}), {base.uncompressed_size or 0:,} B unpacked, {len(base.files())} files", flush=True)
    dsize = sum(len(d) for d in drivers.values())
    return {"bytes our module adds (compressed)": f"{packed / 1024:.1f} KiB ({len(raw) / 1024:.1f} KiB unpacked; "
                                                  f"+ {dsize / 1024:.1f} KiB of drivers a generic initramfs has too)",
            "whole initramfs, compressed": f"{ours.size / 1e6:.2f} MB ({ours.compression}; {(ours.uncompressed_size or 0) / 1e6:.1f} "
                                           f"MB unpacked; dracut's generic one {base.size / 1e6:.1f} MB)"}


def lean_baseline_initrd(system) -> Path | None:
    """An initramfs of the plain board root made with the release's initramfs profile (and
    dracut's base module, which writes the initrd-release bootimg's module writes otherwise), so
    that the ext4 roots' initrd phase differs from composefs' by bootimg alone. None without a
    profile (the board's generic initramfs is then the same kind as the release's)."""
    from bootimg.board.initramfs import build_initramfs
    from bootimg.boot.initramfs import dracut_options
    from bootimg.disk.initramfs import release_profile

    profile = release_profile(system.release, "release.json")
    if profile is None:
        return None
    # The profile's options (its --drivers carry bootimg's drivers too), but the plain root has no
    # bootimg module to list.
    options = dracut_options(dataclasses.replace(profile, modules=None))
    if profile.modules is not None:
        options += ["--modules", " ".join(dict.fromkeys((*profile.modules, "systemd", "base")))]
    boot = build_initramfs(system.board.rootfs, cache=system.board.cache, add_drivers=(), dracut_args=options)
    return boot.initrd


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a and b else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=3, help="boots per variant (default 3)")
    ap.add_argument("--build-dir", default=str(REPO / "build"), help="build directory (default build/)")
    ap.add_argument("--full-system", action="store_true", help="also UEFI vs direct boots of the full system")
    ap.add_argument("--initramfs-only", action="store_true", help="only the initramfs figures (no boots)")
    ap.add_argument("--generic-baseline", action="store_true",
                    help="boot the ext4 roots with the board's generic initramfs, not one of the release's profile")
    args = ap.parse_args()

    import example_inputs

    from bootimg.board import BOARD_MARKER
    from bootimg.board.system import (
        baseline_disk,
        baseline_machine,
        container_masks,
        integrity_floor_disk,
        prepare_system,
        provision,
    )
    from bootimg.disk.image import DiskOptions, make_disk
    from bootimg.host import HostError
    from bootimg.vm.qemu import boot

    build = Path(args.build_dir)
    example_inputs.main(build)
    t0 = time.monotonic()
    system = prepare_system(REPO / "manifests" / "board.yaml", build_dir=build,
                            key=build / "keys" / "release-2026.key")
    print(f"system prepared in {time.monotonic() - t0:.0f} s: {system.timings}", flush=True)
    table: dict[str, str] = {}
    if args.initramfs_only:
        table.update(initramfs_figures(system))
        print_table(table, "the initramfs")
        return 0

    # -- the initramfs --------------------------------------------------------------------------
    table.update(initramfs_figures(system))
    masks = " ".join(container_masks(system))
    with tempfile.TemporaryDirectory(prefix="bench-board-", dir=build) as tmp:
        # -- first boot: provisioning a fresh disk -----------------------------------------------
        fresh = Path(tmp) / "fresh.img"
        make_disk(system.release_dir, fresh, DiskOptions(boot=system.boot_files, force=True))
        t0 = time.monotonic()
        try:
            first = provision(dataclasses.replace(system, disk=fresh), serial_log=Path(tmp) / "provision.log")
        except HostError as err:
            print(f"first boot failed: {err}", flush=True)
            first = None
        m = PROVISION_LINE.search(first.console) if first else None
        fresh.unlink()
        if m:
            secs = float(m.group(3))
            print(f"first boot: fs-verity enabled on {m.group(1)} of {m.group(2)} files in {secs:.2f} s "
                  f"({m.group(4)} threads); initrd phase {first.startup.get('initrd', 0):.1f} s; host "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
            table["first boot: enabling fs-verity"] = (f"{secs:.2f} s for {m.group(2)} files = "
                                                      f"{100 * secs / HOOK_PROVISIONING_S:.1f}% of {HOOK_PROVISIONING_S:.0f} s")
        else:
            print("first boot: no bootimg-provision line on the console", flush=True)
            table["first boot: enabling fs-verity"] = "not measured (no bootimg-provision line)"

        # -- the comparison boots ----------------------------------------------------------------
        plain = baseline_disk(system, Path(tmp) / "plain.img", Path(tmp) / "tree")
        floor, enabled = integrity_floor_disk(system, Path(tmp) / "floor.img", Path(tmp) / "tree")
        print(f"integrity floor: fs-verity enabled on {enabled} files of the plain ext4 root", flush=True)
        base_initrd = None if args.generic_baseline else lean_baseline_initrd(system)
        print(f"ext4 roots boot with {base_initrd or system.board.initrd}", flush=True)
        machines = {"composefs": lambda: system.direct(masks),
                    "ext4": lambda: baseline_machine(system, plain.path, initrd=base_initrd),
                    "floor": lambda: baseline_machine(system, floor.path, initrd=base_initrd)}
        runs: dict[str, list] = {k: [] for k in machines}
        for i in range(args.boots):
            for kind, machine in machines.items():
                r = boot(machine(), marker=BOARD_MARKER, timeout=600)
                if r.ok:
                    runs[kind].append(r)
                print(f"  {kind:<9} boot {i + 1}: {r.marker if r.ok else 'FAILED ' + r.summary()}", flush=True)
    med: dict[str, dict] = {}
    print(f"boot to the default target, median of {args.boots} (containers masked in all):")
    for kind, results in runs.items():
        med[kind] = {k: median([r.startup.get(k) for r in results]) for k in ("kernel", "initrd", "userspace", "total")}
        med[kind]["host"] = median([r.duration for r in results])
        if not results:
            print(f"  {kind:<9} no boot reached the marker")
            continue
        print(f"  {kind:<9} total {med[kind]['total']:.3f} s (kernel {med[kind]['kernel']:.3f} + initrd "
              f"{med[kind]['initrd']:.3f} + userspace {med[kind]['userspace']:.3f}); host to marker "
              f"{med[kind]['host']:.1f} s ({len(results)} boots)")
    c, e, f = med["composefs"], med["ext4"], med["floor"]
    table["initrd phase, composefs+verity / plain ext4"] = (f"{ratio(c['initrd'], e['initrd'])} "
                                                            f"({c['initrd'] or 0:.2f} s / {e['initrd'] or 0:.2f} s)")
    table["boot to default target, composefs+verity / floor"] = (f"{ratio(c['total'], f['total'])} "
                                                                 f"(userspace {ratio(c['userspace'], f['userspace'])})")
    table["boot to default target, composefs+verity / plain ext4"] = (f"{ratio(c['total'], e['total'])} "
                                                                      f"(userspace {ratio(c['userspace'], e['userspace'])})")
    table["the floor: ext4 + fs-verity on every file / plain ext4"] = (
        f"{ratio(f['total'], e['total'])} ({f['total'] or 0:.2f} s / {e['total'] or 0:.2f} s; {enabled} files)")

    if args.full_system:
        full_system(system, args.boots)
    print_table(table, f"one run, {args.boots} boots per variant (TCG)")
    return 0


def print_table(table: dict[str, str], what: str) -> None:
    print(f"\nissue 14's figures, {what}:")
    width = max(len(k) for k in table)
    for k, v in table.items():
        print(f"  {k:<{width}}  {v}")


def full_system(system, boots: int) -> None:
    """UEFI + systemd-boot against a direct kernel boot of the full system, and switch-root ->
    boot-time container active."""
    from bootimg.board import BOARD_MARKER
    from bootimg.vm.session import running

    names = sorted(n for n, e in system.release["images"].items() if e["role"] == "container")
    firsts = []
    full: dict[str, list[dict]] = {"uefi": [], "direct": []}
    props = ("FirmwareTimestampMonotonic", "LoaderTimestampMonotonic", "InitRDTimestampMonotonic",
             "UserspaceTimestampMonotonic", "FinishTimestampMonotonic")
    for i in range(boots):                # interleaved again: UEFI + systemd-boot, then direct
        for kind in ("uefi", "direct"):
            machine = system.machine() if kind == "uefi" else system.direct()
            with running(machine, marker=BOARD_MARKER, timeout=600) as vm:
                if not vm.result.ok:
                    sys.exit(f"{kind} system boot failed: {vm.result.summary()}")
                vm.run("systemctl", "is-system-running", "--wait", check=False, timeout=300)
                t = {k: int(vm.manager_property(k) or 0) for k in props}
                units = vm.unit_properties([f"{n}.service" for n in names], "ActiveEnterTimestampMonotonic")
            t["host"] = vm.result.duration
            full[kind].append(t)
            since = {u: (int(p["ActiveEnterTimestampMonotonic"]) - t["UserspaceTimestampMonotonic"]) / 1000
                     for u, p in units.items()}
            if kind == "uefi":
                firsts.append(min(since.values()))
            print(f"  full system, {kind:<6} boot {i + 1}: firmware {t['FirmwareTimestampMonotonic'] / 1e6:.2f} s, "
                  f"loader {t['LoaderTimestampMonotonic'] / 1e6:.2f} s, kernel to finish "
                  f"{t['FinishTimestampMonotonic'] / 1e6:.2f} s; ms from switch-root to active: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(since.items(), key=lambda kv: kv[1])), flush=True)
    print(f"switch-root -> first boot-time container active: median {median(firsts):.0f} ms "
          f"(min {min(firsts):.0f}, max {max(firsts):.0f}) over {len(firsts)} boots")
    # systemd's firmware/loader spans count back from kernel start; the boot's total is their sum
    # plus kernel start -> finished. A direct boot has neither (QEMU starts the kernel itself).
    tot = {k: median([(t["FirmwareTimestampMonotonic"] + t["FinishTimestampMonotonic"]) / 1e6 for t in v])
           for k, v in full.items()}
    host = {k: median([t["host"] for t in v]) for k, v in full.items()}
    fw = median([(t["FirmwareTimestampMonotonic"] - t["LoaderTimestampMonotonic"]) / 1e6 for t in full["uefi"]])
    ld = median([t["LoaderTimestampMonotonic"] / 1e6 for t in full["uefi"]])
    print(f"UEFI + systemd-boot vs direct kernel boot (full system, median of {boots}): firmware {fw:.2f} s, "
          f"loader {ld:.2f} s; power-on to finished {tot['uefi']:.2f} s vs {tot['direct']:.2f} s "
          f"(ratio {tot['uefi'] / tot['direct']:.3f}); host to marker {host['uefi']:.1f} s vs {host['direct']:.1f} s "
          f"(ratio {host['uefi'] / host['direct']:.3f})")
    print(f"disk: {system.disk_result.size / 2**20:.0f} MiB raw, made in {system.timings.get('disk', 0):.1f} s; "
          f"ESP {system.disk_result.partitions['esp']['size'] / 2**20:.0f} MiB "
          f"({system.disk_result.partitions['esp']['payload'] / 1e6:.1f} MB kernel + initramfs); "
          f"initramfs {system.boot_files.initrd_size / 1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
