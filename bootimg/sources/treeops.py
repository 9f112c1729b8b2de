"""Edits on a loaded tree that a build needs: exclude globs, add files, count things, and
keep hardlinks consistent after removals.

Paths here are absolute image paths (``/usr/share/doc``), as ``str`` (encoded UTF-8 with
surrogateescape, so any byte name can be spelt) or ``bytes``.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass

from ..composefs import fsverity
from ..composefs.store import ObjectStore
from ..composefs.tree import NAME_MAX, PATH_MAX, SCAN_INLINE_MAX, Node
from ..errors import BootimgError, FormatError

# Implicitly created directories (parents missing from an archive, parents of added files).
IMPLICIT_DIR_MODE = stat.S_IFDIR | 0o755


def _b(path: str | bytes) -> bytes:
    return path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")


def _shown(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


# -- hardlinks ------------------------------------------------------------------------------------

def is_attached(node: Node, root: Node) -> bool:
    """Whether node is still reachable from root (removing a subtree only detaches its top)."""
    while node.parent is not None:
        if node.parent.children is None or node.parent.children.get(node.name) is not node:
            return False
        node = node.parent
    return node is root


def remove_node(node: Node) -> None:
    """Detach node (and so its subtree) from its parent. Call fix_hardlinks afterwards if the
    tree has hardlinks: aliases of a removed file must take its place."""
    parent = node.parent
    if parent is not None and parent.children is not None and parent.children.get(node.name) is node:
        del parent.children[node.name]
    node.parent = None


def fix_hardlinks(root: Node) -> None:
    """Make hardlinks consistent: every inode's nlink is its number of names in the tree, and
    an inode whose original name was removed (replaced, whited out, excluded) lives on in its
    first remaining alias (in sorted walk order), like a file whose first link was unlinked."""
    groups: dict[int, list[Node]] = {}
    targets: dict[int, Node] = {}
    for node in root.walk():
        if node.link_to is not None:
            groups.setdefault(id(node.link_to), []).append(node)
            targets[id(node.link_to)] = node.link_to
    for key, aliases in groups.items():
        target = targets[key]
        if is_attached(target, root):
            target.nlink = 1 + len(aliases)
            for alias in aliases:
                alias.mode = target.mode
            continue
        heir = aliases[0]
        heir.link_to = None
        for attr in ("mode", "uid", "gid", "rdev", "mtime_sec", "mtime_nsec", "size", "payload",
                     "content", "digest"):
            setattr(heir, attr, getattr(target, attr))
        heir.xattrs = dict(target.xattrs)
        heir.nlink = len(aliases)
        for alias in aliases[1:]:
            alias.link_to = heir
            alias.mode = heir.mode


# -- exclude --------------------------------------------------------------------------------------

def _component_regex(comp: bytes) -> bytes:
    """One path component of a glob: * and ? stay within the component, ** crosses '/'."""
    out = bytearray()
    i = 0
    n = len(comp)
    while i < n:
        c = comp[i:i + 1]
        if comp.startswith(b"**", i):
            out += b".*"
            i += 2
            while i < n and comp[i:i + 1] == b"*":
                i += 1
            continue
        if c == b"*":
            out += b"[^/]*"
        elif c == b"?":
            out += b"[^/]"
        elif c == b"[":
            j = i + 1
            if j < n and comp[j:j + 1] in (b"!", b"^"):
                j += 1
            if j < n and comp[j:j + 1] == b"]":
                j += 1
            while j < n and comp[j:j + 1] != b"]":
                j += 1
            if j >= n:
                out += b"\\["
            else:
                body = comp[i + 1:j]
                neg = body[:1] in (b"!", b"^")
                if neg:
                    body = body[1:]
                body = body.replace(b"\\", b"\\\\")
                out += (b"[^/" if neg else b"[") + body + b"]"
                i = j + 1
                continue
        else:
            out += re.escape(c)
        i += 1
    return bytes(out)


def glob_regex(pattern: str | bytes) -> re.Pattern[bytes]:
    """Compile an absolute glob to a regex over absolute paths. ``*``, ``?`` and ``[...]``
    match within one component; a ``**`` component matches zero or more whole components,
    except at the end (``/var/cache/**``) where it matches one or more: everything inside,
    not the directory itself; ``**`` within a component matches across '/'."""
    pat = _b(pattern)
    if not pat.startswith(b"/"):
        raise BootimgError(f"exclude pattern {_shown(pat)!r} is not absolute")
    comps = [c for c in pat.split(b"/") if c]
    if not comps:
        raise BootimgError("exclude pattern '/' would exclude the root")
    rx = b""
    last = len(comps) - 1
    for i, comp in enumerate(comps):
        if comp == b"**":
            rx += b"/.+" if i == last else b"(?:/.+)?"
        else:
            rx += b"/" + _component_regex(comp)
    return re.compile(rx + b"\\Z", re.DOTALL)


def exclude(root: Node, globs: list[str] | tuple[str, ...]) -> int:
    """Remove every node whose absolute path matches one of ``globs`` (see glob_regex), with
    its subtree; returns how many nodes were removed. Hardlinks are kept consistent."""
    if not globs:
        return 0
    rx = [glob_regex(g) for g in globs]
    removed = 0
    stack: list[tuple[bytes, Node]] = [(b"", root)]
    while stack:
        path, node = stack.pop()
        for name, child in list(node.children.items()):
            cpath = path + b"/" + name
            if any(r.match(cpath) for r in rx):
                removed += sum(1 for _ in child.walk())
                remove_node(child)
            elif child.children is not None and child.link_to is None:
                stack.append((cpath, child))
    if removed:
        fix_hardlinks(root)
    return removed


# -- add_file -------------------------------------------------------------------------------------

def _split_abs(path: str | bytes) -> list[bytes]:
    p = _b(path)
    if not p.startswith(b"/"):
        raise BootimgError(f"path {_shown(p)!r} is not absolute")
    if b"\0" in p or len(p) > PATH_MAX:
        raise BootimgError(f"invalid path {_shown(p)!r}")
    parts = [c for c in p.split(b"/") if c]
    for c in parts:
        if c in (b".", b".."):
            raise BootimgError(f"path {_shown(p)!r} contains '{c.decode()}'")
        if len(c) > NAME_MAX:
            raise BootimgError(f"path {_shown(p)!r} has a component longer than {NAME_MAX} bytes")
    return parts


def make_dirs(root: Node, parts: list[bytes], mtime: int = 0) -> Node:
    """The directory at parts, created with parents as needed (0755, 0:0, ``mtime``).
    Symlinks are never followed: a symlink or non-directory on the way is an error."""
    node = root
    for i, comp in enumerate(parts):
        child = node.children.get(comp)
        if child is None:
            child = node.add_child(comp, Node(IMPLICIT_DIR_MODE, mtime_sec=mtime))
        elif not child.is_dir() or child.link_to is not None:
            where = _shown(b"/" + b"/".join(parts[:i + 1]))
            kind = "a symlink" if child.target().is_symlink() else "not a directory"
            raise BootimgError(f"{where} is {kind}")
        node = child
    return node


def add_file(root: Node, path: str | bytes, content: bytes, mode: int = 0o644, uid: int = 0,
             gid: int = 0, mtime: int = 0, *, store: ObjectStore, mtime_nsec: int = 0,
             xattrs: dict[bytes, bytes] | None = None, inline_max: int = SCAN_INLINE_MAX) -> Node:
    """Add (or replace) the regular file at absolute ``path``. Missing parents are created
    (0755, owner 0:0, the file's mtime). Content of 1..inline_max bytes is stored in the image,
    larger content in ``store``. ``mode`` is the permission bits (a file type other than
    regular is an error). Replacing a directory is an error; replacing a file keeps its other
    hardlinks pointing at the old content."""
    parts = _split_abs(path)
    if not parts:
        raise BootimgError("cannot add a file at '/'")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise BootimgError(f"{_shown(_b(path))}: mode {mode:o} is not a regular file's")
    parent = make_dirs(root, parts[:-1], mtime)
    name = parts[-1]
    old = parent.children.get(name)
    if old is not None:
        if old.is_dir() and old.link_to is None:
            raise BootimgError(f"{_shown(_b(path))} is a directory")
        remove_node(old)
    node = Node(stat.S_IFREG | (mode & 0o7777), uid=uid, gid=gid, mtime_sec=mtime,
                mtime_nsec=mtime_nsec, size=len(content))
    if content:
        if len(content) <= inline_max:
            node.content = bytes(content)
        else:
            node.digest = store.add_bytes(content)
            node.payload = fsverity.object_name(node.digest).encode()
    try:
        for k, v in (xattrs or {}).items():
            node.set_xattr(k, v)
    except FormatError as e:
        raise BootimgError(f"{_shown(_b(path))}: {e.message}") from None
    parent.add_child(name, node)
    if old is not None:
        fix_hardlinks(root)
    return node


# -- stats ----------------------------------------------------------------------------------------

@dataclass
class TreeStats:
    entries: int = 0       # every name, root included
    dirs: int = 0
    files: int = 0         # regular-file inodes (a hardlinked file counts once)
    symlinks: int = 0
    hardlinks: int = 0     # extra names of an inode (aliases)
    devices: int = 0       # character and block devices (whiteouts included)
    special: int = 0       # FIFOs and sockets
    bytes: int = 0         # data of regular files, once per inode
    inline: int = 0        # regular files stored in the image
    external: int = 0      # regular files in the object store
    external_bytes: int = 0
    objects: int = 0       # distinct objects referenced


def tree_stats(root: Node) -> TreeStats:
    s = TreeStats()
    digests: set[bytes] = set()
    for node in root.walk():
        s.entries += 1
        if node.link_to is not None:
            s.hardlinks += 1
            continue
        fmt = stat.S_IFMT(node.mode)
        if fmt == stat.S_IFDIR:
            s.dirs += 1
        elif fmt == stat.S_IFREG:
            s.files += 1
            s.bytes += node.size
            if node.content is not None:
                s.inline += 1
            elif node.size > 0:
                s.external += 1
                s.external_bytes += node.size
                if node.digest is not None:
                    digests.add(node.digest)
        elif fmt == stat.S_IFLNK:
            s.symlinks += 1
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            s.devices += 1
        else:
            s.special += 1
    s.objects = len(digests)
    return s
