"""Tar archives (plain, gzip, zstd) into a tree, in memory, never extracting anything.

Members are read in one streaming pass (``tarfile`` in ``r|`` mode over our own
decompressors, which check gzip CRCs and detect truncated zstd frames). Regular files of
1..inline_max bytes become inline content; larger ones are streamed straight into the object
store (``ObjectStore.add_stream_info``), which is the only thing ever written.

Semantics (those of extracting with GNU tar as root, onto an empty directory):

* metadata from the headers: mode (type from the member type, permission bits including
  setuid/setgid/sticky), numeric uid/gid (names are ignored), mtime with the nanoseconds of a
  pax ``mtime``, xattrs from pax ``SCHILY.xattr.*`` (and libarchive's ``LIBARCHIVE.xattr.*``:
  URL-encoded name, base64 value); ACLs stored as ``SCHILY.acl.*`` text are not converted;
* a later member with the same path replaces the earlier one (and its subtree); a directory
  replacing a directory only takes its metadata (mode, owner, mtime, xattrs) and keeps the
  children;
* hardlinks become aliases (``link_to``) of the earlier member they name, which must exist
  and not be a directory; nlink is the number of names;
* parent directories missing from the archive are created with mode 0755, owner 0:0, mtime 0
  (and a missing root too: an archive made with ``tar -C DIR .`` has a ``./`` member that
  gives the root its metadata);
* OCI layers add whiteouts: ``.wh.NAME`` removes NAME (with its subtree) of the lower layers,
  ``.wh..wh..opq`` empties its directory of everything from lower layers (entries of the
  same layer stay, before or after the marker); ``.wh..wh.*`` aufs metadata is skipped.

Refused (SourceError naming the archive and member): empty names, NUL bytes, absolute
names, any '..' component (GNU tar skips such members too; ``a/../b`` included), components
over 255 bytes or paths over 4096; a member below a symlink or non-directory (``a -> /etc``
then ``a/passwd``: we never resolve symlinks, and a real extraction would write through it);
hardlinks whose target is absolute, has '..', is missing, a directory, or below a symlink;
devices and FIFOs when the policy forbids them; unsupported member types (sparse files,
volume labels, ...); a file over max_file_size, data over max_total_size, more entries than
max_entries; pax or long-name headers over 1 MiB; malformed pax records; an archive that ends
without its end-of-archive block or mid-member (truncated), corrupt gzip or zstd data; xz and
bzip2 compression.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import os
import re
import stat
import tarfile
import urllib.parse
import zlib
from typing import BinaryIO

import zstandard

from .._perf import gc_paused
from ..composefs import fsverity
from ..composefs.store import ObjectStore
from ..composefs.tree import NAME_MAX, PATH_MAX, SYMLINK_MAX, Node
from ..errors import BootimgError, FormatError
from .common import LoadedSource, SourceError, SourcePolicy, SourceStats, show
from .treeops import IMPLICIT_DIR_MODE, fix_hardlinks, remove_node, tree_stats

HEADER_MAX = 1 << 20          # pax extended header / GNU long name: plenty for 4 KiB paths and xattrs
TRAILING_MAX = 16 << 20       # data tolerated after the end-of-archive block (record padding)
_READ = 1 << 20
_IN_MEMORY_MAX = 4 << 20      # files up to this size are hashed in memory before storing

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"

_REGULAR = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE))
_TYPE_NAMES = {
    tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO",
}
_FMT = {
    tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO,
}


# -- decompression --------------------------------------------------------------------------------

class _Refused(Exception):
    """Raised inside tarfile's header parsing (it lets other exceptions through)."""


class _Prefixed:
    """A reader that first returns ``head`` (the bytes read to sniff the format)."""

    def __init__(self, head: bytes, f: BinaryIO):
        self.head = head
        self.f = f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                out, self.head = self.head + self.f.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.f.read(n)


class _ZstdReader:
    """Streaming zstd decompression of any number of frames that, unlike the library's
    stream_reader, reports a stream that ends inside a frame (truncation). Input is fed 1 KiB
    at a time, so even a decompression bomb yields at most ~32 MiB per step."""

    FEED = 1024

    def __init__(self, f: BinaryIO):
        self.f = f
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = self.dctx.decompressobj()
        self.in_frame = False
        self.pending = b""
        self.ppos = 0
        self.buf = bytearray()

    def _step(self) -> bool:
        if self.ppos >= len(self.pending):
            self.pending = self.f.read(64 << 10)
            self.ppos = 0
            if not self.pending:
                if self.in_frame:
                    raise EOFError("zstd data ends inside a frame (truncated)")
                return False
        chunk = self.pending[self.ppos:self.ppos + self.FEED]
        self.ppos += len(chunk)
        self.buf += self.obj.decompress(chunk)
        self.in_frame = True
        while self.obj.eof:
            rest = self.obj.unused_data
            self.obj = self.dctx.decompressobj()
            self.in_frame = False
            if rest:
                self.buf += self.obj.decompress(rest)
                self.in_frame = True
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._step():
                pass
            n = len(self.buf)
        while len(self.buf) < n and self._step():
            pass
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class _Sha256Reader:
    """Passes data through, hashing it (an OCI layer's diff_id is the uncompressed tar's)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


def sniff(raw: BinaryIO) -> tuple[str, BinaryIO]:
    """("tar" | "gzip" | "zstd" | "xz" | "bzip2", a reader that still yields every byte)."""
    head = b""
    while len(head) < 6:
        more = raw.read(6 - len(head))
        if not more:
            break
        head += more
    if head.startswith(GZIP_MAGIC):
        kind = "gzip"
    elif head.startswith(ZSTD_MAGIC):
        kind = "zstd"
    elif head.startswith(XZ_MAGIC):
        kind = "xz"
    elif head.startswith(BZIP2_MAGIC):
        kind = "bzip2"
    else:
        kind = "tar"
    return kind, _Prefixed(head, raw)


def decompressor(kind: str, reader: BinaryIO) -> BinaryIO:
    if kind == "gzip":
        return gzip.GzipFile(fileobj=reader, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        return _ZstdReader(reader)  # type: ignore[return-value]
    if kind == "tar":
        return reader
    raise _Refused(f"{kind}-compressed archives are not supported (use none, gzip or zstd)")


# -- tarfile with limits and an exact end-of-archive check ---------------------------------------

_PAX_LEN = re.compile(rb"([0-9]{1,20}) ")
_PAX_NAME_FIELDS = frozenset(("path", "linkpath", "uname", "gname"))
_PAX_INT = re.compile(r"[0-9]{1,20}")
_PAX_TIME = re.compile(r"(-?)([0-9]{1,20})(?:\.([0-9]*))?")


def _decode(raw: bytes, encoding: str, errors: str) -> str:
    """Like tarfile: strict first, then UTF-8 with the archive's error handler (surrogateescape,
    so that encoding back gives the original bytes)."""
    try:
        return raw.decode(encoding, "strict")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors)


class _Member(tarfile.TarInfo):
    """tarfile's header parsing with: the way the archive ended recorded (an all-zero block,
    or EOF / a truncated or invalid header, which tarfile silently takes for the end); size
    limits on pax and GNU long-name headers; a linear, strict pax parser (the one of
    Python < 3.11.10 has quadratic regexes); sparse files refused."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> "tarfile.TarInfo":
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf._bootimg_end = "marker"  # type: ignore[attr-defined]
            raise
        except tarfile.EmptyHeaderError:
            tf._bootimg_end = "the archive ends without an end-of-archive block (truncated?)"  # type: ignore[attr-defined]
            raise
        except tarfile.TruncatedHeaderError:
            tf._bootimg_end = "the archive ends inside a header (truncated)"  # type: ignore[attr-defined]
            raise
        except tarfile.InvalidHeaderError as e:
            tf._bootimg_end = f"invalid header ({e})"  # type: ignore[attr-defined]
            raise

    def _proc_member(self, tf: tarfile.TarFile) -> "tarfile.TarInfo":
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if self.size > HEADER_MAX:
                raise _Refused(f"GNU long-name header of {self.size} bytes (limit {HEADER_MAX})")
            return super()._proc_member(tf)
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            return self._proc_pax_strict(tf)
        return super()._proc_member(tf)

    def _proc_pax_strict(self, tf: tarfile.TarFile) -> "tarfile.TarInfo":
        if self.size > HEADER_MAX:
            raise _Refused(f"pax header of {self.size} bytes (limit {HEADER_MAX})")
        buf = tf.fileobj.read(self._block(self.size))
        if len(buf) < self.size:
            raise tarfile.ReadError("unexpected end of data")
        buf = buf[:self.size]
        records = []
        pos = 0
        charset = None
        while pos < len(buf) and buf[pos] != 0:
            m = _PAX_LEN.match(buf, pos)
            length = int(m.group(1)) if m else 0
            end = pos + length
            if not m or length < 5 or end > len(buf) or buf[end - 1] != 0x0A:
                raise _Refused("malformed pax header record")
            key, eq, value = buf[m.end():end - 1].partition(b"=")
            if not key or not eq:
                raise _Refused("malformed pax header record")
            if key == b"hdrcharset" and charset is None:
                charset = tf.encoding if value == b"BINARY" else "utf-8"
            records.append((key, value))
            pos = end
        charset = charset or "utf-8"
        problem = None
        pax = tf.pax_headers if self.type == tarfile.XGLTYPE else tf.pax_headers.copy()
        for raw_key, raw_value in records:
            key = _decode(raw_key, "utf-8", tf.errors)
            if key in _PAX_NAME_FIELDS:
                value = _decode(raw_value, charset, tf.errors)
            else:
                value = _decode(raw_value, "utf-8", tf.errors)
            if key.startswith("GNU.sparse."):
                problem = "sparse files are not supported"   # refused with the member's name
            if key in ("size", "uid", "gid") and not _PAX_INT.fullmatch(value):
                raise _Refused(f"invalid pax {key} {value[:40]!r}")
            if key == "mtime" and not _PAX_TIME.fullmatch(value):
                raise _Refused(f"invalid pax mtime {value[:40]!r}")
            pax[key] = value
        try:
            nxt = self.fromtarfile(tf)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None
        if problem is not None:
            nxt.bootimg_problem = problem  # type: ignore[attr-defined]
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            nxt._apply_pax_info(pax, tf.encoding, tf.errors)  # type: ignore[attr-defined]
            nxt.offset = self.offset
            if "size" in pax:
                offset = nxt.offset_data
                if nxt.isreg() or nxt.type not in tarfile.SUPPORTED_TYPES:
                    offset += nxt._block(nxt.size)  # type: ignore[attr-defined]
                tf.offset = offset
        return nxt


def _mtime(m: tarfile.TarInfo) -> tuple[int, int]:
    raw = m.pax_headers.get("mtime")
    if raw is None:
        sec, nsec = int(m.mtime), 0
    else:
        neg, whole, frac = _PAX_TIME.fullmatch(raw).groups()  # validated while parsing
        ns = int(whole) * 1_000_000_000 + int(((frac or "") + "000000000")[:9])
        sec, nsec = divmod(-ns if neg else ns, 1_000_000_000)
    return sec % (1 << 64), nsec     # pre-1970 times wrap like a directory scan's


_GNU_XATTR_ESC = re.compile(rb"%3D|%25")


def _xattrs(m: tarfile.TarInfo) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # GNU tar writes '=' and '%' of xattr names as %3D and %25 (pax keywords cannot
            # hold '='); it decodes only those two, and so do we.
            name = _GNU_XATTR_ESC.sub(lambda mo: b"=" if mo.group() == b"%3D" else b"%",
                                      key[13:].encode("utf-8", "surrogateescape"))
            if name not in out:
                out[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[17:])
            try:
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"invalid base64 in pax {key}") from None
    return out


def split_name(name: bytes, what: str = "path") -> list[bytes]:
    """Validate an archive path and split it into components ([] for the root).
    Raises ValueError with the problem."""
    if not name:
        raise ValueError(f"empty {what}")
    if b"\0" in name:
        raise ValueError(f"{what} contains a NUL byte")
    if name.startswith(b"/"):
        raise ValueError(f"absolute {what}")
    if len(name) > PATH_MAX:
        raise ValueError(f"{what} longer than {PATH_MAX} bytes")
    parts = []
    for comp in name.split(b"/"):
        if comp == b"..":
            raise ValueError(f"{what} contains '..'")
        if comp in (b"", b"."):
            continue
        if len(comp) > NAME_MAX:
            raise ValueError(f"{what} has a component longer than {NAME_MAX} bytes")
        parts.append(comp)
    return parts


# -- the tree builder -----------------------------------------------------------------------------

class TreeBuilder:
    """Applies tar streams, in order, onto one tree (one archive, or an image's layers)."""

    def __init__(self, store: ObjectStore, policy: SourcePolicy, label: str):
        policy.check()
        self.store = store
        self.policy = policy
        self.label = label
        self.allow_devices = policy.devices_allowed(label)
        self.root = Node(IMPLICIT_DIR_MODE)
        self.entries = 0
        self.total = 0
        self.objects_added = 0
        self.bytes_added = 0
        self.has_links = False
        # Per archive:
        self.file = ""
        self.context: str | None = None
        self.whiteouts = False
        self.touched: set[bytes] | None = None

    # -- errors ---------------------------------------------------------------------------------
    def error(self, problem: str, member: bytes | str | None = None) -> SourceError:
        return SourceError(problem, file=self.file, label=self.label, context=self.context, member=member)

    def _count(self, member: bytes) -> None:
        self.entries += 1
        if self.entries > self.policy.max_entries:
            raise self.error(f"more than {self.policy.max_entries} entries (policy max_entries)", member)

    # -- one archive ----------------------------------------------------------------------------
    def apply(self, raw: BinaryIO, *, file: str, context: str | None = None, whiteouts: bool = False,
              expect: str | None = None) -> str:
        """Read one tar stream (compression sniffed; ``expect`` makes it mandatory) onto the
        tree; returns the sha256 hex of the uncompressed tar."""
        self.file, self.context, self.whiteouts = file, context, whiteouts
        self.touched = set() if whiteouts else None
        current: bytes | None = None   # member whose data is being read
        previous: bytes | None = None  # last member fully read
        try:
            kind, raw = sniff(raw)
            if expect is not None and kind != expect:
                raise _Refused(f"declared as {expect} but the data is {'plain tar' if kind == 'tar' else kind}")
            plain = _Sha256Reader(decompressor(kind, raw))
            with gc_paused():
                tf = tarfile.open(fileobj=plain, mode="r|", tarinfo=_Member,  # type: ignore[call-overload]
                                  encoding="utf-8", errors="surrogateescape")
                while True:
                    m = tf.next()
                    if m is None:
                        break
                    tf.members.clear()   # tarfile keeps every member otherwise
                    current = m.name.encode("utf-8", "surrogateescape")
                    self._member(tf, m, current)
                    previous, current = current, None
            end = getattr(tf, "_bootimg_end", None)
            if end != "marker":
                raise _Refused(end or "the archive ends without an end-of-archive block")
            drained = 0
            while data := plain.read(_READ):
                drained += len(data)
                if drained > TRAILING_MAX:
                    raise _Refused(f"more than {TRAILING_MAX >> 20} MiB of data after the end-of-archive block")
            return plain.sha.hexdigest()
        except SourceError:
            raise
        except _Refused as e:
            raise self._at(str(e), current, previous) from None
        except FormatError as e:
            raise self.error(e.message, current) from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise self._at(f"corrupt gzip data ({e})", current, previous) from None
        except zstandard.ZstdError as e:
            raise self._at(f"corrupt zstd data ({e})", current, previous) from None
        except EOFError as e:
            raise self._at(f"truncated archive ({e})", current, previous) from None
        except tarfile.ReadError as e:
            what = "truncated archive" if "unexpected end" in str(e) else "invalid tar archive"
            raise self._at(f"{what} ({e})", current, previous) from None
        except (tarfile.TarError, ValueError, UnicodeError) as e:
            raise self._at(f"invalid tar archive ({e})", current, previous) from None
        except BootimgError:
            raise
        except OSError as e:
            raise self._at(f"cannot read: {e.strerror or e}", current, previous) from None

    def _at(self, problem: str, current: bytes | None, previous: bytes | None) -> SourceError:
        if current is not None:
            return self.error(problem, current)
        where = f" (after member {show(previous)})" if previous is not None else ""
        return self.error(problem + where)

    # -- one member -----------------------------------------------------------------------------
    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo, name: bytes) -> None:
        self._count(name)
        try:
            parts = split_name(name)
        except ValueError as e:
            raise self.error(str(e), name) from None
        t = m.type
        problem = getattr(m, "bootimg_problem", None)
        if problem is None and t == tarfile.GNUTYPE_SPARSE:
            problem = "sparse files are not supported"
        if problem is not None:
            raise self.error(problem, name)
        if self.whiteouts and parts and parts[-1].startswith(b".wh."):
            self._whiteout(parts, name)
            return
        if self.whiteouts and any(p.startswith(b".wh..wh.") for p in parts):
            return   # inside aufs metadata (.wh..wh.plnk/...)
        if t not in _REGULAR and t not in _FMT and t != tarfile.LNKTYPE:
            raise self.error(f"unsupported member type {t.decode('latin-1')!r}", name)
        if t in _TYPE_NAMES and not self.allow_devices:
            raise self.error(f"{_TYPE_NAMES[t]} not allowed in this source (policy allow_devices)", name)
        if t in _REGULAR:
            if m.size > self.policy.max_file_size:
                raise self.error(f"file of {m.size} bytes exceeds the limit of {self.policy.max_file_size} "
                                 "(policy max_file_size)", name)
            self.total += m.size
            if self.total > self.policy.max_total_size:
                raise self.error(f"more than {self.policy.max_total_size} bytes of file data "
                                 "(policy max_total_size)", name)
        if not 0 <= m.uid < 1 << 32 or not 0 <= m.gid < 1 << 32:
            raise self.error(f"uid/gid {m.uid}/{m.gid} out of range", name)

        if not parts:
            if t != tarfile.DIRTYPE:
                raise self.error("the archive root must be a directory", name)
            self._set_meta(self.root, m, stat.S_IFDIR)
            return
        parent = self._parent(parts[:-1], name)
        base = parts[-1]
        old = parent.children.get(base)

        if t == tarfile.DIRTYPE and old is not None and old.is_dir() and old.link_to is None:
            self._set_meta(old, m, stat.S_IFDIR)
            self._touch(parts)
            return
        if t == tarfile.LNKTYPE:
            node = self._hardlink(m, name)
        else:
            fmt = stat.S_IFREG if t in _REGULAR else _FMT[t]
            node = Node(fmt)
            self._set_meta(node, m, fmt)
            if fmt == stat.S_IFREG:
                self._file_data(tf, m, node, name)
            elif fmt == stat.S_IFLNK:
                target = m.linkname.encode("utf-8", "surrogateescape")
                if not target or b"\0" in target or len(target) > SYMLINK_MAX:
                    raise self.error(f"invalid symlink target of {len(target)} bytes", name)
                node.payload = target
                node.size = len(target)
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                if not (0 <= m.devmajor < 1 << 12 and 0 <= m.devminor < 1 << 20):
                    raise self.error(f"device number {m.devmajor}:{m.devminor} out of range", name)
                node.rdev = os.makedev(m.devmajor, m.devminor)
        if old is not None:
            remove_node(old)
        parent.add_child(base, node)
        self._touch(parts)

    def _set_meta(self, node: Node, m: tarfile.TarInfo, fmt: int) -> None:
        node.mode = fmt | (m.mode & 0o7777)
        node.uid, node.gid = m.uid, m.gid
        node.mtime_sec, node.mtime_nsec = _mtime(m)
        node.xattrs = {}
        for key, value in _xattrs(m).items():
            node.set_xattr(key, value)

    def _file_data(self, tf: tarfile.TarFile, m: tarfile.TarInfo, node: Node, name: bytes) -> None:
        size = m.size
        node.size = size
        if size == 0:
            return
        f = tf.extractfile(m)
        assert f is not None
        if size <= self.policy.inline_max:
            data = f.read(size)
            if len(data) != size:
                raise EOFError(f"data ended after {len(data)} of {size} bytes")
            node.content = data
            return
        if size <= _IN_MEMORY_MAX:
            # Small enough to hold: hash first, and skip the temp file when the object exists.
            data = f.read(size)
            if len(data) != size:
                raise EOFError(f"data ended after {len(data)} of {size} bytes")
            digest = fsverity.digest(data)
            created = not self.store.has(digest)
            if created:
                self.store.add_bytes(data)
        else:
            digest, created = self.store.add_stream_info(f, size)
        node.digest = digest
        node.payload = fsverity.object_name(digest).encode()
        if created:
            self.objects_added += 1
            self.bytes_added += size

    def _hardlink(self, m: tarfile.TarInfo, name: bytes) -> Node:
        raw = m.linkname.encode("utf-8", "surrogateescape")
        try:
            parts = split_name(raw, f"hardlink target {show(raw)}")
        except ValueError as e:
            raise self.error(str(e), name) from None
        node: Node | None = self.root
        for comp in parts:
            assert node is not None
            if node.link_to is not None or not node.is_dir():
                raise self.error(f"hardlink target {show(raw)} is below a symlink or non-directory", name)
            node = node.children.get(comp)
            if node is None:
                raise self.error(f"hardlink target {show(raw)} not found (it must be an earlier member)", name)
        assert node is not None
        target = node.target()
        if target.is_dir():
            raise self.error(f"hardlink target {show(raw)} is a directory", name)
        alias = Node(target.mode)
        alias.link_to = target
        self.has_links = True
        return alias

    def _parent(self, parts: list[bytes], name: bytes) -> Node:
        """The directory parts name, created (0755, 0:0, mtime 0) where missing."""
        node = self.root
        path = b""
        for comp in parts:
            path = path + b"/" + comp if path else comp
            child = node.children.get(comp)
            if child is None:
                self._count(name)
                child = node.add_child(comp, Node(IMPLICIT_DIR_MODE))
            elif child.link_to is not None or not child.is_dir():
                real = child.target()
                if real.is_symlink():
                    raise self.error(f"parent {show(path)} is a symlink (to {show(real.payload or b'')}); "
                                     "refusing to write through it", name)
                raise self.error(f"parent {show(path)} is not a directory", name)
            if self.touched is not None:
                self.touched.add(path)
            node = child
        return node

    def _touch(self, parts: list[bytes]) -> None:
        if self.touched is not None:
            self.touched.add(b"/".join(parts))

    # -- OCI whiteouts ----------------------------------------------------------------------------
    def _whiteout(self, parts: list[bytes], name: bytes) -> None:
        base = parts[-1]
        if base == b".wh..wh..opq":
            d = self._parent(parts[:-1], name)
            self._prune(d, b"/".join(parts[:-1]))
            return
        if base.startswith(b".wh..wh."):
            return   # aufs metadata
        victim_name = base[4:]
        if victim_name in (b"", b".", b".."):
            raise self.error("invalid whiteout name", name)
        d = self._parent(parts[:-1], name)
        victim = d.children.get(victim_name)
        if victim is None:
            return
        vpath = b"/".join(parts[:-1] + [victim_name])
        assert self.touched is not None
        if vpath in self.touched:
            # Whiteouts only hide lower layers: a same-layer entry stays.
            if victim.is_dir() and victim.link_to is None:
                self._prune(victim, vpath)
            return
        remove_node(victim)

    def _prune(self, d: Node, dpath: bytes) -> None:
        """Remove from d's subtree everything that does not come from the current layer."""
        assert self.touched is not None
        stack = [(d, dpath)]
        while stack:
            node, path = stack.pop()
            for cname, child in list(node.children.items()):
                cpath = path + b"/" + cname if path else cname
                if cpath in self.touched:
                    if child.is_dir() and child.link_to is None:
                        stack.append((child, cpath))
                else:
                    remove_node(child)

    # -- result -----------------------------------------------------------------------------------
    def finish(self) -> Node:
        if self.has_links:
            fix_hardlinks(self.root)
        return self.root

    def stats(self) -> SourceStats:
        t = tree_stats(self.root)
        return SourceStats(entries=t.entries, files=t.files, bytes=t.bytes,
                           objects_added=self.objects_added, bytes_added=self.bytes_added)


def load_tar(path: str | os.PathLike[str], store: ObjectStore, policy: SourcePolicy = SourcePolicy(),
             label: str = "rootfs") -> LoadedSource:
    """A tar archive (plain, gzip or zstd, told apart by their magic bytes) as a tree."""
    file = os.fspath(path)
    builder = TreeBuilder(store, policy, label)
    try:
        f = open(file, "rb")
    except OSError as e:
        raise SourceError(f"cannot open: {e.strerror}", file=file, label=label) from None
    with f:
        if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
            raise SourceError("is a directory, not a tar archive", file=file, label=label)
        builder.apply(f, file=file)
    root = builder.finish()
    return LoadedSource(root=root, stats=builder.stats())
