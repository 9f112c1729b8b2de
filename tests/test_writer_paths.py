"""The writer's C core (_imagepack: xattr preparation, placement, packing) and the Python code
it replaces give the same bytes: on every reference vector (so both match mkcomposefs 1.0.8),
on a generated tree with every corner, and on the errors."""

from __future__ import annotations

import hashlib
import os

import pytest
from conftest import checksummed_vectors
from treegen import dump_of_tree, make_tree

from bootimg.composefs import writer
from bootimg.composefs.dump import parse_dump
from bootimg.composefs.writer import ImageOptions, write_image
from bootimg.errors import FormatError

VECTORS = checksummed_vectors()


@pytest.fixture
def both(monkeypatch):
    """Call f() with the C core, then without it; return both results."""
    if writer._imagepack is None:
        if os.environ.get("BOOTIMG_REQUIRE_ACCEL") == "1":
            pytest.fail("the C writer core _imagepack was not built")
        pytest.skip("C writer core not built")

    def run(f):
        with_c = f()
        with monkeypatch.context() as m:
            m.setattr(writer, "_imagepack", None)
            with_py = f()
        return with_c, with_py
    return run


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v.name)
def test_c_and_python_cores_agree_on_the_vectors(vec, both):
    options = ImageOptions(vec.version, vec.version) if vec.version is not None else ImageOptions()
    with_c, with_py = both(lambda: write_image(parse_dump(vec.dump(), vec.name, strict=vec.strict), options))
    assert with_c == with_py
    assert hashlib.sha256(with_py).hexdigest() == vec.sha256


def test_c_and_python_cores_agree_on_a_generated_tree(tmp_path, both):
    root = make_tree(tmp_path / "src")
    dump = dump_of_tree(root)
    for options in (ImageOptions(0, 1), ImageOptions(1, 1)):
        with_c, with_py = both(lambda: write_image(parse_dump(dump, "tree", strict=True), options))
        assert with_c == with_py


def test_shared_xattrs_and_long_directories_agree(both):
    """Many files sharing xattr pairs (the shared table, the 128-id cap per inode) and a
    directory spanning blocks."""
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - - user.root=1"]
    common = b" ".join(b"user.c%03d=%s" % (i, b"v" * (i % 7)) for i in range(140))
    for i in range(300):
        lines.append(b"/f%04d%s 0 100644 1 %d 0 0 %d.0 - - - %s user.own=%d" % (i, b"x" * 40, i, i, common, i))
    lines.append(b"/big 70000 100644 1 0 0 0 0.0 - - 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    dump = b"\n".join(lines) + b"\n"
    with_c, with_py = both(lambda: write_image(parse_dump(dump, "t", strict=False)))
    assert with_c == with_py


def test_xattr_budget_error_is_the_same(both):
    """The writer's final check of a hand-built tree (the dump parser and the writer's own additions
    keep the reference's 32767 as they go)."""
    from bootimg.composefs.tree import Node

    root = Node(0o40755)
    d = root.add_child(b"d", Node(0o40755))
    x = d.add_child(b"x", Node(0o100644))
    x.xattrs = {b"user.k%d" % i: b"v" * 300 for i in range(220)}     # over the 64 KiB the format allows

    def message():
        with pytest.raises(FormatError) as err:
            write_image(root)
        return str(err.value)
    with_c, with_py = both(message)
    assert with_c == with_py and "/d/x: too many xattrs" in with_c


def test_c_and_python_cores_agree_on_the_edge_cases(both):
    """What the differential test found (it runs the C core): 64-bit sizes whose chunk count
    wraps, mtimes of 2^63 and more (negative to the reference), escaped overlay names of 263
    bytes, and the fuzz engine's synthetic dump with every file type."""
    import random

    from cfsfuzz import synthetic_dump

    dump = synthetic_dump(random.Random(3)) + (
        b"/huge 18446744073709551615 100644 1 0 0 0 0.0 - - -\n"
        b"/old 0 100644 1 0 0 0 18446744073709551611.5 - - -\n"
        b"/esc 0 100644 1 0 0 0 1.0 - - - trusted.overlay." + b"o" * 239 + b"=v trusted.overlay.overlay.x=1\n")
    for options in (ImageOptions(0, 1), ImageOptions(1, 1)):
        with_c, with_py = both(lambda: write_image(parse_dump(dump, "edge", strict=False), options))
        assert with_c == with_py
