"""An initramfs as the kernel unpacks it: newc cpio archives one after another, each plain or
compressed, with zero padding between them (dracut writes an uncompressed early archive, e.g.
for microcode, before the compressed main one).

``read_initramfs`` gives the whole picture: its size in the file and uncompressed, the
compressor, and every member. The compressors are Python's own (gzip, xz, lzma, bzip2) and
zstandard (a bootimg dependency); an archive compressed with lz4 or lzo is reported with its
uncompressed size unknown.
"""

from __future__ import annotations

import bz2
import lzma
import os
import zlib
from dataclasses import dataclass, field

from ..errors import BootimgError

CPIO_MAGICS = (b"070701", b"070702")
HEADER = 110
TRAILER = "TRAILER!!!"
# How the kernel tells a compressed archive (lib/decompress.c).
COMPRESSED_MAGICS = (
    (b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"), (b"\x02\x21\x4c\x18", "lz4"), (b"\x89LZO", "lzo"),
)


@dataclass(frozen=True)
class Member:
    name: str
    mode: int
    size: int
    data: bytes | None = None       # its content, when read with ``contents=True``


@dataclass(frozen=True)
class Segment:
    offset: int
    size: int                       # bytes in the file
    compression: str | None         # None: a plain cpio archive
    cpio_size: int | None           # bytes of cpio it holds (None: a compressor read here cannot)


@dataclass
class Initramfs:
    size: int
    segments: list[Segment] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)

    @property
    def compression(self) -> str | None:
        """The compressor of its (last) compressed archive; None when nothing is compressed."""
        found = [s.compression for s in self.segments if s.compression]
        return found[-1] if found else None

    @property
    def uncompressed_size(self) -> int | None:
        """Bytes the kernel unpacks: every archive's cpio (None when one cannot be read here)."""
        sizes = [s.cpio_size for s in self.segments]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    def files(self) -> dict[str, int]:
        """{path: size} of its regular files (a later archive's member replaces an earlier one)."""
        return {m.name: m.size for m in self.members if m.mode & 0o170000 == 0o100000}

    def contents(self) -> dict[str, bytes]:
        """{path: content} of its regular files (read with ``contents=True``)."""
        return {m.name: m.data or b"" for m in self.members if m.mode & 0o170000 == 0o100000}


def read_initramfs(path: str | os.PathLike[str], *, contents: bool = False) -> Initramfs:
    """Every archive of the initramfs at ``path`` (with each member's content when ``contents``);
    BootimgError for what is no initramfs."""
    with open(path, "rb") as f:
        data = f.read()
    result = Initramfs(len(data))
    pos = 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:
            pos += 1                       # padding between archives
        if pos >= len(data):
            break
        if data[pos:pos + 6] in CPIO_MAGICS:
            end = _members(data, pos, result.members, str(path), contents)
            result.segments.append(Segment(pos, end - pos, None, end - pos))
            pos = end
            continue
        kind = next((name for magic, name in COMPRESSED_MAGICS if data.startswith(magic, pos)), None)
        if kind is None:
            raise BootimgError(f"not an initramfs: unknown data at offset {pos}", file=str(path))
        if kind in ("lz4", "lzo"):
            result.segments.append(Segment(pos, len(data) - pos, kind, None))
            break
        payload, used = _decompress(kind, data, pos, str(path))
        result.segments.append(Segment(pos, used, kind, len(payload)))
        cpos = 0
        while cpos < len(payload):
            while cpos < len(payload) and payload[cpos] == 0:
                cpos += 1
            if cpos < len(payload):
                cpos = _members(payload, cpos, result.members, str(path), contents)
        pos += used
    return result


def _decompress(kind: str, data: bytes, pos: int, file: str) -> tuple[bytes, int]:
    """(what the compressed stream at ``pos`` holds, its length in ``data``); a stream of several
    frames or members of the same compressor is read to its end, as the kernel does."""
    out: list[bytes] = []
    start = pos
    magic = next(m for m, name in COMPRESSED_MAGICS if name == kind)
    while pos < len(data) and data.startswith(magic, pos):
        if kind == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif kind == "zstd":
            import zstandard

            d = zstandard.ZstdDecompressor().decompressobj()
        elif kind in ("xz", "lzma"):
            d = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
        else:
            d = bz2.BZ2Decompressor()
        try:
            out.append(d.decompress(data[pos:]))
        except (zlib.error, lzma.LZMAError, OSError, ValueError) as err:
            raise BootimgError(f"corrupt {kind} data at offset {pos}: {err}", file=file) from None
        if not d.eof:
            raise BootimgError(f"truncated {kind} data at offset {pos}", file=file)
        pos = len(data) - len(d.unused_data)
        if kind in ("lzma", "bzip2"):
            break
    return b"".join(out), pos - start


def _members(data: bytes, pos: int, members: list[Member], file: str, contents: bool = False) -> int:
    """Read the newc archive at ``pos`` into ``members``; the offset after its trailer."""
    while True:
        if data[pos:pos + 6] not in CPIO_MAGICS or pos + HEADER > len(data):
            raise BootimgError(f"not a newc cpio header at offset {pos}", file=file)
        try:
            mode, filesize, namesize = (int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in (1, 6, 11))
        except ValueError:
            raise BootimgError(f"malformed cpio header at offset {pos}", file=file) from None
        name = data[pos + HEADER: pos + HEADER + namesize - 1].decode("utf-8", "replace")
        pos = (pos + HEADER + namesize + 3) & ~3
        if name == TRAILER:
            return pos
        members.append(Member(name, mode, filesize, bytes(data[pos:pos + filesize]) if contents else None))
        pos = (pos + filesize + 3) & ~3
        if pos > len(data):
            raise BootimgError(f"truncated cpio member {name!r}", file=file)
