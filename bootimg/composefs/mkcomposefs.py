"""`bootimg mkcomposefs`: a drop-in for mkcomposefs 1.0.8 built on the library.

Same flags, same meaning: SOURCE is a directory, or with ``--from-file`` a dump file
('-' = stdin); IMAGE is written atomically (temp name + rename, nothing left behind on
error), or to stdout with '-'. ``CFS_PARSE_STRICT`` selects strict dump parsing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .._perf import gc_paused
from ..errors import BootimgError, FormatError
from ..fsutil import write_atomically
from . import fsverity
from .dump import parse_dump, strict_from_env
from .scan import ScanOptions, default_threads, scan_directory
from .store import ObjectStore
from .tree import Node
from .writer import ImageOptions, ImageWriter


@dataclass
class BuildResult:
    image: bytearray
    digest: bytes
    root: Node
    n_files: int = 0
    objects_created: int = 0
    bytes_stored: int = 0


class Progress:
    """A one-line progress report on stderr, only when it is a terminal, at most 10/s."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0
        self._shown = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        if phase == "scan":
            msg = f"scanning: {done} files"
        elif total:
            msg = f"{phase}: {done / 1e6:.0f}/{total / 1e6:.0f} MB ({100 * done / total:.0f}%)"
        else:
            msg = f"{phase}: {done}"
        sys.stderr.write(f"\r\033[K{msg}")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def read_source(source: str) -> tuple[bytes, str]:
    if source == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    try:
        with open(source, "rb") as f:
            return f.read(), source
    except OSError as err:
        raise BootimgError(f"cannot read dump file: {err.strerror}", file=source) from None


def build_from_dump(data: bytes, name: str, options: ImageOptions, strict: bool | None = None) -> BuildResult:
    root = parse_dump(data, name, strict)
    image = _write(root, options, name)
    return BuildResult(image=image, digest=fsverity.digest(image), root=root)


def build_from_directory(source: str, options: ImageOptions, scan: ScanOptions = ScanOptions(),
                         digest_store: str | None = None, progress: Progress | None = None) -> BuildResult:
    # The walk returns while digests are still being computed; the writer's structural
    # phase runs meanwhile. The collector stays off throughout: between the phases it would
    # otherwise trace the whole tree again (~0.3 s for /usr), and nothing here is garbage.
    with gc_paused():
        result = scan_directory(source, scan, progress, defer_digests=True)
        writer = _writer(result.root, options, source)
        result.wait_digests(progress)
        image = _finish(writer, source)
    built = BuildResult(image=image, digest=fsverity.digest(image), root=result.root, n_files=result.n_files)
    if digest_store is not None:
        store = ObjectStore(digest_store)
        threads = scan.threads or default_threads()
        built.objects_created, built.bytes_stored = store.fill(
            ((os.fsdecode(path), node.digest) for path, node in result.external), threads=threads)
    return built


def _write(root: Node, options: ImageOptions, source_name: str) -> bytes:
    return _finish(_writer(root, options, source_name), source_name)


def _writer(root: Node, options: ImageOptions, source_name: str) -> ImageWriter:
    with _naming_source(source_name):
        return ImageWriter(root, options)


def _finish(writer: ImageWriter, source_name: str) -> bytes:
    with _naming_source(source_name):
        return writer.finish()


@contextmanager
def _naming_source(source_name: str) -> Iterator[None]:
    """Writer errors name a path inside the tree; prefix the source they came from."""
    try:
        yield
    except FormatError as err:
        if err.file is None:
            raise FormatError(err.message, file=source_name) from None
        raise


def version_options(min_version: int | None, max_version: int | None) -> ImageOptions:
    """mkcomposefs' version flags: without either, 0..1; once one is given the other is 0
    unless given too, and a maximum below the minimum is raised to it."""
    if min_version is None and max_version is None:
        return ImageOptions(0, 1)
    lo, hi = min_version or 0, max_version or 0
    hi = max(hi, lo)
    if not 0 <= lo <= hi <= 1:
        raise BootimgError(f"invalid version range --min-version={min_version} --max-version={max_version}"
                           " (supported: 0 <= min <= max <= 1)")
    return ImageOptions(lo, hi)


def run(args: argparse.Namespace) -> int:
    if args.print_digest_only:
        if args.image is not None:
            raise BootimgError("--print-digest-only takes no IMAGE argument")
    elif args.image is None:
        raise BootimgError("no destination IMAGE given")
    if args.threads is not None and args.threads < 1:
        raise BootimgError(f"invalid --threads {args.threads} (must be >= 1)")
    if args.image == "-" and sys.stdout.isatty():
        raise BootimgError("stdout is a terminal: refusing to write an image to it")
    options = version_options(args.min_version, args.max_version)

    progress = Progress(not args.quiet)
    try:
        if args.from_file:
            data, name = read_source(args.source)
            built = build_from_dump(data, name, options, strict_from_env())
        else:
            scan = ScanOptions(use_epoch=args.use_epoch, skip_devices=args.skip_devices,
                               skip_xattrs=args.skip_xattrs, user_xattrs=args.user_xattrs,
                               threads=args.threads or 0)
            built = build_from_directory(args.source, options, scan, args.digest_store, progress)
    finally:
        progress.close()

    if args.image == "-":
        sys.stdout.buffer.write(built.image)
        sys.stdout.buffer.flush()
    elif args.image is not None:
        write_atomically(args.image, built.image)
    if args.print_digest or args.print_digest_only:
        print(built.digest.hex(), flush=True)
    return 0
