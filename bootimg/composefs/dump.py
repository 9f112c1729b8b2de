"""Parser for composefs dump files (composefs-dump(5)), with mkcomposefs 1.0.8's rules.

One file per line: 11 space-separated fields (PATH SIZE MODE NLINK UID GID RDEV MTIME
PAYLOAD CONTENT DIGEST) and then ``KEY=VALUE`` xattrs. ``-`` marks an unset optional
field. Strict mode (``CFS_PARSE_STRICT``) adds the checks upstream's test suite relies on.
Every error names the input and the line: ``FILE:LINE: what is wrong``.
"""

from __future__ import annotations

import os
import re
import stat

from .._perf import gc_paused
from ..errors import FormatError
from .tree import (
    INLINE_CONTENT_MAX,
    MAX_FILE_SIZE,
    NAME_MAX,
    SYMLINK_MAX,
    Node,
)

MAX_XATTR_LINE = 65535      # bytes after the fixed fields ("Too many xattrs" beyond)
_N_FIXED = 11
_N_REQUIRED = 8            # PATH .. MTIME

_ESCAPE_RE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.|$)", re.S)
_SIMPLE_ESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}


class _LineError(Exception):
    """Raised inside the per-line parser; turned into a FormatError with file:line."""


def strict_from_env() -> bool:
    return bool(os.environ.get("CFS_PARSE_STRICT"))


def unescape(field: bytes) -> bytes:
    """Undo the dump format's escapes: \\\\ \\n \\r \\t and \\xHH; anything else is an error."""
    if b"\\" not in field:
        return field

    def repl(m: re.Match) -> bytes:
        esc = m.group(1)
        if esc[:1] == b"x" and len(esc) == 3:
            return bytes((int(esc[1:], 16),))
        out = _SIMPLE_ESCAPES.get(esc)
        if out is None:
            shown = esc.decode("latin-1") if esc else "end of field"
            raise _LineError(f"invalid escape '\\{shown}'")
        return out

    return _ESCAPE_RE.sub(repl, field)


def _optional(field: bytes) -> bytes | None:
    return None if field == b"-" else unescape(field)


def _uint(field: bytes, what: str, bits: int = 64) -> int:
    # strtoull semantics: decimal, a leading '-' wraps around.
    try:
        value = int(field, 10)
    except ValueError:
        raise _LineError(f"invalid {what} {field.decode('latin-1')!r}") from None
    if not field.lstrip(b"+-").isdigit():
        raise _LineError(f"invalid {what} {field.decode('latin-1')!r}")
    value %= 1 << 64
    if value >= 1 << bits:
        raise _LineError(f"{what} {value} out of range")
    return value


def _parse_mtime(field: bytes) -> tuple[int, int]:
    sec, dot, nsec = field.partition(b".")
    if not dot:
        raise _LineError(f"invalid mtime {field.decode('latin-1')!r} (expected SEC.NSEC)")
    return _uint(sec, "mtime seconds"), _uint(nsec, "mtime nanoseconds", 32)


def _parse_digest(field: bytes) -> bytes:
    try:
        digest = bytes.fromhex(field.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _LineError(f"invalid digest {field.decode('latin-1')!r}") from None
    if len(digest) != 32:
        raise _LineError(f"digest must be 64 hex characters, got {len(field)}")
    return digest


class DumpParser:
    """Builds a tree from dump lines; hardlinks are resolved once all lines are read."""

    def __init__(self, source_name: str, strict: bool = False):
        self.source_name = source_name
        self.strict = strict
        self.root: Node | None = None
        self.hardlinks: list[tuple[int, Node, bytes]] = []
        self._last_dir_path = b""
        self._last_dir: Node | None = None
        self._lineno = 0

    def error(self, lineno: int, message: str) -> FormatError:
        return FormatError(message, file=self.source_name, where=lineno)

    def feed_line(self, lineno: int, line: bytes) -> None:
        self._lineno = lineno
        try:
            self._parse_line(line)
        except (_LineError, FormatError) as err:
            msg = err.message if isinstance(err, FormatError) else str(err)
            raise self.error(lineno, msg) from None

    def _find_dir(self, path: bytes) -> Node | None:
        if path == self._last_dir_path and self._last_dir is not None:
            return self._last_dir
        node = self.root.lookup(path) if self.root is not None else None
        if node is not None and node.is_dir():
            self._last_dir_path, self._last_dir = path, node
        return node

    def _parse_line(self, line: bytes) -> None:
        if b"\0" in line:
            raise _LineError("NUL byte in line")
        fields = line.split(b" ", _N_FIXED)
        if len(fields) < _N_REQUIRED:
            raise _LineError(f"expected at least {_N_REQUIRED} fields, found {len(fields)}")
        if len(fields) < _N_FIXED:
            # PAYLOAD, CONTENT and DIGEST may be left off the end of a line.
            fields += [b"-"] * (_N_FIXED - len(fields))
        xattr_part = fields[_N_FIXED] if len(fields) > _N_FIXED else None
        (path_f, size_f, mode_f, nlink_f, uid_f, gid_f, rdev_f, mtime_f,
         payload_f, content_f, digest_f) = fields[:_N_FIXED]

        path = unescape(path_f)
        if not path:
            raise _LineError("empty path")
        if path[:1] != b"/":
            raise _LineError(f"path {path!r} is not absolute")

        is_hardlink = mode_f[:1] == b"@"
        try:
            mode = int(mode_f[1:] if is_hardlink else mode_f, 8)
        except ValueError:
            raise _LineError(f"invalid mode {mode_f.decode('latin-1')!r}") from None

        if is_hardlink:
            node = Node(mode)
            node.children = None
            target = _optional(payload_f)
            if not target:
                raise _LineError("hardlink without a target path")
            self._insert(path, node)
            self.hardlinks.append((self._lineno, node, target))
            return

        node = Node(mode)
        node.validate_mode()
        node.size = _uint(size_f, "size")
        node.nlink = _uint(nlink_f, "nlink")
        node.uid = _uint(uid_f, "uid", 32)
        node.gid = _uint(gid_f, "gid", 32)
        node.rdev = _uint(rdev_f, "rdev", 32)
        node.mtime_sec, node.mtime_nsec = _parse_mtime(mtime_f)
        payload = _optional(payload_f)
        content = _optional(content_f)
        if digest_f != b"-":
            node.digest = _parse_digest(digest_f)

        ftype = stat.S_IFMT(mode)
        if self.strict and node.rdev != 0 and ftype not in (stat.S_IFCHR, stat.S_IFBLK):
            raise _LineError("rdev must be 0 for a file that is not a device")

        if ftype == stat.S_IFLNK:
            if not payload or len(payload) > SYMLINK_MAX:
                n = len(payload or b"")
                raise _LineError(f"invalid symlink: target length {n} (must be 1..{SYMLINK_MAX})")
            if self.strict:
                if node.size != len(payload):
                    raise _LineError(f"symlink size {node.size} does not match its target length {len(payload)}")
                if content is not None:
                    raise _LineError("symlink with inline content")
            node.size = len(payload)
            node.payload = payload
        else:
            node.payload = payload
            if content is not None:
                if len(content) > INLINE_CONTENT_MAX:
                    raise _LineError(f"inline content size {len(content)} exceeds maximum {INLINE_CONTENT_MAX}")
                if len(content) != node.size:
                    raise _LineError(f"inline content length {len(content)} does not match size {node.size}")
                node.content = content
            elif ftype == stat.S_IFREG and node.size > MAX_FILE_SIZE:
                raise _LineError(f"file too large ({node.size} bytes, max {MAX_FILE_SIZE})")

        if xattr_part is not None:
            if len(xattr_part) > MAX_XATTR_LINE:
                raise _LineError(f"too many xattrs ({len(xattr_part)} bytes of xattrs on one line, max {MAX_XATTR_LINE})")
            for item in xattr_part.split(b" "):
                key, eq, value = item.partition(b"=")
                if not eq:
                    raise _LineError(f"missing '=' in xattr {item.decode('latin-1')!r}")
                key = unescape(key)
                if not key:
                    raise _LineError("empty xattr name")
                node.set_xattr(key, unescape(value))

        self._insert(path, node)

    def _insert(self, path: bytes, node: Node) -> None:
        if path == b"/":
            if self.root is not None:
                raise _LineError("duplicate root entry '/'")
            if not node.is_dir():
                raise _LineError("root '/' must be a directory")
            self.root = node
            return
        if self.root is None:
            raise _LineError("the first entry must be the root directory '/'")
        rel = path.lstrip(b"/")
        parent_path, _, name = rel.rpartition(b"/")
        if not name:
            raise _LineError("empty file name in path")
        if name in (b".", b".."):
            raise _LineError("invalid '.' or '..' in path")
        if len(name) > NAME_MAX:
            raise _LineError(f"file name of {len(name)} bytes exceeds {NAME_MAX}")
        parent = self._find_dir(parent_path)
        if parent is None:
            raise _LineError(f"parent directory of {path.decode('utf-8', 'backslashreplace')} not found")
        if not parent.is_dir():
            raise _LineError(f"parent of {path.decode('utf-8', 'backslashreplace')} is not a directory")
        if name in parent.children:
            raise _LineError(f"duplicate entry {path.decode('utf-8', 'backslashreplace')}")
        parent.add_child(name, node)

    def finish(self, last_lineno: int) -> Node:
        if self.root is None:
            raise self.error(last_lineno, "no root entry '/' in dump")
        for lineno, node, target_path in self.hardlinks:
            target = self.root.lookup(target_path)
            where = lineno
            if target is None:
                raise FormatError(f"hardlink target {target_path!r} of {node.path()!r} not found",
                                  file=self.source_name, where=where)
            while target.link_to is not None:
                target = target.link_to
            if target is node:
                raise FormatError(f"self-referential hardlink {node.path().decode('utf-8', 'backslashreplace')}",
                                  file=self.source_name, where=where)
            if target.is_dir():
                raise FormatError(f"directories can't be hardlinked ({node.path().decode('utf-8', 'backslashreplace')})",
                                  file=self.source_name, where=where)
            node.link_to = target
            node.mode = target.mode
        return self.root


def parse_dump(data: bytes, source_name: str = "<dump>", strict: bool | None = None) -> Node:
    """Parse a whole dump file (bytes) into a tree rooted at '/'."""
    if strict is None:
        strict = strict_from_env()
    with gc_paused():
        return _parse_dump(data, source_name, strict)


def _parse_dump(data: bytes, source_name: str, strict: bool) -> Node:
    parser = DumpParser(source_name, strict)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif strict and lines:
        raise parser.error(len(lines), "missing newline at end of file")
    lineno = 0
    for lineno, line in enumerate(lines, 1):
        parser.feed_line(lineno, line)
    return parser.finish(lineno)
