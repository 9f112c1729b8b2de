"""The reference implementation's own vectors: exact bytes, round trips, rejected inputs."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from conftest import checksummed_vectors, have, run_cli, should_fail_dumps

from bootimg.composefs import fsverity
from bootimg.composefs.dump import parse_dump
from bootimg.composefs.writer import ImageOptions, write_image
from bootimg.errors import FormatError

VECTORS = checksummed_vectors()


def test_all_reference_vectors_present(assets):
    # 14 dumps with checksums upstream (f36 and the three orphan checksums have no dump).
    assert len(VECTORS) == 14
    assert len(should_fail_dumps()) == 14


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v.name)
def test_cli_reproduces_reference_checksum(vec, tmp_path):
    """`bootimg mkcomposefs --from-file -` writes exactly the bytes mkcomposefs 1.0.8 wrote,
    and the round trip through `composefs-info dump` reproduces them too."""
    out = tmp_path / "out.cfs"
    env = {"CFS_PARSE_STRICT": "1"} if vec.strict else {}
    res = run_cli("mkcomposefs", "--print-digest", *vec.version_args(), "--from-file", "-", str(out),
                  input=vec.dump(), env=env)
    assert res.returncode == 0, res.stderr.decode()
    image = out.read_bytes()
    assert hashlib.sha256(image).hexdigest() == vec.sha256
    # --print-digest prints the image's fs-verity digest.
    assert res.stdout.decode().strip() == fsverity.digest(image).hex()

    dumped = run_cli("composefs-info", "dump", str(out))
    assert dumped.returncode == 0, dumped.stderr.decode()
    out2 = tmp_path / "out2.cfs"
    again = run_cli("mkcomposefs", *vec.version_args(), "--from-file", "-", str(out2), input=dumped.stdout,
                    env={"CFS_PARSE_STRICT": "1"})
    assert again.returncode == 0, again.stderr.decode()
    assert out2.read_bytes() == image


@pytest.mark.skipif(not have("fsck.erofs"), reason="erofs-utils not installed")
@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v.name)
def test_fsck_erofs_accepts_vector_images(vec, tmp_path):
    opts = ImageOptions(vec.version, vec.version) if vec.version is not None else ImageOptions()
    image = tmp_path / "img"
    image.write_bytes(write_image(parse_dump(vec.dump(), vec.name, strict=vec.strict), opts))
    res = subprocess.run(["fsck.erofs", str(image)], capture_output=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", should_fail_dumps(), ids=lambda p: p.name)
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_should_fail_rejected_cleanly(path, strict, tmp_path):
    """One line naming the file and the problem, exit 1, no traceback, no image left."""
    out = tmp_path / "out.cfs"
    env = {"CFS_PARSE_STRICT": "1"} if strict else {}
    res = run_cli("mkcomposefs", "--from-file", str(path), str(out), env=env)
    err = res.stderr.decode()
    assert res.returncode == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert path.name in lines[0]
    assert not out.exists()
    assert os.listdir(tmp_path) == []        # no temp file either


def _reason(dump: bytes, strict: bool = False) -> str:
    with pytest.raises(FormatError) as exc:
        write_image(parse_dump(dump, "t.dump", strict=strict))
    return str(exc.value)


ROOT = b"/ 4096 40555 2 0 0 0 0.0 - - -\n"


@pytest.mark.parametrize("line,expected", [
    (b"/inlinebig 5004 100777 1 0 0 0 0.0 - " + b"x" * 5004 + b" -\n", "exceeds maximum 5000"),
    (b"/rootlink 4096 @40555 2 0 0 0 0.0 / - -\n", "directories can't be hardlinked"),
    (b"/. 4096 40555 2 0 0 0 0.0 - - -\n", "invalid '.' or '..'"),
    (b"/.. 4096 40555 2 0 0 0 0.0 - - -\n", "invalid '.' or '..'"),
    (b"/nolinkname 0 120777 1 0 0 0 0.0 - - -\n", "invalid symlink"),
    (b"// 4096 40555 2 0 0 0 0.0 - - -\n", "empty file name"),
    (b"/k 0 100644 1 0 0 0 0.0 - - - =v\n", "invalid xattr name length 0"),
    (b"/link 5 120777 1 0 0 0 0.0 " + b"a" * 4096 + b" - -\n", "invalid symlink"),
    (b"/m 0 644 1 0 0 0 0.0 - - -\n", "invalid mode 644"),
    (b"/n 3 0 1 0 0 0 0.0 foo - -\n", "invalid mode 0"),
    (b"/self 0 @100644 2 0 0 0 0.0 /self - -\n", "self-referential hardlink"),
    (b"/big 9500000000000000 100777 1 0 0 0 0.0 - - -\n", "file too large"),
    (b"/x 0 100644 1 0 0 0 0.0 - - - " + b" ".join(b"user.k%d=%s" % (i, b"v" * 300) for i in range(110)) + b"\n",
     "too many xattrs"),
    (b"/e 0 100644 1 0 0 0 0.0 - - - user.a=\\q\n", "invalid escape"),
    (b"/t 0 100644 1 0 0 0 1 - - -\n", "invalid mtime"),
    (b"/d 5 100644 1 0 0 0 0.0 - - nothex\n", "digest must be 64 hex digits"),
    (b"/missing/child 0 100644 1 0 0 0 0.0 - - -\n", "not found"),
    (b"/h 0 @100644 2 0 0 0 0.0 /nowhere - -\n", "not found"),
])
def test_rejection_reasons(line, expected):
    """Each should-fail class is rejected for its own reason, with the dump's line number."""
    msg = _reason(ROOT + line)
    assert expected in msg
    assert msg.startswith("t.dump:")


def test_strict_mode_checks():
    assert "rdev must be 0" in _reason(b"/ 4096 40555 2 0 0 7 0.0 - - -\n", strict=True)
    assert "missing newline" in _reason(ROOT.rstrip(b"\n"), strict=True)
    assert "does not match its target" in _reason(ROOT + b"/l 9 120777 1 0 0 0 0.0 abc - -\n", strict=True)
    # The same inputs are fine without strict parsing (as upstream).
    for dump in (b"/ 4096 40555 2 0 0 7 0.0 - - -\n", ROOT.rstrip(b"\n"), ROOT + b"/l 9 120777 1 0 0 0 0.0 abc - -\n"):
        write_image(parse_dump(dump, "t.dump", strict=False))


def test_versions_differ_only_where_format_says():
    """Without whiteouts v0 and v1 differ only in the header's version field."""
    root = parse_dump(ROOT + b"/f 3 100644 1 0 0 0 0.0 - abc -\n", "t", strict=True)
    v0 = write_image(root, ImageOptions(0, 0))
    v1 = write_image(root, ImageOptions(1, 1))
    diff = [i for i in range(len(v0)) if v0[i] != v1[i]]
    assert diff == [12]
    assert write_image(root, ImageOptions(0, 1)) == v0    # no whiteout: stays v0


def test_bad_version_range_is_a_clean_error(tmp_path):
    res = run_cli("mkcomposefs", "--min-version=2", "--from-file", "-", str(tmp_path / "o"),
                  input=ROOT)
    assert res.returncode == 1 and b"Traceback" not in res.stderr and b"version" in res.stderr
