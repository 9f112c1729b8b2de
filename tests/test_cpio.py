"""bootimg.disk.cpio: an initramfs read as the kernel unpacks it (the bench's whole-initramfs
figures). The archives are written here in the newc format the kernel reads (no cpio(1) on the
build host), compressed by Python's own compressors."""

from __future__ import annotations

import gzip
import lzma

import pytest

from bootimg.disk.cpio import read_initramfs
from bootimg.errors import BootimgError


def newc(tmp_path, files: dict[str, bytes], name: str) -> bytes:
    """A newc archive of regular files (and its trailer), padded as cpio -H newc pads it."""
    out = bytearray()

    def member(path: str, mode: int, data: bytes, ino: int) -> None:
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(path) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + path.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4) + data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (path, data) in enumerate(sorted(files.items()), 1):
        member(path, 0o100644, data, ino)
    member("TRAILER!!!", 0, b"", 0)
    return bytes(out + b"\0" * (-len(out) % 512))


def test_an_early_plain_archive_then_a_compressed_one(tmp_path):
    early = newc(tmp_path, {"kernel/x86/microcode/GenuineIntel.bin": b"u" * 1000}, "early")
    main = newc(tmp_path, {"usr/bin/init": b"\x7fELF" + b"i" * 5000, "etc/initrd-release": b"ID=t\n"}, "main")
    image = tmp_path / "initrd.img"
    image.write_bytes(early + b"\0" * 512 + lzma.compress(main, check=lzma.CHECK_CRC32))
    r = read_initramfs(image)
    assert [s.compression for s in r.segments] == [None, "xz"]
    assert r.compression == "xz" and r.size == image.stat().st_size
    assert r.segments[1].cpio_size == len(main) and len(early) - 512 < r.segments[0].cpio_size <= len(early)
    assert r.uncompressed_size == r.segments[0].cpio_size + len(main)
    assert r.files() == {"kernel/x86/microcode/GenuineIntel.bin": 1000, "usr/bin/init": 5004, "etc/initrd-release": 5}
    assert read_initramfs(image, contents=True).contents()["etc/initrd-release"] == b"ID=t\n"


def test_a_gzip_stream_of_several_members_is_read_to_its_end(tmp_path):
    one = newc(tmp_path, {"a": b"A" * 10}, "one")
    two = newc(tmp_path, {"b": b"B" * 20}, "two")
    image = tmp_path / "initrd.img"
    image.write_bytes(gzip.compress(one, mtime=0) + gzip.compress(two, mtime=0))
    r = read_initramfs(image)
    assert len(r.segments) == 1 and r.files() == {"a": 10, "b": 20}


@pytest.mark.parametrize("data, message", [
    (b"not an initramfs", "not an initramfs: unknown data at offset 0"),
    (b"\x1f\x8b\x07\x00broken", "corrupt gzip data at offset 0"),
])
def test_what_is_no_initramfs_is_one_line(tmp_path, data, message):
    image = tmp_path / "initrd.img"
    image.write_bytes(data)
    with pytest.raises(BootimgError) as err:
        read_initramfs(image)
    assert str(err.value).startswith(f"{image}: {message}")


def test_a_truncated_archive_is_refused(tmp_path):
    image = tmp_path / "initrd.img"
    image.write_bytes(gzip.compress(newc(tmp_path, {"a": b"A" * 100}, "a"), mtime=0)[:-12])
    with pytest.raises(BootimgError, match="truncated gzip data"):
        read_initramfs(image)
