"""Small explicit cases where bootimg and the reference mkcomposefs 1.0.8 once disagreed, each
run through both: the same image bytes and printed digest, or both refusing; and the cases
where bootimg refuses on purpose what the reference accepts (docs/composefs-compat.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cfsfuzz import DELIBERATE, deliberate_rule, run_bootimg
from reference import mkcomposefs

ROOT = b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
DIGEST = b"0123456789abcdef" * 4


def _both(reference, tmp_path: Path, dump: bytes, *args: str, strict: bool = False):
    src = tmp_path / "in.dump"
    src.write_bytes(dump)
    ref_img, bi_img = tmp_path / "ref.img", tmp_path / "bi.img"
    for p in (ref_img, bi_img):
        p.unlink(missing_ok=True)
    ref = mkcomposefs(reference, *args, "--print-digest", "--from-file", str(src), str(ref_img), strict=strict)
    bi = run_bootimg(["mkcomposefs", "-q", *args, "--print-digest", "--from-file", str(src), str(bi_img)],
                     {"CFS_PARSE_STRICT": "1" if strict else None})
    assert bi.rc != "traceback", bi.err.decode()
    if bi.rc != 0:
        assert bi.rc == 1 and len(bi.err.decode().strip().splitlines()) == 1, bi.err
        assert not bi_img.exists()
    return ref, bi, ref_img, bi_img


def agree(reference, tmp_path: Path, dump: bytes, *args: str, strict: bool = False) -> bool:
    """Both accept with the same bytes (True) or both refuse (False)."""
    ref, bi, ref_img, bi_img = _both(reference, tmp_path, dump, *args, strict=strict)
    assert (ref.returncode == 0) == (bi.rc == 0), (ref.stderr, bi.err)
    if bi.rc == 0:
        assert bi_img.read_bytes() == ref_img.read_bytes()
        assert bi.out == ref.stdout
    return bi.rc == 0


AGREE = [
    # (what, dump after the root line, extra args, accepted?)
    ("symlink line without its content fields", b"/l 5 120777 1 0 0 0 0.0 targt\n", (), False),
    ("payload of 4095 bytes", b"/f 9 100644 1 0 0 0 0.0 " + b"p" * 4095 + b" - -\n", (), True),
    ("payload of 4096 bytes", b"/f 9 100644 1 0 0 0 0.0 " + b"p" * 4096 + b" - -\n", (), False),
    ("mtime of 2^64 saturates", b"/f 0 100644 1 0 0 0 18446744073709551616.0 - - -\n", (), True),
    ("mtime of 2^64 on the root", b"", (), True),
    ("nlink 2^32 is cut to 32 bits", b"/f 0 100644 4294967296 0 0 0 0.0 - - -\n", (), True),
    ("uid 2^32 + 1 is cut to 32 bits", b"/f 0 100644 1 4294967297 0 0 0.0 - - -\n", (), True),
    ("mtime nanoseconds 2^32 are cut", b"/f 0 100644 1 0 0 0 5.4294967296 - - -\n", (), True),
    ("mode -1", b"/f 0 -1 1 0 0 0 0.0 - - -\n", (), False),
    ("negative mode wrapping to a file", b"/f 0 -1777777777777777677134 1 0 0 0 0.0 - - -\n", (), True),
    ("mode bits above 16", b"/f 0 1100644 1 0 0 0 0.0 - - -\n", (), True),
    ("numbers after white space", b"/f 3 100644 1 \t7 \x0b0 0 \t1.\t1 - abc -\n", (), True),
    ("octal prefix is not octal", b"/f 0 0o100644 1 0 0 0 0.0 - - -\n", (), False),
    ("underscores are not digits", b"/f 0 100_644 1 0 0 0 0.0 - - -\n", (), False),
    ("relative path", b"f 0 100644 1 0 0 0 0.0 - - -\n", (), True),
    ("one space after the last xattr", b"/f 0 100644 1 0 0 0 0.0 - - - user.a=1 \n", (), True),
    ("one space after the digest field", b"/f 0 100644 1 0 0 0 0.0 - - - \n", (), True),
    ("two spaces between xattrs", b"/f 0 100644 1 0 0 0 0.0 - - - user.a=1  user.b=2\n", (), False),
    ("hardlink chain, lines in order", b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /c - -\n"
     b"/c 0 100644 1 0 0 0 0.0 - - -\n", (), True),
    ("hardlink loop", b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n", (), False),
    ("hardlink line with an invalid mode", b"/c 0 100644 1 0 0 0 0.0 - - -\n/h 0 @0 1 0 0 0 0.0 /c - -\n", (), False),
    ("size within 2^43 of 2^64: zero chunks", b"/f 18446744073709551615 100644 1 0 0 0 0.0 - - -\n", (), True),
    ("size of 1025 chunks", b"/f 9007199254740993 100644 1 0 0 0 0.0 - - -\n", (), False),
    ("escaped overlay xattr name of 263 bytes", b"/f 0 100644 1 0 0 0 0.0 - - - trusted.overlay." + b"o" * 239 + b"=v\n",
     (), True),
    ("trusted.overlay.x next to trusted.overlay.overlay.x",
     b"/f 0 100644 1 0 0 0 0.0 - - - trusted.overlay.overlay.x=2 trusted.overlay.x=1\n", (), True),
    ("whiteout whose own escaped xattr the writer replaces (size_t underflow)",
     b"/w 0 20777 1 0 0 0 0.0 - - - user.a=b trusted.overlay.whiteout=a\n", (), False),
    ("whiteout with only that xattr", b"/w 0 20777 1 0 0 0 0.0 - - - trusted.overlay.whiteout=a\n", (), True),
    ("rdev 2^32 on a chardev is a whiteout", b"/c 0 20644 1 0 0 4294967296 0.0 - - -\n", (), True),
    ("content of the wrong length on a symlink", b"/l 1 120777 1 0 0 0 0.0 t xy -\n", (), False),
    ("content on a directory", b"/d 3 40755 1 0 0 0 0.0 - abc -\n", (), True),
    ("invalid digest where none is written", b"/d 4096 40755 2 0 0 0 0.0 - - nothex\n", (), True),
    ("missing digest field on a directory", b"/d 4096 40755 2 0 0 0 0.0 - -\n", (), True),
    ("--min-version=1 --max-version=0: the maximum is raised", b"/w 0 20000 1 0 0 0 0.0 - - -\n",
     ("--min-version=1", "--max-version=0"), True),
    ("--min-version=0 alone: the maximum is 0", b"/w 0 20000 1 0 0 0 0.0 - - -\n", ("--min-version=0",), True),
    ("--min-version=2", b"", ("--min-version=2",), False),
    ("pre-1970 mtime is the oldest", b"/a 0 100644 1 0 0 0 -5.0 - - -\n/b 0 100644 1 0 0 0 3.0 - - -\n", (), True),
]


@pytest.mark.parametrize("what,lines,args,accepted", AGREE, ids=[a[0] for a in AGREE])
def test_agrees_with_reference(reference, tmp_path, what, lines, args, accepted):
    root = ROOT if what != "mtime of 2^64 on the root" else b"/ 4096 40755 2 0 0 0 18446744073709551616.5 - - -\n"
    assert agree(reference, tmp_path, root + lines, *args) == accepted


def test_strict_rdev_is_checked_before_truncation(reference, tmp_path):
    assert not agree(reference, tmp_path, ROOT + b"/f 0 100644 1 0 0 4294967296 0.0 - - -\n", strict=True)
    assert agree(reference, tmp_path, ROOT + b"/f 0 100644 1 0 0 4294967296 0.0 - - -\n")


DELIBERATE_CASES = [
    ("digest-not-64-hex", b"/f 9 100644 1 0 0 0 0.0 ab/cd - 0123\n"),
    ("digest-not-64-hex", b"/f 9 100644 1 0 0 0 0.0 ab/cd - " + DIGEST + b"00\n"),
    ("gid-rdev-unchecked", b"/f 0 100644 1 1 x 0 0.0 - - -\n"),
    ("gid-rdev-unchecked", b"/f 0 100644 1 1 0 x 0.0 - - -\n"),
    ("nul-in-c-string", b"/f 0 100644 1 0 0 0 0.0 ab\\x00cd - -\n"),
    ("nul-in-c-string", b"/f\\x00g 0 100644 1 0 0 0 0.0 - - -\n"),
    ("nul-in-c-string", b"/f 0 100644 1 0 0 0 0.0 - - - user.a\\x00b=1\n"),
    ("hardlink-to-directory", b"/d 4096 40755 2 0 0 0 0.0 - - -\n/h 0 @100644 1 0 0 0 0.0 /d - -\n"),
    ("hardlink-to-directory", b"/h 0 @100644 1 0 0 0 0.0 / - -\n"),
]


@pytest.mark.parametrize("rule,lines", DELIBERATE_CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(DELIBERATE_CASES)])
def test_deliberate_differences(reference, tmp_path, rule, lines):
    """The reference accepts these; bootimg refuses them with one line that names the rule, and
    the rule's own check confirms it (what the differential test relies on)."""
    dump = ROOT + lines
    ref, bi, _, _ = _both(reference, tmp_path, dump)
    assert ref.returncode == 0, ref.stderr
    assert bi.rc == 1
    found = deliberate_rule(dump, bi.err.decode().strip())
    assert found is not None and found.name == rule, bi.err


def test_every_deliberate_rule_has_a_case():
    assert {r.name for r in DELIBERATE} == {rule for rule, _ in DELIBERATE_CASES}


def test_seed_dumps_agree_unmutated(reference, tmp_path):
    """The fuzz seeds themselves: accepted by both with the same bytes (the should-fail ones
    refused by both), and composefs-info prints the same for each image."""
    from cfsfuzz import seed_dumps
    from reference import composefs_info

    for name, dump in seed_dumps():
        accepted = agree(reference, tmp_path, dump, strict=name == "synthetic")
        assert accepted == (not name.startswith("should-fail")), name
        if accepted:
            for cmd in ("dump", "ls", "objects"):
                ref = composefs_info(reference, cmd, str(tmp_path / "ref.img"))
                bi = run_bootimg(["composefs-info", cmd, str(tmp_path / "bi.img")])
                assert (ref.returncode, ref.stdout) == (bi.rc, bi.out), (name, cmd)
