"""Directory mode: a scanned tree gives exactly the image its dump gives (the dump computed
independently, with the fsverity tool's digests), with every option and the object store."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
from conftest import have, run_cli
from treegen import dump_of_tree, fsverity_digest_tool, make_tree

from bootimg.composefs.dump import parse_dump
from bootimg.composefs.writer import write_image

pytestmark = pytest.mark.skipif(not have("fsverity"), reason="fsverity-utils not installed")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("scan") / "src")


def _build(src, out, *opts):
    res = run_cli("mkcomposefs", *opts, str(src), str(out))
    assert res.returncode == 0, res.stderr.decode()
    return out.read_bytes()


@pytest.mark.parametrize("opts,kw", [
    ((), {}),
    (("--use-epoch",), {"use_epoch": True}),
    (("--skip-devices",), {"skip_devices": True}),
    (("--user-xattrs",), {"user_xattrs": True}),
    (("--skip-xattrs",), {"skip_xattrs": True}),
    (("--threads=1",), {}),
])
def test_directory_image_equals_dump_image(tree, tmp_path, opts, kw):
    image = _build(tree, tmp_path / "dir.cfs", *opts)
    expected = write_image(parse_dump(dump_of_tree(tree, **kw), "expected", strict=True))
    assert image == expected


@pytest.mark.parametrize("kw", [{}, {"use_epoch": True}, {"skip_devices": True}, {"user_xattrs": True},
                                {"skip_xattrs": True}])
def test_c_and_python_walks_agree(tree, monkeypatch, kw):
    """The C directory reader (one call per directory) and the os.scandir walk it replaces
    build the same tree: same image, same external files in the same order."""
    from bootimg.composefs import scan

    if scan._scandir is None:
        if os.environ.get("BOOTIMG_REQUIRE_ACCEL") == "1":
            pytest.fail("the C directory reader _scandir was not built")
        pytest.skip("C directory reader not built")
    options = scan.ScanOptions(threads=1, **kw)
    with_c = scan.scan_directory(str(tree), options)
    monkeypatch.setattr(scan, "_scandir", None)
    with_py = scan.scan_directory(str(tree), options)
    assert write_image(with_c.root) == write_image(with_py.root)
    assert [p for p, _ in with_c.external] == [p for p, _ in with_py.external]
    assert with_c.n_files == with_py.n_files and with_c.bytes_hashed == with_py.bytes_hashed


@pytest.mark.parametrize("walker", ["c", "python"])
def test_walk_error_names_the_path(tmp_path, monkeypatch, walker):
    """A path longer than PATH_MAX inside the tree: one clean error naming it, no image."""
    from bootimg.composefs import scan
    from bootimg.errors import BootimgError

    if walker == "python":
        monkeypatch.setattr(scan, "_scandir", None)
    elif scan._scandir is None:
        pytest.skip("C directory reader not built")
    src = tmp_path / "deep"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):                       # 20 x 255 bytes: past PATH_MAX (4096)
            os.mkdir("d" * 255, dir_fd=fd)
            new = os.open("d" * 255, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
    finally:
        os.close(fd)
    with pytest.raises(BootimgError) as err:
        scan.scan_directory(str(src), scan.ScanOptions(threads=1))
    message = str(err.value)
    assert "File name too long" in message and str(src) in message and "\n" not in message
    if walker == "c":
        res = run_cli("mkcomposefs", str(src), str(tmp_path / "out.cfs"))
        assert res.returncode == 1 and b"Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and b"File name too long" in res.stderr
        assert not (tmp_path / "out.cfs").exists()
    # rm -r cannot remove what it cannot name either; shutil can (it walks with dir fds).
    shutil.rmtree(src)


def test_tree_covers_the_corners(tree, tmp_path):
    """The generated tree really holds what the test claims to cover."""
    image = _build(tree, tmp_path / "dir.cfs")
    dumped = run_cli("composefs-info", "dump", str(tmp_path / "dir.cfs")).stdout
    lines = dumped.splitlines()
    modes = {int(line.split(b" ")[2].lstrip(b"@"), 8) for line in lines}
    kinds = {stat.S_IFMT(m) for m in modes}
    assert {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK} <= kinds
    if os.geteuid() == 0:
        assert {stat.S_IFCHR, stat.S_IFBLK} <= kinds
        assert b"trusted.overlay.redirect=/escaped" in dumped       # escaped and unescaped back
    assert any(len(os.path.basename(line.split(b" ")[0])) == 255 for line in lines)
    assert any(m & 0o7000 for m in modes)
    assert len(image) % 4096 == 0


def test_copy_gives_same_image(tree, tmp_path):
    """The image depends only on names, metadata, xattrs and content."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
    assert _build(tree, tmp_path / "a.cfs") == _build(copy, tmp_path / "b.cfs")


def test_digest_store_fill(tree, tmp_path):
    store = tmp_path / "store"
    out = tmp_path / "img.cfs"
    res = run_cli("mkcomposefs", "--print-digest", f"--digest-store={store}", str(tree), str(out))
    assert res.returncode == 0, res.stderr.decode()
    objects = run_cli("composefs-info", "objects", str(out)).stdout.decode().split()
    on_disk = sorted(os.path.relpath(os.path.join(d, f), store) for d, _, fs in os.walk(store) for f in fs)
    assert on_disk == sorted(objects)
    for rel in on_disk:
        path = store / rel
        assert fsverity_digest_tool(path) == rel.replace("/", "")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    missing = run_cli("composefs-info", f"--basedir={store}", "missing-objects", str(out))
    assert missing.returncode == 0 and missing.stdout == b""
    # The image is the same with and without a store, and a second fill adds nothing.
    assert out.read_bytes() == _build(tree, tmp_path / "nostore.cfs")
    before = {p: os.stat(store / p).st_mtime_ns for p in on_disk}
    run_cli("mkcomposefs", f"--digest-store={store}", str(tree), str(tmp_path / "again.cfs"))
    assert {p: os.stat(store / p).st_mtime_ns for p in on_disk} == before
    # A removed object is reported as missing.
    os.unlink(store / on_disk[0])
    missing = run_cli("composefs-info", f"--basedir={store}", "missing-objects", str(out))
    assert missing.stdout.decode().split() == [on_disk[0]]


def test_source_errors_are_clean(tmp_path):
    res = run_cli("mkcomposefs", str(tmp_path / "nope"), str(tmp_path / "out.cfs"))
    assert res.returncode == 1
    assert b"Traceback" not in res.stderr and b"nope" in res.stderr
    assert not (tmp_path / "out.cfs").exists()
    unreadable = tmp_path / "src"
    unreadable.mkdir()
    (unreadable / "f").write_bytes(b"x" * 100)
    os.chmod(unreadable / "f", 0)
    if os.geteuid() != 0:
        res = run_cli("mkcomposefs", str(unreadable), str(tmp_path / "out.cfs"))
        assert res.returncode == 1 and b"Traceback" not in res.stderr


def test_print_digest_only_writes_nothing(tree, tmp_path):
    res = run_cli("mkcomposefs", "--print-digest-only", str(tree), cwd=str(tmp_path))
    assert res.returncode == 0
    assert len(res.stdout.strip()) == 64
    assert os.listdir(tmp_path) == []
    image = _build(tree, tmp_path / "x.cfs")
    measured = run_cli("composefs-info", "measure-file", str(tmp_path / "x.cfs")).stdout.strip()
    assert measured == res.stdout.strip()
    assert shutil.which("fsverity") and fsverity_digest_tool(tmp_path / "x.cfs") == measured.decode()
    assert image


def _stderr_on_a_terminal(args: list[str]) -> bytes:
    """Run the CLI with stderr on a pseudo-terminal, as a person at a shell would."""
    import pty
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "bootimg", *args], stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks)


def test_progress_on_a_terminal_and_quiet(tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(300):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    shown = _stderr_on_a_terminal(["mkcomposefs", str(src), str(tmp_path / "a.cfs")])
    assert b"MB" in shown or b"scanning" in shown
    quiet = _stderr_on_a_terminal(["mkcomposefs", "--quiet", str(src), str(tmp_path / "b.cfs")])
    assert quiet == b""
    # Not a terminal: nothing either (CI logs stay clean).
    res = run_cli("mkcomposefs", str(src), str(tmp_path / "c.cfs"))
    assert res.stderr == b""
