"""Generate real source trees with every file type and the awkward corners of metadata, and
describe them as a composefs dump *independently* of bootimg's scanner (os.lstat plus the
`fsverity` tool's digests), so directory-mode images can be checked against dump-mode ones."""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
from pathlib import Path

INLINE_MAX = 64


def _set_time(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def make_tree(top: Path, seed: int = 1, with_devices: bool = True, with_trusted: bool = True) -> Path:
    """Create a tree under ``top`` (which must not exist); returns top."""
    rnd = random.Random(seed)
    top.mkdir()
    dirs = [top]
    for name in ["a", "b c", "deep", "deep/er", "deep/er/est", "odd-modes", "empty", "\u00e9t\u00e9"]:
        (top / name).mkdir(exist_ok=True)
        dirs.append(top / name)
    # Regular files: every size class of the inline/external and block-tail rules.
    sizes = [0, 1, 12, 63, 64, 65, 2048, 2049, 4095, 4096, 4097, 5000, 8192 + 7, 100_000, 1 << 20]
    shared = rnd.randbytes(70_000)
    for i, size in enumerate(sizes):
        d = dirs[i % len(dirs)]
        (d / f"file{size}").write_bytes(rnd.randbytes(size))
    for i, d in enumerate(dirs[:4]):
        (d / f"same{i}").write_bytes(shared)            # one object, several files
    # Names: longest allowed, spaces, newline, '=' and '-', non-UTF-8 bytes, sorting around '.'.
    (top / ("n" * 255)).write_bytes(b"longest name")
    (top / "with space").write_bytes(b"x" * 70)
    (top / "new\nline").write_bytes(b"nl")
    (top / "k=v").write_bytes(b"eq")
    (top / "-").write_bytes(b"dash")
    (top / "!bang").write_bytes(b"bang")
    os.close(os.open(os.path.join(os.fsencode(top), b"bad\xffutf8"), os.O_CREAT | os.O_WRONLY, 0o644))
    # Symlinks: short, long, the longest, dangling, absolute.
    os.symlink("file12", top / "a" / "link")
    os.symlink("t" * 1000, top / "longlink")
    os.symlink("m" * 4095, top / "maxlink")
    os.symlink("/nonexistent/target", top / "dangling")
    # Hardlinks (directory scans do not detect them: each is its own inode, as upstream).
    os.link(top / "with space", top / "b c" / "hard1")
    os.link(top / "with space", top / "deep" / "hard2")
    # Special files.
    os.mkfifo(top / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(top / "sock"))
    sock.close()
    if with_devices:
        os.mknod(top / "null", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(top / "loop", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.mknod(top / "a" / "whiteout", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    # Odd modes and owners.
    for mode in (0o000, 0o4755, 0o2711, 0o1777, 0o777, 0o400):
        p = top / "odd-modes" / f"m{mode:04o}"
        p.write_bytes(b"mode")
        os.chmod(p, mode)
    os.chmod(top / "deep" / "er", 0o1750)
    if os.geteuid() == 0:
        (top / "owned").write_bytes(b"o" * 100)
        os.chown(top / "owned", 1000, 1000)
        (top / "deep" / "bigids").write_bytes(b"ids")
        os.chown(top / "deep" / "bigids", 70000, 80000)       # > 16 bits: extended inode
        os.lchown(top / "a" / "link", 12, 34)
    # xattrs: user.*, trusted.* (root only), one that must be escaped, binary values.
    os.setxattr(top / "-", "user.test", b"hello")
    os.setxattr(top / "with space", "user.bin", bytes(range(256)))
    os.setxattr(top / "a", "user.dir", b"")
    os.setxattr(top / "b c", "user.same", b"shared-value")
    os.setxattr(top / "deep", "user.same", b"shared-value")
    if with_trusted and os.geteuid() == 0:
        os.setxattr(top, "trusted.rootattr", b"r")
        os.setxattr(top / "deep", "trusted.overlay.redirect", b"/escaped")
        os.setxattr(top / "k=v", "trusted.k=ey", b"va=lue")
    # Nanosecond mtimes, children before parents (creating children bumps the parent's).
    # os.walk, not rglob: Python 3.11.2's rglob stats the max-length symlink and fails.
    paths = sorted((Path(d, n) for d, dirs, files in os.walk(top) for n in dirs + files),
                   key=lambda p: len(p.parts), reverse=True)
    base = 1_700_000_000 * 10**9
    for i, p in enumerate(paths):
        _set_time(p, base + rnd.randrange(10**12) * 1000 + i)
    _set_time(top / "a" / "link", 0)                             # the epoch itself
    _set_time(top, base + 123_456_789)
    return top


def _escape(data: bytes, extra: bytes = b"") -> bytes:
    out = bytearray()
    for b in data:
        if b == 0x5C:
            out += b"\\\\"
        elif 0x21 <= b <= 0x7E and bytes((b,)) not in extra:
            out.append(b)
        else:
            out += b"\\x%02x" % b
    return bytes(out)


def _field(data: bytes | None) -> bytes:
    if data is None:
        return b"-"
    return b"\\x2d" if data == b"-" else _escape(data)


def fsverity_digest_tool(path: Path) -> str:
    """The digest as the `fsverity` tool (fsverity-utils, C) computes it: an independent oracle."""
    out = subprocess.run(["fsverity", "digest", "--compact", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[0].split(":")[-1]


def dump_of_tree(top: Path, use_epoch: bool = False, skip_devices: bool = False,
                 user_xattrs: bool = False, skip_xattrs: bool = False) -> bytes:
    """The dump a directory scan of ``top`` must equal, from first principles."""
    lines = []
    btop = os.fsencode(top)
    todo = [b""]
    while todo:
        rel = todo.pop()
        full = btop + rel if rel else btop
        st = os.lstat(full)
        fmt = stat.S_IFMT(st.st_mode)
        size = 0
        payload = content = digest = None
        if fmt == stat.S_IFREG:
            size = st.st_size
            if 0 < size <= INLINE_MAX:
                with open(full, "rb") as f:
                    content = f.read()
            elif size > INLINE_MAX:
                hexd = fsverity_digest_tool(Path(os.fsdecode(full)))
                digest = hexd.encode()
                payload = (hexd[:2] + "/" + hexd[2:]).encode()
        elif fmt == stat.S_IFLNK:
            payload = os.readlink(full)
            size = len(payload)
        elif fmt == stat.S_IFDIR:
            names = sorted(os.listdir(full))
            todo.extend(rel + b"/" + n for n in reversed(names))
        if skip_devices and fmt in (stat.S_IFCHR, stat.S_IFBLK):
            continue
        rdev = st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0
        sec, nsec = (0, 0) if use_epoch else divmod(st.st_mtime_ns, 10**9)
        xattrs = []
        for name in sorted(os.listxattr(full, follow_symlinks=False)):
            if skip_xattrs or (user_xattrs and not name.startswith("user.")):
                continue
            value = os.getxattr(full, name, follow_symlinks=False)
            xattrs.append(b" " + _escape(os.fsencode(name), b"=") + b"=" + _escape(value, b"="))
        path = rel or b"/"
        lines.append(b"%s %d %o 1 %d %d %d %d.%d %s %s %s%s" % (
            _escape(path), size, st.st_mode, st.st_uid, st.st_gid, rdev, sec, nsec,
            _field(payload), _field(content), digest or b"-", b"".join(xattrs)))
    return b"\n".join(lines) + b"\n"
