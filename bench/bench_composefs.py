#!/usr/bin/env python3
"""Benchmark the composefs core on a real tree (default /usr), warm page cache.

Prints files/s, MB/s, wall time and peak RSS for:
  image      `bootimg mkcomposefs SRC OUT`               (scan + digests + image; median of
             --runs, then the fastest; "disk MB" > 0 means the page cache was not all warm)
  digests    `bootimg mkcomposefs --print-digest-only`   (same work, no file written)
  write      the image writer alone, from an already parsed dump of the same tree
  store      `bootimg mkcomposefs --digest-store=EMPTY`  (a fresh store filled)
  store-hit  the same again, every object already present
Each command runs in a child process; its peak RSS comes from wait4's rusage.
Reference (composefs-format.md section 9, same machine kind, /usr with 118k files, 5.7 GB):
mkcomposefs 1.0.8 image 3.5 s at 169 MB peak RSS; digest-store fill 15.9 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run  # noqa: E402

REF_IMAGE_S = 3.53
REF_RSS_MB = 169
REF_STORE_S = 15.91


def tree_size(src: str) -> tuple[int, int]:
    files = nbytes = 0
    for dirpath, _dirnames, filenames in os.walk(src):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files += 1
                nbytes += st.st_size
    return files, nbytes


def bench_writer_only(image: str) -> tuple[float, float]:
    code = f"""
import resource, sys, time
from bootimg.composefs.reader import load_image
from bootimg.composefs.writer import write_image, ImageOptions
img = load_image({image!r})
t = time.perf_counter()
data = write_image(img.root, ImageOptions(img.version, img.version))
print(time.perf_counter() - t)
assert data == open({image!r}, 'rb').read()
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.split()[0]), 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default="/usr")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-store", action="store_true", help="skip the (slow) store fill")
    ap.add_argument("--runs", type=int, default=5, help="timed image builds (median and min shown)")
    args = ap.parse_args()

    bootimg = [sys.executable, "-m", "bootimg", "mkcomposefs", "-q"]
    if args.threads:
        bootimg.append(f"--threads={args.threads}")
    files, nbytes = tree_size(args.source)
    print(f"tree: {args.source}: {files} regular files, {nbytes / 1e9:.2f} GB")
    work = tempfile.mkdtemp(prefix="bench-cfs-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    try:
        image = os.path.join(work, "out.cfs")
        run(bootimg + [args.source, image])                     # warm the page cache
        rows = []
        images = [run(bootimg + [args.source, image]) for _ in range(args.runs)]
        print("image runs (wall s / disk MB read): "
              + ", ".join(f"{m.wall:.2f}/{m.disk_mb:.0f}" for m in images))
        rows.append(("image", statistics.median(m.wall for m in images), max(m.rss for m in images),
                     sum(m.disk_mb for m in images) / len(images), REF_IMAGE_S))
        rows.append(("image-min", min(m.wall for m in images), 0.0, 0.0, REF_IMAGE_S))
        m = run(bootimg + ["--print-digest-only", args.source])
        rows.append(("digests", m.wall, m.rss, m.disk_mb, None))
        wall, _ = bench_writer_only(image)
        rows.append(("write", wall, 0.0, 0.0, None))
        if not args.skip_store:
            store = os.path.join(work, "store")
            m = run(bootimg + [f"--digest-store={store}", args.source, image])
            rows.append(("store", m.wall, m.rss, m.disk_mb, REF_STORE_S))
            m = run(bootimg + [f"--digest-store={store}", args.source, image])
            rows.append(("store-hit", m.wall, m.rss, m.disk_mb, None))
        print(f"image size: {os.path.getsize(image)} bytes")
        print(f"{'run':<10} {'wall s':>8} {'files/s':>9} {'MB/s':>8} {'peak MB':>8} {'disk MB':>8} {'vs ref':>8}")
        for name, wall, rss, disk, ref in rows:
            ratio = f"{wall / ref:.2f}x" if ref else "-"
            rss_s = f"{rss:.0f}" if rss else "-"
            print(f"{name:<10} {wall:8.2f} {files / wall:9.0f} {nbytes / wall / 1e6:8.0f} {rss_s:>8} {disk:8.0f} {ratio:>8}")
        print(f"reference mkcomposefs 1.0.8: image {REF_IMAGE_S} s at {REF_RSS_MB} MB; store fill {REF_STORE_S} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
