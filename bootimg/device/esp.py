"""The ESP as the installer sees it: a mounted directory (on the device, ``--esp DIR``) or the
ESP partition of a disk image, reached with mtools (no mount, no vfat driver needed).

Writes are atomic the way FAT allows: the new file under a temporary name, then a rename over
the final name; nothing is modified in place. Entries are listed from ``loader/entries``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..boot import loader
from ..errors import BootimgError
from ..host import need_tools


class Esp:
    """Files of an ESP by their path relative to it ('/'-separated)."""

    describe = "ESP"

    def read(self, path: str) -> bytes | None:
        raise NotImplementedError

    def write(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def remove(self, path: str) -> None:
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        """Names in the directory ``path`` ([] when it does not exist)."""
        raise NotImplementedError

    def rename(self, old: str, new: str) -> None:
        raise NotImplementedError

    def entries(self) -> list[tuple[loader.EntryName, dict[str, str]]]:
        """Every bootimg entry: its name (with boot counters) and its keys."""
        out = []
        for name in sorted(self.listdir(loader.ENTRIES_DIR)):
            parsed = loader.EntryName.parse(name)
            if parsed is None or not parsed.id.startswith(loader.ENTRY_PREFIX):
                continue
            data = self.read(f"{loader.ENTRIES_DIR}/{name}")
            if data is not None:
                out.append((parsed, loader.parse_entry(data.decode("utf-8", "replace"))))
        return out


class DirEsp(Esp):
    """A mounted ESP."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.describe = str(self.root)

    def _path(self, path: str) -> Path:
        if ".." in path.split("/"):
            raise BootimgError(f"unsafe ESP path {path!r}")
        return self.root / path.lstrip("/")

    def read(self, path: str) -> bytes | None:
        try:
            return self._path(path).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes) -> None:
        dest = self._path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bootimg-", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            tmp = None
            _fsync_dir(dest.parent)
        finally:
            if tmp is not None:
                os.unlink(tmp)

    def remove(self, path: str) -> None:
        target = self._path(path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        _fsync_dir(target.parent)

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(self._path(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def rename(self, old: str, new: str) -> None:
        os.replace(self._path(old), self._path(new))
        _fsync_dir(self._path(new).parent)


class ImageEsp(Esp):
    """The ESP partition of a disk image at byte ``offset`` (mtools' ``IMAGE@@OFFSET``)."""

    def __init__(self, image: str | os.PathLike[str], offset: int):
        need_tools("mcopy", "mdir", "mdel", "mren", "mmd", "mtype", "mdeltree")
        self.image = f"{image}@@{offset}"
        self.describe = f"{image} (ESP at byte {offset})"
        self._env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), capture_output=True, env=self._env)
        if check and proc.returncode != 0:
            raise BootimgError(f"{argv[0]} on the ESP failed: {proc.stderr.decode(errors='replace').strip()[-200:]}",
                               file=self.describe)
        return proc

    def read(self, path: str) -> bytes | None:
        proc = self._run("mtype", "-i", self.image, f"::/{path}", check=False)
        return proc.stdout if proc.returncode == 0 else None

    def _mkdirs(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not self._exists(sub):
                self._run("mmd", "-i", self.image, f"::/{sub}")

    def _exists(self, path: str) -> bool:
        return self._run("mdir", "-b", "-i", self.image, f"::/{path}", check=False).returncode == 0

    def write(self, path: str, data: bytes) -> None:
        self._mkdirs(path)
        with tempfile.NamedTemporaryFile() as f:
            f.write(data)
            f.flush()
            # mcopy -o writes the new file and then replaces the directory entry.
            self._run("mcopy", "-o", "-i", self.image, f.name, f"::/{path}")

    def remove(self, path: str) -> None:
        if self._exists(path):
            proc = self._run("mdeltree", "-i", self.image, f"::/{path}", check=False)
            if proc.returncode != 0:
                self._run("mdel", "-i", self.image, f"::/{path}")

    def listdir(self, path: str) -> list[str]:
        proc = self._run("mdir", "-b", "-i", self.image, f"::/{path}", check=False)
        if proc.returncode != 0:
            return []
        names = []
        for line in proc.stdout.decode(errors="replace").splitlines():
            name = line.strip().rstrip("/").rsplit("/", 1)[-1]
            if name and name not in (".", ".."):
                names.append(name)
        return names

    def rename(self, old: str, new: str) -> None:
        if self._exists(new):
            self._run("mdel", "-i", self.image, f"::/{new}")
        self._run("mren", "-i", self.image, f"::/{old}", f"::/{new}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
