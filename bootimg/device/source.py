"""Where an update comes from: a release directory (``bootimg build -o``, with ``boot/`` from
``bootimg initramfs -o RELEASE/boot``), a tar of one (plain, gzip or zstd), or an HTTP(S) URL of
such a directory (any static file server, e.g. ``python3 -m http.server``) or of such a tar.

Over HTTP only what the device lacks is fetched: release.json and its signature, the images,
the kernel and initramfs, and then each object the store does not have yet, by its name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterator

from ..boot.partition import BOOT_FILES
from ..errors import BootimgError
from ..release import layout

HTTP_TIMEOUT = 60
BOOT_NAMES = ("vmlinuz", "initrd.img")


class Source:
    """One release to install; ``describe`` names it in messages."""

    describe = "source"

    def read(self, rel: str, *, limit: int | None = None) -> bytes | None:
        """A file of the release by its path in the release directory (None: not there)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[tuple[BinaryIO, int]]:
        """A file of the release, open for reading, and its size."""
        raise NotImplementedError
        yield  # pragma: no cover

    def object_path(self, name: str) -> Path | None:
        """A local path of object ``name`` when the source has one (no copy needed to read it)."""
        return None


class DirSource(Source):
    def __init__(self, path: Path):
        self.path = path
        self.describe = str(path)

    def _file(self, rel: str) -> Path:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise BootimgError(f"unsafe path {rel!r} in the release", file=self.describe)
        return self.path / rel

    def read(self, rel: str, *, limit: int | None = None) -> bytes | None:
        path = self._file(rel)
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            data = f.read(limit + 1 if limit else -1)
        if limit and len(data) > limit:
            raise BootimgError(f"larger than {limit} bytes", file=str(path))
        return data

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[tuple[BinaryIO, int]]:
        path = self._file(rel)
        try:
            f = open(path, "rb")
        except OSError as err:
            raise BootimgError(f"cannot read: {err.strerror}", file=str(path)) from None
        with f:
            yield f, os.fstat(f.fileno()).st_size

    def object_path(self, name: str) -> Path | None:
        path = self._file(f"{layout.OBJECTS_DIR}/{name}")
        return path if path.is_file() else None


class HttpSource(Source):
    def __init__(self, url: str):
        self.url = url if url.endswith("/") else url + "/"
        self.describe = url

    def _get(self, rel: str):
        try:
            return urllib.request.urlopen(urllib.parse.urljoin(self.url, rel), timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise BootimgError(f"{rel}: HTTP {err.code} {err.reason}", file=self.describe) from None
        except (urllib.error.URLError, OSError) as err:
            raise BootimgError(f"{rel}: cannot fetch: {getattr(err, 'reason', err)}", file=self.describe) from None

    def read(self, rel: str, *, limit: int | None = None) -> bytes | None:
        resp = self._get(rel)
        if resp is None:
            return None
        with resp:
            data = resp.read(limit + 1 if limit else -1)
        if limit and len(data) > limit:
            raise BootimgError(f"{rel}: larger than {limit} bytes", file=self.describe)
        return data

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[tuple[BinaryIO, int]]:
        resp = self._get(rel)
        if resp is None:
            raise BootimgError(f"{rel}: not found (HTTP 404)", file=self.describe)
        with resp:
            size = int(resp.headers.get("Content-Length") or -1)
            yield resp, size


def _extract_tar(archive: Path, dest: Path) -> Path:
    """A tar of a release directory, unpacked (regular files and directories only, no path
    outside ``dest``); returns the release directory in it."""
    with open(archive, "rb") as raw:
        head = raw.read(4)
    if head == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(open(archive, "rb"))
        except ImportError:
            proc = subprocess.Popen(["zstd", "-dc", str(archive)], stdout=subprocess.PIPE)
            stream = proc.stdout
        mode = "r|"
    else:
        stream, mode = open(archive, "rb"), "r:*"
    with stream, tarfile.open(fileobj=stream, mode=mode) as tar:
        try:
            tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise BootimgError(f"not a usable release archive: {err}", file=str(archive)) from None
    found = [p.parent for p in dest.rglob(layout.RELEASE_JSON) if p.is_file()]
    if len(found) != 1:
        raise BootimgError(f"the archive holds {len(found)} release.json files, not one", file=str(archive))
    return found[0]


@contextlib.contextmanager
def open_source(spec: str) -> Iterator[Source]:
    """``spec`` as a Source (a directory, a tar file, or an http(s) URL of either)."""
    if spec.startswith(("http://", "https://")):
        if spec.rstrip("/").endswith((".tar", ".tar.gz", ".tgz", ".tar.zst")):
            with tempfile.TemporaryDirectory(prefix="bootimg-source-") as tmp:
                archive = Path(tmp) / "release.tar"
                base, name = spec.rsplit("/", 1)
                with HttpSource(base).open(name) as (resp, _size), open(archive, "wb") as f:
                    shutil.copyfileobj(resp, f)
                yield DirSource(_extract_tar(archive, Path(tmp) / "x"))
            return
        yield HttpSource(spec)
        return
    path = Path(spec)
    if path.is_dir():
        yield DirSource(path)
    elif path.is_file():
        with tempfile.TemporaryDirectory(prefix="bootimg-source-") as tmp:
            yield DirSource(_extract_tar(path, Path(tmp)))
    else:
        raise BootimgError("no such release directory, archive or URL", file=spec)


def boot_file(name: str) -> str:
    return f"{BOOT_FILES}/{name}"
