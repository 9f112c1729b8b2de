#!/usr/bin/env python3
"""Benchmark `bootimg build` on the example manifest (manifests/ivi-demo.yaml).

Makes the example inputs (tools/example_inputs.py) in a temp dir, then times N builds and
one `bootimg verify`, and prints the sharing figures of the release. With --rootfs DIR the
root filesystem is replaced by DIR (e.g. /usr) for a larger, more realistic root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "bench"))

from _common import run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rootfs", help="use this directory as the root filesystem")
    args = ap.parse_args()
    import example_inputs

    work = Path(tempfile.mkdtemp(prefix="bench-build-", dir=os.environ.get("BENCH_TMP", "/var/tmp")))
    try:
        shutil.copytree(REPO / "manifests", work / "manifests")
        example_inputs.main(work / "build")
        manifest = work / "manifests" / "ivi-demo.yaml"
        if args.rootfs:
            text = manifest.read_text().replace("path: ../build/ivi-rootfs", f"path: {args.rootfs}")
            manifest.write_text(text)
        cmd = [sys.executable, "-m", "bootimg", "build", str(manifest), "--force", "--no-boot-check",
               "--key", str(work / "build" / "keys" / "release-2026.key"), "-o", str(work / "out")]
        times = []
        rss = 0.0
        for _ in range(args.runs):
            wall, peak, _ = run(cmd)
            times.append(wall)
            rss = max(rss, peak)
        vwall = run([sys.executable, "-m", "bootimg", "verify", str(work / "out"),
                     "--key", str(work / "build" / "keys" / "release-2026.pub")]).wall
        share = json.loads((work / "out" / "sharing.json").read_text())
        release = json.loads((work / "out" / "release.json").read_text())
        print(f"manifest: ivi-demo.yaml, root: {args.rootfs or 'build/ivi-rootfs'}, "
              f"{len(release['images'])} images")
        print(f"build: median {statistics.median(times):.2f} s over {args.runs} runs "
              f"(min {min(times):.2f}, max {max(times):.2f}), peak RSS {rss:.0f} MB")
        print(f"verify: {vwall:.2f} s")
        print(f"objects: {share['objects']} unique, {share['object_bytes']} bytes stored; "
              f"{share['referenced_bytes']} bytes referenced by the images")
        print(f"shared between images: {share['shared_objects']} objects, {share['shared_bytes']} bytes; "
              f"saved {share['bytes_saved']} bytes; sharing ratio {share['sharing_ratio']}")
        for name, img in sorted(share["images"].items()):
            print(f"  {name:<12} image {img['image_bytes']:>9} B, {img['objects']:>6} objects "
                  f"{img['object_bytes']:>11} B, shared {img['shared_objects']} ({img['shared_bytes']} B)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
