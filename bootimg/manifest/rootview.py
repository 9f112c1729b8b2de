"""A look at a few paths of the root source without loading it: what ``--check-inputs`` needs to
report at validate time what the build would otherwise only find mid-way.

A directory is looked at with ``lstat`` (symlinks are never followed, as the build never
follows them); a tar archive (plain, gzip or zstd) is read once, as a stream, keeping only the
paths asked for. The manifest's ``exclude`` globs apply, with the build's own semantics
(``sources.treeops``). An archive that cannot be read gives no view: the build then reports
exactly what is wrong with it.
"""

from __future__ import annotations

import os
import stat
import tarfile
from typing import Iterable

Kind = str  # "dir", "symlink" or "file" (anything else that is not a directory)


def _kind(mode: int) -> Kind:
    if stat.S_ISDIR(mode):
        return "dir"
    return "symlink" if stat.S_ISLNK(mode) else "file"


class RootView:
    """The kinds of some paths of a root tree, after the manifest's excludes."""

    def __init__(self, excludes: Iterable[str] = ()):
        from ..sources.treeops import glob_regex  # the build's exclude semantics

        self._excludes = [glob_regex(g) for g in excludes]

    def excluded(self, path: str) -> bool:
        """Whether ``path`` or one of its ancestors matches an exclude glob (then it is gone)."""
        raw = path.encode("utf-8", "surrogateescape")
        parts = raw.split(b"/")
        return any(rx.match(b"/".join(parts[:i])) for i in range(2, len(parts) + 1) for rx in self._excludes)

    def _lookup(self, path: str) -> Kind | None:
        raise NotImplementedError

    def _children(self, path: str) -> list[str]:
        raise NotImplementedError

    def kind(self, path: str) -> Kind | None:
        """The kind of ``path`` (absolute, its ancestors real directories), None if it is absent."""
        return None if self.excluded(path) else self._lookup(path)

    def children(self, path: str) -> list[str]:
        """The names in directory ``path`` that the excludes leave."""
        return sorted(n for n in self._children(path) if not self.excluded(f"{path}/{n}"))

    def walk(self, path: str) -> tuple[str, Kind] | None:
        """Where ``path`` leads in the tree: (path, its kind) when it is there; (an ancestor, its
        kind) when that ancestor is a symlink or not a directory (nothing below it can be
        reached); None when the path or an ancestor is absent."""
        parts = path.split("/")[1:]
        for i in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:i])
            kind = self.kind(prefix)
            if kind is None:
                return None
            if i == len(parts) or kind != "dir":
                return prefix, kind
        return None


class DirectoryView(RootView):
    def __init__(self, top: str, excludes: Iterable[str] = ()):
        super().__init__(excludes)
        self.top = top

    def _lookup(self, path: str) -> Kind | None:
        try:
            return _kind(os.lstat(self.top + path).st_mode)
        except OSError:
            return None

    def _children(self, path: str) -> list[str]:
        try:
            return os.listdir(self.top + path)
        except OSError:
            return []


class TarView(RootView):
    """The kinds of ``wanted`` paths (and the names in ``listed`` directories) of a tar archive,
    read in one streaming pass: a later member replaces an earlier one of the same path, and
    the parents of a member are directories even without members of their own."""

    def __init__(self, archive: str, wanted: Iterable[str], listed: Iterable[str] = (), excludes: Iterable[str] = ()):
        super().__init__(excludes)
        self.wanted = set(wanted)
        self.listed = {p: set() for p in listed}
        self.kinds: dict[str, Kind] = {}
        self.implied: set[str] = set()
        self._read(archive)

    def _read(self, archive: str) -> None:
        from ..sources.tar import decompressor, sniff

        with open(archive, "rb") as raw:
            kind, reader = sniff(raw)
            with tarfile.open(fileobj=decompressor(kind, reader), mode="r|",  # type: ignore[call-overload]
                              encoding="utf-8", errors="surrogateescape") as tf:
                for member in tf:
                    tf.members.clear()  # tarfile keeps every member otherwise
                    parts = [p for p in member.name.split("/") if p not in ("", ".")]
                    if not parts or ".." in parts:
                        continue
                    self._add("/" + "/".join(parts), "dir" if member.isdir() else "symlink" if member.issym() else "file")

    def _add(self, path: str, kind: Kind) -> None:
        if path in self.wanted:
            self.kinds[path] = kind
        parent, _, name = path.rpartition("/")
        if parent in self.listed:
            self.listed[parent].add(name)
        while parent and parent not in self.implied:
            self.implied.add(parent)
            parent = parent.rpartition("/")[0]

    def _lookup(self, path: str) -> Kind | None:
        if path not in self.wanted:
            raise KeyError(f"{path} was not asked for when the archive was read")
        return self.kinds.get(path) or ("dir" if path in self.implied else None)

    def _children(self, path: str) -> list[str]:
        return list(self.listed[path])


def open_view(kind: str, location: str, wanted: Iterable[str], listed: Iterable[str] = (),
              excludes: Iterable[str] = ()) -> RootView | None:
    """A view of a directory or tar root source; None for other sources and unreadable archives."""
    if kind == "directory" and os.path.isdir(location):
        return DirectoryView(location, excludes)
    if kind == "tar" and os.path.isfile(location):
        wanted = {prefix for path in wanted for prefix in _prefixes(path)}
        try:
            return TarView(location, wanted, listed, excludes)
        except Exception:  # whatever is wrong with the archive, the build's loader names it precisely
            return None
    return None


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")[1:]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
