"""``composefs-info``: list, dump and inspect composefs images, byte-compatible with the
reference tool (composefs 1.0.8 ``tools/composefs-info.c``).

The dump output is what ``mkcomposefs --from-file`` reads back, so its escaping and field
order are exact: round trips through it must reproduce images byte for byte. The
formatting functions take any ``Node`` tree (from an image, a dump or a directory scan).
"""

from __future__ import annotations

import argparse
import gc
import os
import stat
import sys
from typing import BinaryIO, Iterable, Iterator

from ..errors import BootimgError
from .reader import load_image
from .tree import Node

# print_escaped() flags of the reference tool.
ESCAPE_STANDARD = 0
NOESCAPE_SPACE = 1 << 0    # keep spaces: isprint() instead of isgraph() (the `ls` paths)
ESCAPE_EQUAL = 1 << 1      # hex-escape '=' (xattr keys and values)
ESCAPE_LONE_DASH = 1 << 2  # a value that is exactly "-" would read back as "unset"

_SPECIAL = {0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}
_LONE_DASH = b"\\x2d"
_BATCH = 16384             # lines per write: bounded memory, few syscalls


def _make_table(flags: int) -> tuple[list[bytes], bytes]:
    """Per-byte output for one flag set (C locale), and the bytes that pass unchanged."""
    lo = 0x20 if flags & NOESCAPE_SPACE else 0x21
    table = []
    for c in range(256):
        if c in _SPECIAL:
            table.append(_SPECIAL[c])
        elif c == 0x3D and flags & ESCAPE_EQUAL:
            table.append(b"\\x3d")
        elif lo <= c <= 0x7E:
            table.append(bytes((c,)))
        else:
            table.append(b"\\x%02x" % c)
    safe = bytes(c for c in range(256) if table[c] == bytes((c,)))
    return table, safe


_TABLES = [_make_table(f) for f in range(4)]  # indexed by flags & (NOESCAPE_SPACE | ESCAPE_EQUAL)


def escape(data: bytes, flags: int = ESCAPE_STANDARD) -> bytes:
    """The reference's print_escaped(): \\\\ \\n \\r \\t, \\xNN (lowercase) for bytes that fail
    isgraph (isprint with NOESCAPE_SPACE), '=' too with ESCAPE_EQUAL, and a lone "-" as
    \\x2d with ESCAPE_LONE_DASH."""
    if flags & ESCAPE_LONE_DASH and data == b"-":
        return _LONE_DASH
    table, safe = _TABLES[flags & 3]
    if not data.translate(None, safe):      # the common case: nothing to escape
        return data
    return _escape_bytes(data, table)


def _escape_bytes(data: bytes, table: list[bytes]) -> bytes:
    return b"".join(map(table.__getitem__, data))


def walk(root: Node, flags: int = ESCAPE_STANDARD) -> Iterator[tuple[bytes, Node]]:
    """(escaped path, node) depth-first in strcmp order; the root's path is b"".

    Escaping is per byte, so a child's escaped path is its parent's plus "/" plus its
    escaped name: every name is escaped once."""
    table, safe = _TABLES[flags & 3]
    stack: list[tuple[bytes, Node]] = [(b"", root)]
    pop, push = stack.pop, stack.extend
    while stack:
        path, node = pop()
        yield path, node
        children = node.children
        if children:
            prefix = path + b"/"
            push([(prefix + (name if not name.translate(None, safe) else _escape_bytes(name, table)), child)
                  for name, child in sorted(children.items(), reverse=True)])


def _write_batched(lines: Iterable[bytes], out: BinaryIO) -> None:
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= _BATCH:
            out.write(b"".join(batch))
            batch.clear()
    if batch:
        out.write(b"".join(batch))


def dump_lines(root: Node) -> Iterator[bytes]:
    """One composefs-dump(5) line per entry, as ``composefs-info dump`` prints them."""
    esc = escape
    table, safe = _TABLES[ESCAPE_STANDARD]
    for path, node in walk(root):
        target = node.link_to
        if target is None:
            target = node
            at = b""
            payload = node.payload
            if payload is None:
                payload = b"-"
            elif payload == b"-":
                payload = _LONE_DASH
            elif payload.translate(None, safe):
                payload = _escape_bytes(payload, table)
        else:
            at = b"@"
            # node_build_path(): the root's path is empty
            payload = esc(target.path() if target.parent is not None else b"", ESCAPE_LONE_DASH)
        content = target.content
        # printed with the inode's size as its length (a whiteout made from a file has size 0)
        content = b"-" if content is None else esc(content[:target.size], ESCAPE_LONE_DASH)
        digest = target.digest
        digest = digest.hex().encode() if digest is not None else b"-"
        sec = target.mtime_sec
        if sec >= 1 << 63:                  # printed as int64 by the reference
            sec -= 1 << 64
        line = b"%s %d %s%o %d %d %d %d %d.%d %s %s %s" % (
            path or b"/", target.size, at, target.mode, target.nlink, target.uid, target.gid,
            target.rdev, sec, target.mtime_nsec, payload, content, digest)
        if target.xattrs:
            line += b"".join([b" " + esc(k, ESCAPE_EQUAL) + b"=" + esc(v, ESCAPE_EQUAL)
                              for k, v in target.xattrs.items()])
        yield line + b"\n"


def format_dump(root: Node, out: BinaryIO) -> None:
    """Write the dump of a tree (``composefs-info dump`` format) to a binary stream."""
    _write_batched(dump_lines(root), out)


def ls_lines(root: Node) -> Iterator[bytes]:
    """``composefs-info ls``: every entry but the root, with ``/`` and a tab after
    directories, ``\\t-> TARGET`` for symlinks and ``\\t@ PAYLOAD`` for external files."""
    it = walk(root, NOESCAPE_SPACE)
    next(it)                                # the root itself is not listed
    for path, node in it:
        if node.link_to is not None:
            # The reference reader gives hardlink entries no mode and no payload of
            # their own, so they print as the bare path.
            yield path + b"\n"
            continue
        ftype = stat.S_IFMT(node.mode)
        if ftype == stat.S_IFDIR:
            yield path + b"/\t\n"
        elif ftype == stat.S_IFLNK:
            yield path + b"\t-> " + escape(node.payload or b"") + b"\n"
        elif ftype == stat.S_IFREG and node.payload is not None:
            yield path + b"\t@ " + escape(node.payload) + b"\n"
        else:
            yield path + b"\n"


def format_ls(root: Node, out: BinaryIO) -> None:
    _write_batched(ls_lines(root), out)


def _nodes(root: Node) -> Iterator[Node]:
    """Every entry, in no particular order (cheaper than walk when order does not matter)."""
    stack = [root]
    pop, push = stack.pop, stack.extend
    while stack:
        node = pop()
        yield node
        if node.children:
            push(node.children.values())


def _payloads(root: Node) -> set[bytes]:
    return {node.payload for node in _nodes(root)
            if node.payload is not None and node.link_to is None and stat.S_ISREG(node.mode)}


def list_objects(root: Node) -> list[bytes]:
    """Sorted (strcmp) unique payloads of the regular files: the backing objects."""
    return sorted(_payloads(root))


def _is_missing(payload: bytes, basedir: bytes) -> bool:
    # Only existence counts (fstatat, following symlinks), like the reference.
    try:
        os.stat(os.path.join(basedir, payload.lstrip(b"/")))
    except (OSError, ValueError):
        return True
    return False


def missing_objects(root: Node, basedir: str | bytes | os.PathLike) -> list[bytes]:
    """The objects of list_objects that do not exist under basedir."""
    base = os.fsencode(basedir)
    return [p for p in list_objects(root) if _is_missing(p, base)]


def _measure_files(paths: list[str], out: BinaryIO) -> int:
    from . import fsverity

    lines = []
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise BootimgError(f"failed to open '{path}': {err.strerror}") from None
            try:
                digest = fsverity.measure_fd(fd)
                if digest is None:
                    digest = fsverity.digest_fd(fd)
            except OSError as err:
                raise BootimgError(f"failed to measure '{path}': {err.strerror}") from None
            finally:
                os.close(fd)
            lines.append(digest.hex().encode() + b"\n")
    finally:
        out.write(b"".join(lines))          # what was measured before an error still shows
        out.flush()
    return 0


def _release(root: Node) -> None:
    """Drop the child->parent links so reference counting frees a big tree right away,
    instead of the cyclic GC walking all of it again at interpreter exit (~10% of a dump)."""
    for node in list(_nodes(root)):
        node.parent = None


def run(args: argparse.Namespace) -> int:
    """The ``composefs-info`` sub-command: ls | dump | objects | missing-objects | measure-file."""
    out = sys.stdout.buffer
    if args.command == "measure-file":
        return _measure_files(args.files, out)
    filters = [os.fsencode(name) for name in args.filter] or None
    for name in filters or ():
        if b"/" in name:
            raise BootimgError(f"filter must be a single name: {os.fsdecode(name)}")
    basedir = getattr(args, "basedir", None)
    if args.command == "missing-objects":
        if not basedir:
            raise BootimgError("missing-objects needs --basedir (the object store to check)")
        if not os.path.isdir(basedir):
            raise BootimgError(f"can't open basedir '{basedir}'")
    objects: set[bytes] = set()
    # A short-lived command over ~10^5 long-lived nodes: the cyclic GC would only re-scan
    # them (a third of a large dump's time) and find nothing to free.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for path in args.files:
            image = load_image(path, filters=filters)
            if args.command == "dump":
                format_dump(image.root, out)
            elif args.command == "ls":
                format_ls(image.root, out)
            else:
                objects |= _payloads(image.root)
            _release(image.root)
        if args.command in ("objects", "missing-objects"):
            found = sorted(objects)
            if args.command == "missing-objects":
                base = os.fsencode(basedir)
                found = [p for p in found if _is_missing(p, base)]
            out.write(b"".join([p + b"\n" for p in found]))
    finally:
        if gc_was_enabled:
            gc.enable()
        out.flush()
    return 0
