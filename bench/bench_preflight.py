#!/usr/bin/env python3
"""Benchmark the build's boot check (bootimg.boot.preflight) against loading the root it checks.

The check runs on the tree the build has already loaded, so what it adds to `bootimg build` is
its own time, not a second load. Loads ROOT (a directory or a tar; default: the QEMU board's
Debian root from the board cache, else /usr) into a scratch object store once, then times
``check_root`` on it (median of --runs) and prints both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bootimg.boot import preflight
from bootimg.composefs.store import ObjectStore
from bootimg.manifest.model import Source
from bootimg.release.layout import ReleaseDir
from bootimg.sources import SourcePolicy, load_source


def default_root() -> Path:
    cache = Path(os.environ.get("BOOTIMG_CACHE") or "/var/cache/bootimg") / "board"
    tars = sorted(cache.glob("rootfs-*.tar.zst"), key=lambda p: p.stat().st_mtime) if cache.is_dir() else []
    return tars[-1] if tars else Path("/usr")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="root directory or tar (default: the board root, else /usr)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    root_path = args.root or default_root()
    source = Source("directory" if root_path.is_dir() else "tar", root_path.absolute())
    with tempfile.TemporaryDirectory(prefix="bench-preflight-", dir=os.environ.get("BENCH_TMP", "/var/tmp")) as tmp:
        release = ReleaseDir(tmp)
        store = ObjectStore(release.objects, fsync=False, on_notice=lambda _m: None)
        t0 = time.perf_counter()
        loaded = load_source(source, store, policy=SourcePolicy(allow_devices=True))
        load = time.perf_counter() - t0
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            result = preflight.check_root(loaded.root, release, "signed")
            times.append(time.perf_counter() - t0)
    print(f"root: {root_path} ({loaded.stats.entries} entries, {loaded.stats.bytes / 1e6:.0f} MB)")
    print(f"load into the store: {load:.2f} s (what the build does once)")
    print(f"boot check: median {statistics.median(times) * 1000:.1f} ms over {args.runs} runs "
          f"(min {min(times) * 1000:.1f}); {statistics.median(times) / load * 100:.2f}% of the load")
    print(f"result: {'can boot: ' + result.summary() if not result.problems else f'{len(result.problems)} problems'}")
    for p in result.problems:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
