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
    MAX_CHUNKS,
    NAME_MAX,
    PATH_MAX,
    SYMLINK_MAX,
    Node,
    chunk_count,
)

MAX_XATTR_LINE = 65535      # bytes after the fixed fields ("Too many xattrs" beyond)
_N_FIXED = 11

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


def _c_string(field: bytes, what: str) -> bytes:
    """Unescape a field the reference keeps as a C string: it would cut it at an escaped NUL,
    which silently changes the name or target, so that is refused."""
    if b"\\" not in field:         # a raw NUL never gets here (the line is refused)
        return field
    value = unescape(field)
    if b"\0" in value:
        raise _LineError(f"\\x00 in {what} (the reference would cut it there)")
    return value


def _optional(field: bytes, what: str | None = None) -> bytes | None:
    if field == b"-":
        return None
    return unescape(field) if what is None else _c_string(field, what)


def _strtoull(field: bytes, base: int) -> int | None:
    """glibc strtoull() in the C locale, as mkcomposefs parses numbers: leading white space
    and one sign allowed, a '-' negates modulo 2^64, overflow saturates at 2^64 - 1; None
    for an empty field, no digits or anything after them."""
    if field.isdigit() and (base == 10 or not field.strip(b"01234567")):     # the common case
        value = int(field, base)
        return value if value <= _U64 else _U64
    s = field.lstrip(b" \t\n\v\f\r")
    neg = s[:1] == b"-"
    if s[:1] in (b"+", b"-"):
        s = s[1:]
    if not s or s.strip(_DIGITS[base]):
        return None
    value = int(s, base)
    if value > _U64:
        return _U64
    return -value & _U64 if neg else value


_DIGITS = {8: b"01234567", 10: b"0123456789"}
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


def _uint(field: bytes, what: str, base: int = 10) -> int:
    value = _strtoull(field, base)
    if value is None:
        raise _LineError(f"invalid {what} {field.decode('latin-1')!r}")
    return value


def _parse_mtime(field: bytes) -> tuple[int, int]:
    """SEC.NSEC: seconds as a 64-bit value (read back as signed), nanoseconds cut to 32 bits."""
    sec, dot, nsec = field.partition(b".")
    if sec.isdigit() and nsec.isdigit():
        return min(int(sec), _U64), min(int(nsec), _U64) & _U32
    if not dot:
        raise _LineError(f"invalid mtime {field.decode('latin-1')!r} (expected SEC.NSEC)")
    return _uint(sec, "mtime seconds"), _uint(nsec, "mtime nanoseconds") & _U32


_HEX64 = re.compile(rb"[0-9a-fA-F]{64}")


class DumpParser:
    """Builds a tree from dump lines the way mkcomposefs 1.0.8 does (tree_from_dump_line):
    fields left off the end of a line are empty, numbers are strtoull()ed and cut to the
    width the reference stores them in, hardlinks are resolved once all lines are read."""

    def __init__(self, source_name: str, strict: bool = False):
        self.source_name = source_name
        self.strict = strict
        self.root: Node | None = None
        self.hardlinks: list[tuple[int, Node, bytes | None]] = []
        self._dirs: dict[bytes, Node] = {}      # parent path as written -> its directory
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

    def _parse_line(self, line: bytes) -> None:
        if b"\0" in line:
            raise _LineError("NUL byte in line")
        fields = line.split(b" ", _N_FIXED)
        xattr_part = fields[_N_FIXED] if len(fields) > _N_FIXED else b""
        if len(fields) < _N_FIXED:
            fields += [b""] * (_N_FIXED - len(fields))
        (path_f, size_f, mode_f, nlink_f, uid_f, gid_f, rdev_f, mtime_f,
         payload_f, content_f, digest_f) = fields[:_N_FIXED]

        path = _c_string(path_f, "path")
        if not path:
            raise _LineError("empty path")

        is_hardlink = mode_f[:1] == b"@"
        mode = _uint(mode_f[1:] if is_hardlink else mode_f, "mode", 8) & _U32
        node = Node(mode)
        node.validate_mode()
        self._insert(path, node)

        if is_hardlink:
            if node.is_dir():
                raise _LineError("directories can't be hardlinked")
            node.children = None
            self.hardlinks.append((self._lineno, node, _optional(payload_f, "hardlink target")))
            return

        if (size_f.isdigit() and nlink_f.isdigit() and uid_f.isdigit() and gid_f.isdigit()
                and rdev_f.isdigit()):                          # the common case, in one go
            size, nlink, uid, gid, rdev = map(int, (size_f, nlink_f, uid_f, gid_f, rdev_f))
            if max(size, nlink, uid, gid, rdev) > _U64:
                size, nlink, uid, gid, rdev = (min(v, _U64) for v in (size, nlink, uid, gid, rdev))
        else:
            size = _uint(size_f, "size")
            nlink = _uint(nlink_f, "nlink")
            uid = _uint(uid_f, "uid")
            # The reference ignores a bad GID or RDEV when the UID is not 0 (it tests the
            # wrong variable); both are refused here.
            gid = _uint(gid_f, "gid")
            rdev = _uint(rdev_f, "rdev")
        node.nlink = nlink & _U32
        node.uid = uid & _U32
        node.gid = gid & _U32
        node.mtime_sec, node.mtime_nsec = _parse_mtime(mtime_f)
        ftype = stat.S_IFMT(mode)
        payload = _optional(payload_f, "payload")
        content = _optional(content_f)
        if content is not None and len(content) != size:
            raise _LineError(f"inline content length {len(content)} does not match size {size}")
        if digest_f != b"-":
            digest = unescape(digest_f)
            if _HEX64.fullmatch(digest):
                node.digest = bytes.fromhex(digest.decode("ascii"))
            elif ftype == stat.S_IFREG and size and content is None:
                # The reference ignores digest_to_raw()'s error: the image would carry
                # uninitialised bytes (or the first 32 of a longer digest). Where no digest is
                # written (anything but a file with external data) it is ignored, as there.
                raise _LineError(f"digest must be 64 hex digits, got {digest_f.decode('latin-1')!r}")

        if ftype == stat.S_IFCHR or ftype == stat.S_IFBLK:
            node.rdev = rdev & _U32
        elif self.strict and rdev != 0:
            raise _LineError("rdev must be 0 for a file that is not a device")

        if ftype == stat.S_IFLNK:
            if not payload or len(payload) > SYMLINK_MAX:
                n = len(payload or b"")
                raise _LineError(f"invalid symlink: target length {n} (must be 1..{SYMLINK_MAX})")
            if self.strict:
                if size != len(payload):
                    raise _LineError(f"symlink size {size} does not match its target length {len(payload)}")
                if content:
                    raise _LineError("symlink with inline content")
            node.size = len(payload)
            node.payload = payload
        else:
            node.size = size
            if payload is not None and len(payload) >= PATH_MAX:
                raise _LineError(f"payload of {len(payload)} bytes (must be under {PATH_MAX})")
            node.payload = payload
            if content:
                if len(content) > INLINE_CONTENT_MAX:
                    raise _LineError(f"inline content size {len(content)} exceeds maximum {INLINE_CONTENT_MAX}")
                node.content = content
            elif ftype == stat.S_IFREG and chunk_count(size) > MAX_CHUNKS:
                raise _LineError(f"file too large ({size} bytes: more than {MAX_CHUNKS} chunks of 2^43 bytes)")

        if xattr_part:
            if len(xattr_part) > MAX_XATTR_LINE:
                raise _LineError(f"too many xattrs ({len(xattr_part)} bytes of xattrs on one line, max {MAX_XATTR_LINE})")
            items = xattr_part.split(b" ")
            if not items[-1]:           # one space after the last xattr ends the line
                items.pop()
            for item in items:
                key, eq, value = item.partition(b"=")
                if not eq:
                    raise _LineError(f"missing '=' in xattr {item.decode('latin-1')!r}")
                key = _c_string(key, "xattr name")
                node.set_xattr(key, unescape(value))

    def _parent(self, path: bytes) -> tuple[Node, bytes]:
        """lookup_parent_path(): leading and repeated slashes are skipped; the last
        component (possibly empty) is the name."""
        head, _, name = path.rpartition(b"/")
        parent = self._dirs.get(head)
        if parent is None:
            node = self.root
            for part in head.split(b"/"):
                if part:
                    node = node.children.get(part) if node.children else None
                    if node is None:
                        raise _LineError(f"parent directory of {_show(path)} not found")
            if not node.is_dir():
                raise _LineError(f"parent of {_show(path)} is not a directory")
            parent = self._dirs[head] = node
        return parent, name

    def _insert(self, path: bytes, node: Node) -> None:
        """tree_add_node(): "/" is the root; any other path is looked up from the root."""
        if path == b"/":
            if not node.is_dir():
                raise _LineError("root '/' must be a directory")
            if self.root is not None:
                raise _LineError("duplicate root entry '/'")
            self.root = node
            return
        if self.root is None:
            raise _LineError("the first entry must be the root directory '/'")
        parent, name = self._parent(path)
        if name in (b".", b".."):
            raise _LineError("invalid '.' or '..' in path")
        if not name:
            raise _LineError("empty file name in path")
        if len(name) > NAME_MAX:
            raise _LineError(f"file name of {len(name)} bytes exceeds {NAME_MAX}")
        if name in parent.children:
            raise _LineError(f"duplicate entry {_show(path)}")
        parent.add_child(name, node)

    def finish(self, last_lineno: int) -> Node:
        """Resolve hardlinks as tree_resolve_hardlinks() does (last line first), then point
        each at the inode at the end of its chain."""
        if self.root is None:
            raise self.error(last_lineno, "no root entry '/' in dump")
        links: dict[int, Node] = {}             # id(hardlink node) -> the node its line names
        for lineno, node, target_path in reversed(self.hardlinks):
            if target_path is None:
                raise self.error(lineno, "hardlink without a target path")
            target = self.root.lookup(target_path)
            if target is None:
                raise self.error(lineno, f"hardlink target {_show(target_path)} of {_show(node.path())} not found")
            if target is node:
                raise self.error(lineno, f"self-referential hardlink {_show(node.path())}")
            links[id(node)] = target
        for lineno, node, _ in self.hardlinks:
            target, steps = links[id(node)], 0
            while id(target) in links:
                target, steps = links[id(target)], steps + 1
                if steps > len(links):
                    raise self.error(lineno, f"hardlink loop at {_show(node.path())}")
            if target.is_dir():
                # The reference writes an image with the directory linked twice (a loop when
                # it is an ancestor): refused.
                raise self.error(lineno, f"hardlink {_show(node.path())} to a directory")
            node.link_to = target
            node.mode = target.mode
        return self.root


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


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
