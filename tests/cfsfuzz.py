"""Differential fuzzing of bootimg's composefs core against the reference C tools (1.0.8).

Two kinds of cases, each made from a seed and its index alone (so any case can be rebuilt):

- dump cases: a seed dump (upstream's small vectors, its should-fail dumps, a synthetic dump
  with every file type and awkward corner) with 1-3 mutations: field edits with boundary
  numbers, odd modes, escapes, long payloads and contents, digests, xattrs, hardlinks, new
  entries, line and byte surgery. Both `mkcomposefs --print-digest --from-file` run on it.
- image cases: a valid image of a seed dump with 1-3 mutations: byte flips, edits of
  superblock, inode, xattr and dirent fields found by walking the image, truncation, slot
  copies. Both `composefs-info dump`, `ls` and `objects` run on it.

Agreement: both accept with the same bytes (image and printed digest; for images the same
output), or both reject; a rejection by bootimg must be one line on stderr, exit status 1, no
traceback and no output file. The reference runs with tests/guardmap.c preloaded, so that its
unchecked reads outside an image fault instead of reading other memory; when it faults or hangs
it has no answer, and bootimg must reject. bootimg runs in-process through ``bootimg.cli.main``
(exactly what the command does, minus the interpreter start).

``DELIBERATE`` lists where bootimg refuses on purpose what the reference accepts; a case is
counted there only if bootimg's message names that rule *and* the rule's own check of the input
(written here, independently of bootimg) confirms it applies, so the list cannot hide a
regression.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from reference import ReferenceTools

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("BOOTIMG_COMPOSEFS_ASSETS", REPO.parent / "shared" / "composefs-assets"))
TIMEOUT = 5.0          # seconds for one reference run: a hang is "no answer"

# -- the reference's number parsing (strtoull), used by the rule checks -----------------------


def strtoull(field: bytes, base: int) -> int | None:
    """glibc strtoull() in the C locale as mkcomposefs uses it: None where it reports an error
    (empty, no digits, trailing junk); overflow saturates; a '-' negates modulo 2^64."""
    s = field.lstrip(b" \t\n\v\f\r")
    neg = s[:1] == b"-"
    if s[:1] in (b"+", b"-"):
        s = s[1:]
    digits = b"01234567" if base == 8 else b"0123456789"
    n = 0
    while n < len(s) and s[n] in digits:
        n += 1
    if not field or n == 0 or n != len(s):
        return None
    value = int(s, base)
    if value >= 1 << 64:
        return (1 << 64) - 1
    return (-value) % (1 << 64) if neg else value


def c_unescape(field: bytes) -> bytes | None:
    """The dump format's unescaping (mkcomposefs' unescape_string); None if invalid."""
    out = bytearray()
    i = 0
    while i < len(field):
        c = field[i]
        i += 1
        if c != 0x5C:
            out.append(c)
            continue
        if i >= len(field):
            return None
        e = field[i]
        i += 1
        if e in b"\\nrt":
            out += {0x5C: b"\\", 0x6E: b"\n", 0x72: b"\r", 0x74: b"\t"}[e]
        elif e == 0x78:
            h = field[i:i + 2]
            if len(h) < 2 or not all(x in b"0123456789abcdefABCDEF" for x in h):
                return None
            out.append(int(h, 16))
            i += 2
        else:
            return None
    return bytes(out)


def dump_fields(line: bytes) -> list[bytes]:
    """The 11 fixed fields of a dump line as the reference splits them (missing ones empty),
    then the xattrs."""
    parts = line.split(b" ", 11)
    fixed = parts[:11] + [b""] * (11 - len(parts[:11]))
    rest = parts[11] if len(parts) > 11 else b""
    return fixed + ([x for x in rest.split(b" ")] if rest else [])


# -- deliberate differences ---------------------------------------------------------------------


@dataclass(frozen=True)
class Deliberate:
    name: str
    message: str                          # a regex bootimg's error line matches
    doc: str                              # what the reference does instead
    applies: Callable[[bytes, bytes], bool]   # independent check of (offending dump line, dump)


def _digest_not_64_hex(line: bytes) -> bool:
    """A regular file with external data whose DIGEST is not exactly 64 hex digits."""
    f = dump_fields(line)
    mode, size = strtoull(f[2], 8), strtoull(f[1], 10)
    if mode is None or mode & 0o170000 != 0o100000 or not size or f[9] != b"-" or f[10] == b"-":
        return False
    raw = c_unescape(f[10])
    return raw is not None and re.fullmatch(rb"[0-9a-fA-F]{64}", raw) is None


def _gid_rdev_ignored(line: bytes) -> bool:
    f = dump_fields(line)
    if f[2][:1] == b"@" or strtoull(f[4], 10) in (None, 0):
        return False
    return strtoull(f[5], 10) is None or strtoull(f[6], 10) is None


def _nul_in_c_string(line: bytes) -> bool:
    f = dump_fields(line)
    fields = [f[0], f[8]] + [x.partition(b"=")[0] for x in f[11:]]
    return any((u := c_unescape(x)) is not None and b"\0" in u for x in fields)


def _norm(path: bytes) -> bytes:
    return b"/".join(p for p in path.split(b"/") if p)


def _hardlink_to_dir(line: bytes, dump: bytes) -> bool:
    """A hardlink line whose target (after following hardlink lines) is a directory line."""
    f = dump_fields(line)
    if f[2][:1] != b"@":
        return False
    by_path: dict[bytes, list[bytes]] = {}
    for other in dump.split(b"\n"):
        g = dump_fields(other)
        p = c_unescape(g[0])
        if p is not None:
            by_path.setdefault(_norm(p), g)
    target = c_unescape(f[8])
    for _ in range(len(by_path) + 1):
        if target is None or _norm(target) not in by_path:
            return False
        g = by_path[_norm(target)]
        if g[2][:1] != b"@":
            mode = strtoull(g[2], 8)
            return mode is not None and mode & 0o170000 == 0o040000
        target = c_unescape(g[8])
    return False


DELIBERATE = [
    Deliberate(
        "digest-not-64-hex", r"digest must be 64 hex digits",
        "a DIGEST that is not exactly 64 hex digits on a regular file with external data: mkcomposefs "
        "ignores digest_to_raw()'s error, so a short or non-hex digest puts uninitialised stack bytes "
        "into the image and a longer one is cut to its first 64 digits",
        lambda line, dump: _digest_not_64_hex(line)),
    Deliberate(
        "gid-rdev-unchecked", r"invalid (gid|rdev)",
        "an invalid GID or RDEV on a line whose UID is not 0: mkcomposefs checks the uid instead of "
        "the field it just parsed (`if (uid == 0 && err)`) and uses 0",
        lambda line, dump: _gid_rdev_ignored(line)),
    Deliberate(
        "nul-in-c-string", r"\\x00 in",
        "an escaped NUL (\\x00) in a path, payload or xattr name: the reference keeps these as C "
        "strings and silently cuts them at the NUL",
        lambda line, dump: _nul_in_c_string(line)),
    Deliberate(
        "hardlink-to-directory", r"hardlink .* to a directory",
        "a hardlink whose target is a directory: mkcomposefs writes an image with the directory "
        "linked twice (a loop when the target is an ancestor, e.g. '/')",
        _hardlink_to_dir),
]


def _image_inode(img: bytes, nid: int) -> tuple[int, int, int, int] | None:
    """(i_format, mode, size, i_u) of inode nid, decoded here independently of bootimg."""
    meta = (struct.unpack_from("<I", img, 1064)[0] * 4096) & 0xFFFFFFFF
    off = meta + ((nid << 5) & ((1 << 64) - 1))
    if off + 64 > len(img):
        return None
    fmt, _, mode = struct.unpack_from("<HHH", img, off)
    size = struct.unpack_from("<Q" if fmt & 1 else "<I", img, off + 8)[0]
    return fmt, mode, size, struct.unpack_from("<I", img, off + 16)[0]


def _stub_reached_twice(img: bytes, m: re.Match) -> bool:
    ino = _image_inode(img, int(m.group(1)))
    return ino is not None and ino[1] & 0o170000 == 0o020000 and ino[3] == 0


def _inline_without_tail(img: bytes, m: re.Match) -> bool:
    ino = _image_inode(img, int(m.group(1)))
    return (ino is not None and (ino[0] >> 1) & 7 == 2 and ino[1] & 0o170000 == 0o100000
            and ino[2] > 0 and ino[2] % 4096 == 0)


@dataclass(frozen=True)
class ImageDeliberate:
    name: str
    message: str                                  # a regex with the nid as group 1
    doc: str
    applies: Callable[[bytes, re.Match], bool]    # independent check of that inode


IMAGE_DELIBERATE = [
    ImageDeliberate(
        "whiteout-reached-twice", r"0:0 character device inode nid (\d+) is reached twice",
        "two directory entries reaching the same 0:0 character device inode: the reference frees the "
        "node of the first visit but keeps it in its inode table, and links the second entry to the "
        "freed memory",
        _stub_reached_twice),
    ImageDeliberate(
        "inline-file-without-tail", r"inode nid (\d+): flat inline file of \d+ bytes has no inline tail",
        "a regular file with the flat-inline layout whose size is a multiple of 4096: the reference "
        "copies no bytes into the last block of its buffer and prints uninitialised heap memory",
        _inline_without_tail),
]


def deliberate_rule(dump: bytes, err_line: str) -> Deliberate | None:
    """The rule bootimg's one-line error names, if its check confirms it for the line named."""
    m = re.match(r".*?:(\d+): ", err_line)
    if m is None:
        return None
    lines = dump.split(b"\n")
    lineno = int(m.group(1))
    if not 1 <= lineno <= len(lines):
        return None
    for rule in DELIBERATE:
        if re.search(rule.message, err_line) and rule.applies(lines[lineno - 1], dump):
            return rule
    return None


def image_deliberate_rule(img: bytes, err_line: str) -> ImageDeliberate | None:
    """The image rule bootimg's error names, if its check of the inode named confirms it."""
    for rule in IMAGE_DELIBERATE:
        m = re.search(rule.message, err_line)
        if m is not None and rule.applies(img, m):
            return rule
    return None


# -- running both sides -------------------------------------------------------------------------


@dataclass
class Outcome:
    rc: int | str            # exit status; "signal N", "timeout" or "traceback" when there is none
    out: bytes = b""
    err: bytes = b""
    image: bytes | None = None
    leftover: bool = False   # bootimg left its output file behind after failing


def run_reference(cmd: list[str], env: dict[str, str] | None = None) -> Outcome:
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return Outcome("timeout")
    rc: int | str = res.returncode if res.returncode >= 0 else f"signal {-res.returncode}"
    return Outcome(rc, res.stdout, res.stderr)


def run_bootimg(argv: list[str], env: dict[str, str | None] | None = None) -> Outcome:
    """``bootimg ARGV`` in this process: cli.main with stdout/stderr captured."""
    from bootimg import cli

    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        try:
            rc: int | str = cli.main(argv)
        except SystemExit as e:              # argparse
            rc = e.code if isinstance(e.code, int) else 2
        except Exception:
            rc = "traceback"
            sys.stderr.write(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        for wrapper in (sys.stdout, sys.stderr):
            wrapper.detach()
        sys.stdout, sys.stderr = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gc.unfreeze()                        # main() freezes the heap for a quick exit
    return Outcome(rc, out.getvalue(), err.getvalue())


def clean_rejection(o: Outcome) -> bool:
    lines = o.err.decode("utf-8", "replace").strip().splitlines()
    return o.rc == 1 and len(lines) == 1 and not o.leftover


@dataclass
class Verdict:
    kind: str                 # "same-output", "both-refuse", "deliberate", "no-answer" or "disagree"
    detail: str = ""
    rule: str | None = None


def compare(ref: Outcome, bi: Outcome, same: Callable[[], bool], deliberate: Callable[[str], object | None]) -> Verdict:
    if bi.rc == "traceback":
        return Verdict("disagree", "bootimg traceback: " + bi.err.decode("utf-8", "replace").strip().splitlines()[-1])
    if bi.rc != 0 and not clean_rejection(bi):
        return Verdict("disagree", f"unclean rejection (exit {bi.rc}, leftover={bi.leftover}): {bi.err[:300]!r}")
    bi_err = bi.err.decode("utf-8", "replace").strip()
    if ref.rc in ("timeout",) or (isinstance(ref.rc, str) and ref.rc.startswith("signal")):
        if bi.rc == 0:
            return Verdict("disagree", f"reference {ref.rc} (no answer) but bootimg accepted")
        return Verdict("no-answer", f"reference {ref.rc}")
    if ref.rc == 0 and bi.rc == 0:
        return Verdict("same-output") if same() else Verdict("disagree", "both accept, different bytes")
    if ref.rc != 0 and bi.rc != 0:
        return Verdict("both-refuse")
    if ref.rc != 0:
        return Verdict("disagree", f"bootimg accepts what the reference rejects ({ref.err.decode('utf-8', 'replace').strip()})")
    rule = deliberate(bi_err)
    if rule is not None:
        return Verdict("deliberate", bi_err, rule.name)
    return Verdict("disagree", f"bootimg rejects what the reference accepts: {bi_err}")


# -- seeds -----------------------------------------------------------------------------------------

_HEX = "0123456789abcdef"


def synthetic_dump(rng: random.Random) -> bytes:
    """Every file type, the inline/external size classes, xattrs of every kind, hardlinks,
    escaped names; ordered so that parents come first."""
    def digest() -> str:
        return "".join(rng.choice(_HEX) for _ in range(64))

    def esc(data: bytes) -> str:
        return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in b"\\=" else f"\\x{b:02x}" for b in data)

    t = "1700000000.5"
    lines = [
        f"/ 4096 40755 4 0 0 0 {t} - - - user.root=1 security.selinux=system_u:object_r:root_t:s0",
        "/a 4096 40700 3 1000 1000 0 1600000000.0 - - - trusted.overlay.opaque=y user.overlay.x=1",
        "/a/b 4096 40755 2 70000 70000 0 1600000000.123456789 - - -",
        f"/a/b/empty 0 100644 1 0 0 0 {t} - - -",
        f"/a/b/inline 5 100644 1 0 0 0 {t} - hello - user.a=b",
        f"/a/b/tail 2049 100600 1 0 0 0 {t} - {esc(rng.randbytes(2049))} -",
        f"/a/b/block 4097 100600 1 0 0 0 {t} - {esc(rng.randbytes(4097))} -",
        f"/a/ext 100000 100755 1 0 0 0 {t} {digest()[:2]}/{digest()[2:]} - {digest()} user.x=y",
        f"/a/ext2 9000 100755 2 5 6 0 {t} - - {digest()} system.posix_acl_access=\\x02\\x00\\x00\\x00",
        f"/a/noddigest 70000 100644 1 0 0 0 {t} ab/cd - -",
        "/a/hl 0 @100644 0 0 0 0 0.0 /a/ext2 - -",
        f"/chr 0 20644 1 0 0 1025 {t} - - -",
        f"/blk 0 60600 1 0 0 2049 {t} - - -",
        f"/fifo 0 10644 1 0 0 0 {t} - - -",
        f"/sock 0 140755 1 0 0 0 {t} - - -",
        f"/whiteout 0 20000 1 0 0 0 {t} - - - trusted.overlay.whiteout=",
        f"/link 6 120777 1 0 0 0 {t} /a/ext - - user.l=1",
        f"/longlink 4095 120777 1 0 0 0 {t} {'x' * 4095} - -",
        f"/name\\x20with\\x3dodd\\nbytes\\xff 3 100644 1 0 0 0 {t} - abc -",
        f"/\\x2d 0 100644 1 0 0 0 {t} - - - user.dash=\\x2d",
        "/z 4096 40755 2 0 0 0 -5.7 - - - trusted.overlay.overlay.nested=1 user.overlay.whiteouts=",
        f"/z/deep 4096 40755 2 0 0 0 {t} - - -",
        "/z/deep/hl2 0 @100644 0 0 0 0 0.0 /a/b/inline - -",
        "/z/deep/f 1 100644 1 4294967295 4294967295 0 18446744073709551615.999999999 - x -",
    ]
    return ("\n".join(lines) + "\n").encode()


def seed_dumps() -> list[tuple[str, bytes]]:
    seeds = [("synthetic", synthetic_dump(random.Random(0)))]
    for path in sorted(ASSETS.glob("*.dump")):
        if path.stat().st_size <= 200_000:
            seeds.append((path.name, path.read_bytes()))
    return seeds


# -- dump mutations ---------------------------------------------------------------------------------

NUMBERS = [b"0", b"1", b"-1", b"+1", b"-0", b"7", b"65535", b"65536", b"4294967295", b"4294967296",
           b"4294967297", b"9223372036854775807", b"9223372036854775808", b"18446744073709551615",
           b"18446744073709551616", b"99999999999999999999999", b"-18446744073709551615", b"-18446744073709551616",
           b"\t5", b"\x0b5", b"\r5", b"5\t", b"0x10", b"010", b"1_0", b"", b"-", b"++1", b"+-1", b"1e3", b"007",
           b"9007199254740992", b"9007199254740993", b"8796093022208", b"4096", b"4095", b"5000", b"5001",
           b"2048", b"2049", b"64", b"65", b"\\x31"]
MODES = [b"100644", b"40755", b"120777", b"20644", b"60644", b"10644", b"140644", b"0", b"644", b"170000",
         b"1100644", b"37777777777", b"-1", b"40000100644", b"0o100644", b"100_644", b"\t100644", b"+100644",
         b"-37777677134", b"1777777777777777777777", b"104755", b"8", b"100644x", b"", b"20000", b"120000",
         b"4100644", b"-1777777777777777677134", b"\\x31"]
MTIMES = [b"0.0", b"1.1", b"-1.0", b"18446744073709551615.0", b"18446744073709551616.0", b"9223372036854775808.0",
          b"9223372036854775807.0", b"0.4294967296", b"0.4294967295", b"0.999999999", b"0.1000000000", b"1", b"1.",
          b".1", b"1..1", b"1.1.1", b"0.-1", b"+1.+1", b"\t1.\t1", b"-9223372036854775808.0", b"5.18446744073709551617",
          b"1700000000.5", b"1700000000.4"]
PAYLOADS = [b"-", b"", b"a", b"\\x2d", b"/", b"//", b"a" * 4095, b"a" * 4096, b"a" * 5000, b"a\\x00b", b"\\x00", b"\\",
            b"\\x", b"\\x4", b"\\xzz", b"\\q", b"\\n", b"ab/cd/ef", b"/abs/olute", b"\\x20", b"a=b", b"/" + b"b" * 4094,
            b"12/3456789abcdef", b"/a/ext2", b"/a", b"a/b/../c", b"\\xff\\xfe"]
DIGEST = b"0123456789abcdef" * 4
DIGESTS = [b"-", b"", DIGEST, DIGEST.upper(), DIGEST[:63], DIGEST + b"0", DIGEST + b"00", DIGEST * 2, DIGEST[:-1] + b"g",
           b"\\x30" + DIGEST[1:], DIGEST[:2], DIGEST[:32] + b"\\x00" + DIGEST[33:], DIGEST[:62] + b"\t1", b"00"]
XATTR_NAMES = [b"user.a", b"user.b", b"trusted.overlay.redirect", b"trusted.overlay.metacopy", b"trusted.overlay.whiteout",
               b"trusted.overlay.whiteouts", b"trusted.overlay.opaque", b"trusted.overlay.overlay.x",
               b"trusted.overlay.overlay.whiteout", b"user.overlay.whiteout", b"user.overlay.whiteouts",
               b"user.overlay.opaque", b"security.selinux", b"system.posix_acl_access", b"system.posix_acl_default",
               b"lustre.x", b"trusted.", b"user.", b"", b"u" * 255, b"u" * 256, b"user.\\x3d", b"user.a\\x00b",
               b"x\\x20y", b"trusted.overlay." + b"o" * 239, b"trusted.overlay." + b"o" * 232, b"\\x00"]
XATTR_VALUES = [b"", b"v", b"-", b"\\x00\\x01", b"=", b"a=b", b"v" * 1000, b"v" * 32000, b"v" * 32740, b"v" * 65535,
                b"v" * 65536, b"\\x00" * 36, b"\\x00\\x24\\x00\\x01" + b"\\xab" * 32, b"/x", b"y", b"x"]
NAMES = [b"n", b"\\x2f", b".", b"..", b"n" * 255, b"n" * 256, b"\\x00", b"a\\x20b", b"-", b"\\x2d", b"00", b"ff", b"fg",
         b"\\xff", b"", b"a/b", b"new"]
CONTENT_SIZES = [0, 1, 2, 63, 64, 65, 2047, 2048, 2049, 4095, 4096, 4097, 4999, 5000, 5001, 8192]


def _rand_bytes_escaped(rng: random.Random, n: int) -> bytes:
    return b"".join(b"\\x%02x" % b if not 0x21 <= b <= 0x7E or b in b"\\" else bytes((b,)) for b in rng.randbytes(n))


class DumpMutator:
    def __init__(self, rng: random.Random, lines: list[bytes]):
        self.rng = rng
        self.lines = lines

    def _line(self) -> int:
        """A line to mutate; the root line (the first) only now and then, since most of its
        mutations just make the dump rootless."""
        if not self.lines:
            return -1
        if len(self.lines) == 1 or self.rng.random() < 0.1:
            return self.rng.randrange(len(self.lines))
        return self.rng.randrange(1, len(self.lines))

    def _paths(self) -> list[bytes]:
        return [ln.split(b" ", 1)[0] for ln in self.lines if ln]

    def _set_field(self, i: int, idx: int, value: bytes) -> None:
        toks = self.lines[i].split(b" ")
        while len(toks) <= idx:
            toks.append(b"-")
        toks[idx] = value
        self.lines[i] = b" ".join(toks)

    def field_edit(self) -> None:
        i = self._line()
        if i < 0:
            return
        idx = self.rng.choice([1, 2, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 10])
        pool = {1: NUMBERS, 2: MODES, 3: NUMBERS, 4: NUMBERS, 5: NUMBERS, 6: NUMBERS, 7: MTIMES, 8: PAYLOADS,
                9: [b"-", b"", b"x", b"\\x00", b"\\"], 10: DIGESTS}[idx]
        value = self.rng.choice(pool)
        if idx == 2 and self.rng.random() < 0.2:
            value = b"@" + value
        self._set_field(i, idx, value)

    def content(self) -> None:
        """Size and content that agree, so the case is usually accepted."""
        i = self._line()
        if i < 0:
            return
        n = self.rng.choice(CONTENT_SIZES)
        data = _rand_bytes_escaped(self.rng, n) if n else b"-"
        if self.rng.random() < 0.2:
            self._set_field(i, 2, self.rng.choice([b"100644", b"120777", b"40755", b"20644"]))
        self._set_field(i, 1, str(n).encode())
        self._set_field(i, 9, data)

    def external(self) -> None:
        i = self._line()
        if i < 0:
            return
        size = self.rng.choice([65, 4096, 8193, 1 << 20, (1 << 43) + 1, 1 << 53, (1 << 53) + 1, 18446744073709551615])
        self._set_field(i, 2, b"100644")
        self._set_field(i, 1, str(size).encode())
        self._set_field(i, 9, b"-")
        self._set_field(i, 8, self.rng.choice(PAYLOADS[:8] + [b"ab/cdef"]))
        self._set_field(i, 10, self.rng.choice(DIGESTS[:4]))

    def symlink(self) -> None:
        i = self._line()
        if i < 0:
            return
        target = self.rng.choice(PAYLOADS)
        self._set_field(i, 2, b"120777")
        self._set_field(i, 1, str(len(target)).encode() if self.rng.random() < 0.7 else b"5")
        self._set_field(i, 8, target)
        self._set_field(i, 9, self.rng.choice([b"-", b"-", b"", b"x"]))

    def xattr(self) -> None:
        i = self._line()
        if i < 0:
            return
        toks = self.lines[i].split(b" ")
        while len(toks) < 11:
            toks.append(b"-")
        op = self.rng.random()
        xs = toks[11:]
        if op < 0.45 or not xs:
            n = 1 if self.rng.random() < 0.8 else self.rng.choice([10, 100, 200])
            for _ in range(n):
                xs.append(self.rng.choice(XATTR_NAMES) + b"=" + self.rng.choice(XATTR_VALUES))
        elif op < 0.6:
            xs.pop(self.rng.randrange(len(xs)))
        elif op < 0.75:
            k = self.rng.choice(xs).partition(b"=")[0]
            xs.append(k + b"=" + self.rng.choice(XATTR_VALUES))
        elif op < 0.85:
            xs.append(self.rng.choice([b"", b"noequals", b"=v", b"\\=x"]))
        else:
            xs[self.rng.randrange(len(xs))] = self.rng.choice(XATTR_NAMES) + b"=" + self.rng.choice(XATTR_VALUES)
        self.lines[i] = b" ".join(toks[:11] + xs)

    def hardlink(self) -> None:
        i = self._line()
        if i < 0:
            return
        paths = self._paths()
        target = self.rng.choice(paths + [b"/", b"", b"-", b"/nowhere", paths[i] if i < len(paths) else b"/x"])
        mode = self.rng.choice([b"@100644", b"@100644", b"@40755", b"@120777", b"@20000", b"@0"])
        self._set_field(i, 2, mode)
        self._set_field(i, 8, target)

    def new_entry(self) -> None:
        dirs = [ln.split(b" ", 1)[0] for ln in self.lines if len(ln.split(b" ")) > 2 and ln.split(b" ")[2].startswith(b"4")]
        parent = self.rng.choice(dirs) if dirs else b"/"
        name = self.rng.choice(NAMES)
        path = (parent.rstrip(b"/") + b"/" + name) if self.rng.random() < 0.9 else name
        kind = self.rng.choice([
            b"0 100644 1 0 0 0 0.0 - - -", b"4096 40755 2 0 0 0 0.0 - - -", b"1 120777 1 0 0 0 0.0 t - -",
            b"0 20644 1 0 0 0 0.0 - - -", b"0 20644 1 0 0 5 0.0 - - -", b"0 @100644 1 0 0 0 0.0 " + parent + b" - -",
            b"3 100644 1 0 0 0 0.0 - abc -", b"100 100644 1 0 0 0 0.0 xx/yy - " + DIGEST])
        self.lines.insert(self.rng.randrange(1, len(self.lines) + 1) if self.lines else 0, path + b" " + kind)

    def path_edit(self) -> None:
        i = self._line()
        if i < 0:
            return
        toks = self.lines[i].split(b" ", 1)
        p = toks[0]
        op = self.rng.random()
        if op < 0.3:
            p = p + b"/"
        elif op < 0.5:
            p = p.replace(b"/", b"//", 1)
        elif op < 0.7:
            p = p.lstrip(b"/")
        else:
            p = p.rsplit(b"/", 1)[0] + b"/" + self.rng.choice(NAMES)
        self.lines[i] = b" ".join([p] + toks[1:])

    def line_surgery(self) -> None:
        if not self.lines:
            return
        i = self._line()
        op = self.rng.random()
        if op < 0.2:
            del self.lines[i]
        elif op < 0.35:
            self.lines.insert(i, self.lines[i])
        elif op < 0.5:
            j = self._line()
            self.lines[i], self.lines[j] = self.lines[j], self.lines[i]
        elif op < 0.65:
            ln = self.lines[i]
            self.lines[i] = ln[:self.rng.randrange(len(ln) + 1)]
        elif op < 0.75:
            ln = self.lines[i]
            k = self.rng.randrange(len(ln) + 1)
            self.lines[i] = ln[:k] + self.rng.choice([b"\0", b"\r", b"\t", b" ", b"  ", b"\\", b"\xff"]) + ln[k:]
        elif op < 0.85:
            self.lines[i] = self.lines[i] + self.rng.choice([b" ", b"  ", b" -", b" x=y ", b"\r"])
        else:
            toks = self.lines[i].split(b" ")
            keep = self.rng.randrange(1, 12)
            self.lines[i] = b" ".join(toks[:keep])

    def byte_flip(self) -> None:
        i = self._line()
        if i < 0 or not self.lines[i]:
            return
        ln = bytearray(self.lines[i])
        k = self.rng.randrange(len(ln))
        ln[k] ^= 1 << self.rng.randrange(8)
        self.lines[i] = bytes(ln)

    OPS = ["field_edit", "field_edit", "field_edit", "content", "external", "symlink", "xattr", "xattr", "hardlink",
           "new_entry", "new_entry", "path_edit", "line_surgery", "line_surgery", "byte_flip"]


@dataclass
class DumpCase:
    index: int
    seed_name: str
    ops: list[str]
    dump: bytes
    strict: bool
    versions: list[str]


VERSION_ARGS = [[], [], [], ["--min-version=1"], ["--max-version=0"], ["--min-version=0", "--max-version=0"],
                ["--min-version=1", "--max-version=1"], ["--min-version=0"], ["--min-version=1", "--max-version=0"],
                ["--max-version=1"]]


def make_dump_case(seed: int, index: int, seeds: list[tuple[str, bytes]]) -> DumpCase:
    rng = random.Random(f"dump:{seed}:{index}")
    # Mostly valid seeds, so that most cases are accepted and their bytes compared.
    bad = [s for s in seeds if s[0].startswith("should-fail")]
    good = [s for s in seeds if not s[0].startswith("should-fail")]
    name, data = rng.choice(bad if bad and rng.random() < 0.1 else good)
    lines = data.split(b"\n")
    final_newline = lines[-1] == b""
    if final_newline:
        lines.pop()
    m = DumpMutator(rng, lines)
    ops = [rng.choice(DumpMutator.OPS) for _ in range(rng.choice([1, 1, 1, 2, 2, 3]))]
    for op in ops:
        getattr(m, op)()
    if rng.random() < 0.03:
        final_newline = not final_newline
    out = b"\n".join(m.lines) + (b"\n" if final_newline and m.lines else b"")
    if rng.random() < 0.03 and out:
        out = out[:rng.randrange(len(out))]
        ops.append("truncate")
    return DumpCase(index, name, ops, out, rng.random() < 0.3, rng.choice(VERSION_ARGS))


# -- image mutations ---------------------------------------------------------------------------------

def image_fields(img: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, what) of the fields of a valid image, found by walking it: header,
    superblock, every inode's fields, xattr headers and entries, dirents."""
    fields = [(0, 4, "magic"), (4, 4, "header version"), (8, 4, "flags"), (12, 4, "composefs version"),
              (1024, 4, "sb magic"), (1032, 4, "feature_compat"), (1036, 1, "blkszbits"), (1038, 2, "root_nid"),
              (1040, 8, "inos"), (1048, 8, "build_time"), (1056, 4, "build_time_nsec"), (1060, 4, "blocks"),
              (1064, 4, "meta_blkaddr"), (1068, 4, "xattr_blkaddr")]
    if len(img) < 4096:
        return fields
    meta = struct.unpack_from("<I", img, 1064)[0] * 4096
    xbase = struct.unpack_from("<I", img, 1068)[0] * 4096
    seen: set[int] = set()
    todo = [struct.unpack_from("<H", img, 1038)[0]]
    while todo and len(seen) < 2000:
        nid = todo.pop()
        off = meta + nid * 32
        if nid in seen or off + 64 > len(img):
            continue
        seen.add(nid)
        fmt, icount, mode = struct.unpack_from("<HHH", img, off)
        ext = fmt & 1
        if ext:
            _, _, _, _, size, i_u = struct.unpack_from("<HHHHQI", img, off)
            fields += [(off, 2, "i_format"), (off + 2, 2, "icount"), (off + 4, 2, "mode"), (off + 8, 8, "size"),
                       (off + 16, 4, "i_u"), (off + 24, 4, "uid"), (off + 28, 4, "gid"), (off + 32, 8, "mtime"),
                       (off + 40, 4, "mtime_nsec"), (off + 44, 4, "nlink")]
            isz = 64
        else:
            size, _, i_u = struct.unpack_from("<III", img, off + 8)
            fields += [(off, 2, "i_format"), (off + 2, 2, "icount"), (off + 4, 2, "mode"), (off + 6, 2, "nlink"),
                       (off + 8, 4, "size"), (off + 16, 4, "i_u"), (off + 24, 2, "uid"), (off + 26, 2, "gid")]
            isz = 32
        xoff = off + isz
        xsize = 12 + (icount - 1) * 4 if icount else 0
        if xsize and xoff + xsize <= len(img):
            shared = img[xoff + 4]
            fields += [(xoff, 4, "name filter"), (xoff + 4, 1, "shared count")]
            fields += [(xoff + 12 + 4 * k, 4, "shared id") for k in range(shared)]
            for k in range(shared):
                e = xbase + struct.unpack_from("<I", img, xoff + 12 + 4 * k)[0] * 4
                if e + 4 <= len(img):
                    fields += [(e, 1, "shared name_len"), (e + 1, 1, "shared name_index"), (e + 2, 2, "shared value_size")]
            p = xoff + 12 + 4 * shared
            while p + 4 < xoff + xsize:
                nlen, _, vlen = struct.unpack_from("<BBH", img, p)
                fields += [(p, 1, "xattr name_len"), (p + 1, 1, "xattr name_index"), (p + 2, 2, "xattr value_size")]
                if nlen:
                    fields.append((p + 4, nlen, "xattr name"))
                if vlen:
                    fields.append((p + 4 + nlen, vlen, "xattr value"))
                p += (4 + nlen + vlen + 3) & ~3
        if mode & 0o170000 == 0o040000:
            layout = (fmt >> 1) & 7
            blocks = []
            n_full, tail = divmod(size, 4096)
            if layout == 2:
                blocks = [(i_u * 4096 + 4096 * b, 4096) for b in range(n_full)]
                if tail:
                    blocks.append((xoff + xsize, tail))
            else:
                blocks = [(i_u * 4096 + 4096 * b, 4096) for b in range(-(-size // 4096))]
            for start, _bsize in blocks:
                if start + 12 > len(img):
                    continue
                first = struct.unpack_from("<H", img, start + 8)[0]
                for k in range(min(first // 12, 400)):
                    d = start + 12 * k
                    if d + 12 > len(img):
                        break
                    cnid, noff, _ = struct.unpack_from("<QHB", img, d)
                    fields += [(d, 8, "dirent nid"), (d + 8, 2, "dirent nameoff"), (d + 10, 1, "dirent type")]
                    if start + noff < len(img):
                        fields.append((start + noff, 1, "dirent name"))
                    todo.append(cnid)
    return fields


INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x100000000, (1 << 63), (1 << 64) - 1]
MODE_TYPES = [0o100000, 0o040000, 0o120000, 0o020000, 0o060000, 0o010000, 0o140000, 0, 0o170000, 0o030000]


def mutate_image(rng: random.Random, img: bytes, fields: list[tuple[int, int, str]]) -> tuple[bytes, list[str]]:
    data = bytearray(img)
    ops = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        r = rng.random()
        if r < 0.6 and fields:
            off, size, what = rng.choice(fields)
            if off + size > len(data):
                continue
            old = int.from_bytes(data[off:off + size], "little")
            if what == "mode" and rng.random() < 0.6:
                new = (old & 0o7777) | rng.choice(MODE_TYPES)
            elif what == "i_format" and rng.random() < 0.6:
                new = (old & 1) | (rng.randrange(8) << 1) if rng.random() < 0.8 else old ^ 1
            elif what in ("dirent nid",) and rng.random() < 0.5:
                nids = [int.from_bytes(data[o:o + 8], "little") for o, s, w in fields if w == "dirent nid"]
                new = rng.choice(nids + [struct.unpack_from("<H", data, 1038)[0]])
            elif what in ("xattr name", "xattr value", "dirent name"):
                k = off + rng.randrange(size)
                data[k] = rng.choice([0, 0x2F, 0x2E, rng.randrange(256)])
                ops.append(f"{what}@{k}")
                continue
            elif rng.random() < 0.5:
                new = rng.choice(INTERESTING)
            else:
                new = old + rng.choice([-2, -1, 1, 2, 32, -32, 4096])
            new %= 1 << (8 * size)
            data[off:off + size] = new.to_bytes(size, "little")
            ops.append(f"{what}@{off}={new:#x}")
        elif r < 0.8:
            k = rng.randrange(min(len(data), 1 << 16)) if rng.random() < 0.8 else rng.randrange(len(data))
            data[k] ^= 1 << rng.randrange(8)
            ops.append(f"flip@{k}")
        elif r < 0.9:
            n = rng.choice([rng.randrange(len(data)), len(data) // 4096 * 4096 - 4096, len(data) - rng.randrange(1, 64)])
            del data[max(n, 0):]
            ops.append(f"truncate {len(data)}")
        else:
            inodes = [o for o, s, w in fields if w == "i_format"]
            if len(inodes) >= 2:
                a, b = rng.sample(inodes, 2)
                data[b:b + 32] = data[a:a + 32]
                ops.append(f"copy inode {a}->{b}")
    return bytes(data), ops


@dataclass
class ImageCase:
    index: int
    seed_name: str
    ops: list[str]
    image: bytes
    filters: list[str] = field(default_factory=list)     # composefs-info --filter NAMEs


# -- the engine ------------------------------------------------------------------------------------


@dataclass
class Report:
    counts: dict[str, int] = field(default_factory=dict)
    rules: dict[str, int] = field(default_factory=dict)
    disagreements: list[tuple[str, str, object]] = field(default_factory=list)   # (where, detail, case)
    seconds: float = 0.0

    def add(self, where: str, verdict: Verdict, case: object) -> None:
        self.counts[verdict.kind] = self.counts.get(verdict.kind, 0) + 1
        if verdict.rule:
            self.rules[verdict.rule] = self.rules.get(verdict.rule, 0) + 1
        if verdict.kind == "disagree":
            self.disagreements.append((where, verdict.detail, case))


class Fuzzer:
    """Runs cases against both implementations in a scratch directory."""

    def __init__(self, tools: ReferenceTools, seed: int, workdir: Path | None = None):
        self.tools = tools
        self.seed = seed
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="cfsfuzz-")) if workdir is None else workdir
        self.seeds = seed_dumps()
        self._images: list[tuple[str, bytes, list]] | None = None
        self.ref_env = {k: v for k, v in os.environ.items() if k != "CFS_PARSE_STRICT"}

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # dumps
    def check_dump(self, case: DumpCase) -> Verdict:
        src = self.dir / "in.dump"
        src.write_bytes(case.dump)
        ref_img, bi_img = self.dir / "ref.img", self.dir / "bi.img"
        for p in (ref_img, bi_img):
            p.unlink(missing_ok=True)
        env = dict(self.ref_env, CFS_PARSE_STRICT="1") if case.strict else self.ref_env
        ref = run_reference([str(self.tools.mkcomposefs), *case.versions, "--print-digest", "--from-file", str(src),
                             str(ref_img)], env)
        if ref.rc == 0:
            ref.image = ref_img.read_bytes()
        bi = run_bootimg(["mkcomposefs", "-q", *case.versions, "--print-digest", "--from-file", str(src), str(bi_img)],
                         {"CFS_PARSE_STRICT": "1" if case.strict else None})
        if bi_img.exists():
            if bi.rc == 0:
                bi.image = bi_img.read_bytes()
            else:
                bi.leftover = True
        leftovers = [p.name for p in self.dir.iterdir() if p.name not in ("in.dump", "ref.img", "bi.img")]
        if leftovers:
            bi.leftover = True
            for name in leftovers:
                (self.dir / name).unlink()
        return compare(ref, bi, lambda: ref.image == bi.image and ref.out == bi.out,
                       lambda err: deliberate_rule(case.dump, err))

    # images
    def base_images(self) -> list[tuple[str, bytes, list]]:
        if self._images is None:
            from bootimg.composefs.dump import parse_dump
            from bootimg.composefs.writer import write_image

            self._images = []
            for name, dump in self.seeds:
                try:
                    img = bytes(write_image(parse_dump(dump, name, strict=False)))
                except Exception:
                    continue
                self._images.append((name, img, image_fields(img)))
        return self._images

    def make_image_case(self, index: int) -> ImageCase:
        rng = random.Random(f"image:{self.seed}:{index}")
        name, img, fields = rng.choice(self.base_images())
        data, ops = mutate_image(rng, img, fields)
        filters = []
        if rng.random() < 0.1:
            names = [n.decode() for n in (b"00", b"a", b"chardev", b"inline", b"bigfile", b"nope", b"z", b"-")]
            filters = rng.sample(names, rng.choice([1, 2]))
            ops.append("filter " + ",".join(filters))
        return ImageCase(index, name, ops, data, filters)

    def check_image(self, case: ImageCase) -> Verdict:
        path = self.dir / "in.img"
        path.write_bytes(case.image)
        env = dict(self.ref_env, LD_PRELOAD=str(self.tools.guardmap))
        verdict = Verdict("same-output")
        args = [f"--filter={f}" for f in case.filters]
        for cmd in ("dump", "ls", "objects"):
            ref = run_reference([str(self.tools.composefs_info), *args, cmd, str(path)], env)
            bi = run_bootimg(["composefs-info", *args, cmd, str(path)])
            v = compare(ref, bi, lambda: ref.out == bi.out, lambda err: image_deliberate_rule(case.image, err))
            if v.kind == "disagree" and ref.rc == 0 and bi.rc != 0:
                # Did the reference read *before* the image (a wrapped 64-bit offset)? With the
                # image at a page start instead, such a read faults.
                again = run_reference([str(self.tools.composefs_info), *args, cmd, str(path)],
                                      dict(env, GUARDMAP_ALIGN="start"))
                if again.rc != 0:
                    v = Verdict("no-answer", f"reference reads before the image ({again.rc})")
            if v.kind not in ("same-output", "both-refuse"):
                v.detail = f"{cmd}: {v.detail}"
                return v
            verdict = v
        return verdict

    def run(self, n_dump: int, n_image: int, budget: float | None = None, start: int = 0,
            progress: Callable[[str, int, Report], None] | None = None) -> Report:
        report = Report()
        t0 = time.monotonic()
        for kind, n in (("dump", n_dump), ("image", n_image)):
            for i in range(start, start + n):
                if budget is not None and time.monotonic() - t0 > budget:
                    break
                if kind == "dump":
                    case: object = make_dump_case(self.seed, i, self.seeds)
                    report.add(f"dump {i}", self.check_dump(case), case)
                else:
                    case = self.make_image_case(i)
                    report.add(f"image {i}", self.check_image(case), case)
                if progress is not None:
                    progress(kind, i, report)
        report.seconds = time.monotonic() - t0
        return report


@contextlib.contextmanager
def fuzzer(tools: ReferenceTools, seed: int):
    f = Fuzzer(tools, seed)
    try:
        yield f
    finally:
        f.close()
