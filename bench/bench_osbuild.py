#!/usr/bin/env python3
"""Benchmark the osbuild stage against `bootimg build` on the same inputs.

Runs osbuild/example-manifest.json's inputs (tools/osbuild_example.py) through
- `bootimg build` from the project's .venv and from the build root's python3 (the host's
  /usr/bin/python3 with Debian's libraries: what the stage runs with),
- upstream osbuild (../shared/osbuild), exporting the release: with an empty store (every
  pipeline runs: the root's untar, the container archive's copy, the release) and with the
  root and container pipelines cached (osbuild's overhead plus the stage),
- upstream osbuild exporting the disk as well (the disk-tree stage and the upstream disk stages).
With --root-tar FILE the root is that tarball instead of the example's few files (e.g. the QEMU
board's Debian root, /var/cache/bootimg/board/rootfs-*.tar.zst), given to osbuild through
org.osbuild.curl with a file:// URL. Needs root (osbuild); tools/install-buildroot.sh first.
"""

from __future__ import annotations

import argparse
import copy
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

SYSTEM_PYTHON = "/usr/bin/python3"


def median(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}, {len(times)} runs)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--root-tar", metavar="FILE", help="the root filesystem as this tarball (plain, gzip or zstd)")
    args = ap.parse_args()
    import osbuild_example
    import osbuild_libdir

    work = Path(tempfile.mkdtemp(prefix="bench-osbuild-", dir=os.environ.get("BENCH_TMP", "/var/tmp")))
    try:
        yaml_path = osbuild_example.write_inputs(work / "inputs")
        manifest = json.loads((REPO / "osbuild" / "example-manifest.json").read_text())
        if args.root_tar:
            root = Path(args.root_tar).absolute()
            yaml_path.write_text(yaml_path.read_text().replace("path: root.tar", f"path: {root}"))
            with open(root, "rb") as f:
                import hashlib

                checksum = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            manifest["sources"]["org.osbuild.curl"] = {"items": {checksum: {"url": f"file://{root}"}}}
            untar = manifest["pipelines"][0]["stages"][0]
            untar["inputs"]["file"]["references"] = {checksum: {}}
        path = work / "manifest.json"
        path.write_text(json.dumps(manifest))
        libdir = osbuild_libdir.make_libdir(work / "lib")
        key = str(work / "inputs" / "release-2026.key")
        build = ["-m", "bootimg", "build", str(yaml_path), "--force", "--key", key, "-o", str(work / "host")]
        if "--no-boot-check" in os.popen(f"{sys.executable} -m bootimg build --help").read():
            build.append("--no-boot-check")

        venv = [run([sys.executable, *build]).wall for _ in range(args.runs)]
        print(f"root: {args.root_tar or 'the example root (root.tar, a few files)'}", flush=True)
        print(f"bootimg build (.venv python):              {median(venv)}", flush=True)
        system = [run([SYSTEM_PYTHON, "-I", *build], cwd="/").wall for _ in range(args.runs)]
        print(f"bootimg build (build root's {SYSTEM_PYTHON}): {median(system)}", flush=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(libdir)}

        def osbuild(store: Path, *exports: str) -> float:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            argv = [SYSTEM_PYTHON, "-m", "osbuild", "--libdir", str(libdir), "--store", str(store), "--quiet",
                    "--checkpoint", "os", "--checkpoint", "telemetry-image",
                    *[a for e in exports for a in ("--export", e)], "--output-directory", str(out), str(path)]
            return run(argv, env=env, cwd=str(work)).wall

        fresh = []
        for i in range(args.runs):
            fresh.append(osbuild(work / f"store-{i}", "release"))
            shutil.rmtree(work / f"store-{i}")
        print(f"osbuild --export release, empty store:     {median(fresh)}", flush=True)
        if not args.root_tar:     # a real root's tar has what org.osbuild.untar drops (README, "In osbuild")
            same = all((work / "out/release/composefs" / p.relative_to(work / "host")).read_bytes() == p.read_bytes()
                       for p in (work / "host").rglob("*") if p.is_file())
            print(f"  its release byte-identical to bootimg build's: {same}", flush=True)
        cached_store = work / "store"
        osbuild(cached_store, "release")
        cached = []
        for i in range(args.runs):
            # Another output path makes the release pipeline new; the root and container ones stay cached.
            variant = copy.deepcopy(manifest)
            variant["pipelines"][2]["stages"][0]["options"]["output"]["repository"] = f"/composefs-{i}"
            path.write_text(json.dumps(variant))
            cached.append(osbuild(cached_store, "release"))
        print(f"osbuild --export release, root cached:     {median(cached)}", flush=True)
        if not args.root_tar:     # the example's partitions are sized for the example's release
            path.write_text(json.dumps(manifest))
            print(f"osbuild --export release --export image:   {osbuild(cached_store, 'release', 'image'):.2f} s "
                  "(root cached)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
