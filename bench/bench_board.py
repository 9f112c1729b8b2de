#!/usr/bin/env python3
"""Benchmark the verified boot on the QEMU board (issue 4's figures).

Prints:
- the bytes the bootimg dracut module adds to the initramfs (files only in the system's initramfs,
  uncompressed, and the compressed size difference against the board's plain initramfs);
- boot time to the default target, composefs + verity root against the same root on plain ext4,
  the median of --boots boots each, as a ratio (the guest's own "Startup finished" total, and the
  host's time to the marker). Both boots mask the boot-time containers, so they run the same units;
- time from switch-root (the real root's systemd starting, UserspaceTimestampMonotonic) to each
  boot-time container becoming active, on the full system;
- with --provision: a provisioning boot of a fresh data disk (fs-verity enabled on every image and
  object of the release by bootimg-setup-root in the initramfs), with the program's own timing line
  and the boot's initrd time.

QEMU runs under TCG here (no KVM): only ratios measured in one run mean anything.
Usage: .venv/bin/python bench/bench_board.py [--boots 3] [--build-dir build] [--provision]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))


def cpio_files(initrd: Path) -> dict[str, int]:
    """{path: size} of the regular files in a (gzip or zstd) newc cpio initramfs."""
    raw = initrd.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        data = gzip.decompress(raw)
    elif raw[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        data = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    else:
        data = raw
    files: dict[str, int] = {}
    off = 0
    while off + 110 <= len(data):
        if data[off:off + 6] not in (b"070701", b"070702"):
            off += 1            # padding between concatenated archives
            continue
        field = lambda i: int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16)  # noqa: E731
        mode, filesize, namesize = field(1), field(6), field(11)
        name = data[off + 110: off + 110 + namesize - 1].decode(errors="replace")
        off = (off + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            continue
        if mode & 0o170000 == 0o100000:
            files[name] = filesize
        off = (off + filesize + 3) & ~3
    return files


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=3, help="boots per variant (default 3)")
    ap.add_argument("--build-dir", default=str(REPO / "build"), help="build directory (default build/)")
    ap.add_argument("--provision", action="store_true", help="also time a provisioning boot of a fresh data disk")
    ap.add_argument("--provision-only", action="store_true", help="only the provisioning boot (and the initramfs size)")
    args = ap.parse_args()

    import example_inputs

    from bootimg.board import boot
    from bootimg.board.session import running
    from bootimg.board.system import baseline_disk, container_masks, make_data_disk, prepare_system, provision

    build = Path(args.build_dir)
    example_inputs.main(build)
    t0 = time.monotonic()
    system = prepare_system(REPO / "manifests" / "board.yaml", build_dir=build,
                            key=build / "keys" / "release-2026.key")
    print(f"system prepared in {time.monotonic() - t0:.0f} s: {system.timings}")

    base_files, sys_files = cpio_files(system.board.initrd), cpio_files(system.initrd)
    added = {p: s for p, s in sys_files.items() if p not in base_files}
    grown = {p: sys_files[p] - base_files[p] for p in sys_files if p in base_files and sys_files[p] != base_files[p]}
    print("initramfs: the bootimg module adds")
    for p, s in sorted(added.items(), key=lambda kv: -kv[1]):
        print(f"  + {s:>9,} B  /{p}")
    for p, s in sorted(grown.items()):
        print(f"  ~ {s:>+9,} B  /{p} (changed)")
    total_added = sum(added.values()) + sum(grown.values())
    delta = system.initrd.stat().st_size - system.board.initrd.stat().st_size
    print(f"  total {total_added:,} B ({total_added / 1024:.1f} KiB) uncompressed in {len(added)} new files; "
          f"compressed initramfs {system.board.initrd.stat().st_size:,} -> {system.initrd.stat().st_size:,} B "
          f"({delta:+,} B, {delta / 1024:+.1f} KiB)")

    if args.provision or args.provision_only:
        with tempfile.TemporaryDirectory(prefix="bench-provision-", dir=build) as tmp:
            fresh = dataclasses.replace(system, disk=Path(tmp) / "fresh.img")
            make_data_disk(system.release_dir, system.tree, fresh.disk, seed="bench-provision")
            t0 = time.monotonic()
            r = provision(fresh, timeout=1200)
            files = sum(1 for sub in ("images", "objects") for p in (system.release_dir / sub).rglob("*") if p.is_file())
            lines = [ln.strip() for ln in r.console.splitlines() if "bootimg-provision:" in ln]
            print(f"provisioning boot ({files:,} files in the release): {r.summary()}; host {time.monotonic() - t0:.0f} s")
            for ln in lines:
                print(f"  {ln}")
        if args.provision_only:
            return 0

    masks = " ".join(container_masks(system))
    with tempfile.TemporaryDirectory(prefix="bench-board-", dir=build) as tmp:
        base = baseline_disk(system, Path(tmp) / "baseline.img", Path(tmp) / "tree")
        runs: dict[str, list] = {"composefs": [], "ext4": []}
        for i in range(args.boots):          # interleaved, so drifting host load hits both alike
            for kind in ("composefs", "ext4"):
                if kind == "composefs":
                    r = boot(system.kernel, system.initrd, system.disk, system.cmdline(masks), timeout=600)
                else:
                    r = boot(system.kernel, system.board.initrd, base.path, system.baseline_cmdline(), timeout=600)
                if not r.ok:
                    sys.exit(f"{kind} boot {i + 1} failed: {r.summary()}")
                runs[kind].append(r)
                print(f"  {kind:<9} boot {i + 1}: {r.marker}", flush=True)
    print(f"boot to the default target, median of {args.boots} (containers masked in both):")
    med = {}
    for kind, results in runs.items():
        med[kind] = {k: median([r.startup.get(k) for r in results]) for k in ("kernel", "initrd", "userspace", "total")}
        med[kind]["host"] = median([r.duration for r in results])
        print(f"  {kind:<9} total {med[kind]['total']:.3f} s (kernel {med[kind]['kernel']:.3f} + initrd "
              f"{med[kind]['initrd']:.3f} + userspace {med[kind]['userspace']:.3f}); host to marker {med[kind]['host']:.1f} s")
    print(f"  ratio composefs/ext4: guest total {med['composefs']['total'] / med['ext4']['total']:.3f}, "
          f"initrd {med['composefs']['initrd'] / med['ext4']['initrd']:.3f}, "
          f"host {med['composefs']['host'] / med['ext4']['host']:.3f}")

    names = sorted(n for n, e in system.release["images"].items() if e["role"] == "container")
    firsts = []
    for i in range(args.boots):
        with running(system.kernel, system.initrd, system.disk, system.cmdline(poweroff=False), timeout=600) as vm:
            if not vm.result.ok:
                sys.exit(f"system boot failed: {vm.result.summary()}")
            user = int(vm.manager_property("UserspaceTimestampMonotonic"))
            units = vm.unit_properties([f"{n}.service" for n in names], "ActiveEnterTimestampMonotonic")
        since = {u: (int(p["ActiveEnterTimestampMonotonic"]) - user) / 1000 for u, p in units.items()}
        firsts.append(min(since.values()))
        print(f"  full system boot {i + 1}: ms from switch-root to active: "
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(since.items(), key=lambda kv: kv[1])))
    print(f"switch-root -> first boot-time container active: median {median(firsts):.0f} ms "
          f"(min {min(firsts):.0f}, max {max(firsts):.0f}) over {len(firsts)} boots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
