#!/usr/bin/env python3
"""fs-verity hashing and object-store fill throughput.

Answers: is pure-Python hashing as fast as the C tool, does it scale over threads (hashlib drops
the GIL per 4 KiB block), and what does filling a store cost (copy, fsync). All inputs are read
once first so figures are for a warm page cache. Bounded to a few minutes by --max-bytes/--max-files.

    .venv/bin/python bench/bench_hash.py [--root /usr/lib] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bootimg.composefs import fsverity  # noqa: E402
from bootimg.composefs.store import ObjectStore  # noqa: E402

MiB = 1 << 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Timer:
    """Wall and CPU time of a block; CPU% above 100 means more than one core was busy."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = cpu_seconds() - self.cpu


def row(label: str, t: Timer, nbytes: int, nfiles: int | None = None) -> None:
    files = f"{nfiles / t.wall:9,.0f} files/s  " if nfiles else " " * 20
    print(f"  {label:<46} {t.wall:6.2f} s  {files}{nbytes / MiB / t.wall:6,.0f} MiB/s  "
          f"CPU {100 * t.cpu / t.wall:4.0f}%  peak RSS {peak_rss_mb():4.0f} MB", flush=True)


def warm(paths: list[str]) -> None:
    buf = bytearray(4 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def bench_big(size: int, threads: int) -> None:
    print(f"single large file ({size // MiB} MiB, page-cached)")
    fd, path = tempfile.mkstemp(prefix="bench-hash-", dir="/tmp")
    try:
        chunk = os.urandom(4 * MiB)
        for _ in range(size // len(chunk)):
            os.write(fd, chunk)
        os.close(fd)
        warm([path])
        for i in range(2):
            with Timer() as t:
                d = fsverity.digest_file(path)
            row(f"digest_file, 1 thread (run {i + 1})", t, size)
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool, Timer() as t:
                ds = list(pool.map(fsverity.digest_file, [path] * threads))
            row(f"same file in {threads} threads at once (total)", t, size * threads)
            assert all(x == d for x in ds)
            with Timer() as t:
                ds = fsverity.digest_files([path] * threads, threads, batch=1)
            row(f"same file in {threads} processes at once (total)", t, size * threads)
            assert all(x == d for x in ds)
        if shutil.which("fsverity"):
            with Timer() as t:
                out = subprocess.run(["fsverity", "digest", "--compact", path], check=True,
                                     capture_output=True, text=True).stdout.strip()
            row("`fsverity digest` C tool (reference)", t, size)
            assert out == d.hex(), "digest differs from the C tool"
    finally:
        os.unlink(path)


def collect(root: str, max_files: int, max_bytes: int) -> list[tuple[str, int]]:
    """Regular files > 64 bytes (the ones composefs stores as objects), walk order, bounded."""
    out: list[tuple[str, int]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if st.st_mode & 0o170000 == 0o100000 and st.st_size > 64 and os.access(p, os.R_OK):
                out.append((p, st.st_size))
                total += st.st_size
                if len(out) >= max_files or total >= max_bytes:
                    return out
    return out


def _digest_batch(paths: list[str]) -> list[bytes]:
    return [fsverity.digest_file(p) for p in paths]


def bench_many(files: list[tuple[str, int]], threads: int) -> list[tuple[str, bytes]]:
    paths = [p for p, _ in files]
    nbytes = sum(s for _, s in files)
    print(f"many files: {len(paths):,} files, {nbytes / MiB:,.0f} MiB")
    with Timer() as t:
        digests = _digest_batch(paths)
    row("digest_file, 1 thread", t, nbytes, len(paths))
    if threads > 1:
        batches = [paths[i : i + 64] for i in range(0, len(paths), 64)]
        with ThreadPoolExecutor(threads) as pool, Timer() as t:
            got = [d for part in pool.map(_digest_batch, batches) for d in part]
        row(f"digest_file, {threads} threads", t, nbytes, len(paths))
        assert got == digests
        with Timer() as t:
            got = fsverity.digest_files(paths, threads)
        row(f"digest_files, {threads} processes (incl. spawn)", t, nbytes, len(paths))
        assert got == digests
    return list(zip(paths, digests))


def create_probe(d: str, n: int = 300) -> float:
    """µs per empty-file create in d: on a shared ext4 disk this varied 20-850 µs by directory
    placement, and it bounds the store's files/s."""
    probe = tempfile.mkdtemp(prefix="probe-", dir=d)
    t = time.perf_counter()
    for i in range(n):
        os.close(os.open(os.path.join(probe, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    us = (time.perf_counter() - t) / n * 1e6
    shutil.rmtree(probe)
    return us


def _fill_once(store_dir: str, subset: list[tuple[str, bytes | None]], threads: int,
               fsync: bool, label: str, skip_rerun: bool = True) -> None:
    nbytes = sum(os.path.getsize(p) for p, _ in subset)
    os.sync()  # start each run without someone else's writeback
    root = tempfile.mkdtemp(prefix="bench-store-", dir=store_dir)
    try:
        st = ObjectStore(root, fsync=fsync, on_notice=lambda msg: None)
        with Timer() as t:
            created, cbytes = st.fill(subset, threads=threads)
        row(f"{label}: {created:,} new", t, cbytes, created)
        if not fsync:
            with Timer() as t2:
                os.sync()
            t2.wall += t.wall
            row("  same, including the final sync", t2, cbytes, created)
        if not skip_rerun:
            with Timer() as t:
                again, _ = st.fill(subset, threads=threads)
            row("  same again (all present, skipped)", t, nbytes, len(subset))
            assert again == 0
            print(f"    copy method: {st.copy_method}, fs-verity: {st.verity_enabled}")
    finally:
        shutil.rmtree(root)


def bench_fill(pairs: list[tuple[str, bytes]], threads: int, n_files: int,
               store_dir: str) -> None:
    """Fill a fresh store with the same files under each setting."""
    subset: list[tuple[str, bytes | None]] = list(pairs[:n_files])
    print(f"store fill: {len(subset):,} files, "
          f"{sum(os.path.getsize(p) for p, _ in subset) / MiB:,.0f} MiB, into {store_dir} "
          f"(empty-file create now {create_probe(store_dir):.0f} µs there)")
    for fsync in (True, False):
        for n in sorted({1, threads}):
            _fill_once(store_dir, subset, n, fsync, f"fsync={fsync}, {n} thread(s)",
                       skip_rerun=not (fsync and n == threads))
    _fill_once(store_dir, [(p, None) for p, _ in subset], threads, False,
               f"fsync=False, {threads} thread(s), digests by fill")
    if os.path.isdir("/dev/shm"):
        print("control: the same into tmpfs (/dev/shm): the store's own cost, no disk")
        for n in sorted({1, threads}):
            _fill_once("/dev/shm", subset, n, False, f"tmpfs, {n} thread(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/usr/lib")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--max-files", type=int, default=60_000)
    ap.add_argument("--max-bytes", type=int, default=3 << 30)
    ap.add_argument("--store-dir", default=tempfile.gettempdir())
    ap.add_argument("--skip-fill", action="store_true")
    ap.add_argument("--fill-files", type=int, default=20_000,
                    help="files per store-fill run (each setting is a separate run)")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"chunk {fsverity.CHUNK_SIZE // MiB} MiB, load average {os.getloadavg()[0]:.2f}")
    bench_big(args.big_mib * MiB, args.threads)
    with Timer() as t:
        files = collect(args.root, args.max_files, args.max_bytes)
        warm([p for p, _ in files])
    print(f"(collected and pre-read {args.root} in {t.wall:.1f} s)")
    pairs = bench_many(files, args.threads)
    if not args.skip_fill:
        bench_fill(pairs, args.threads, args.fill_files, args.store_dir)


if __name__ == "__main__":
    main()
