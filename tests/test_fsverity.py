"""fs-verity digests against known vectors and the `fsverity digest` C tool."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading

import pytest

from bootimg.composefs import fsverity

HELLO = "37061ef2ac4c21bec68489b56138c5780306a4ad7fe6676236ecdf2c9027cd92"
EMPTY = "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
B = 4096

needs_tool = pytest.mark.skipif(shutil.which("fsverity") is None,
                                reason="fsverity tool missing (apt-get install fsverity)")


def tool_digest(path: os.PathLike[str] | str) -> str:
    out = subprocess.run(["fsverity", "digest", "--compact", os.fspath(path)],
                         check=True, capture_output=True, text=True).stdout
    return out.strip()


def test_hello_world_vector() -> None:
    assert fsverity.digest(b"hello world\n").hex() == HELLO


def test_empty_is_kernel_convention() -> None:
    assert fsverity.EMPTY.hex() == EMPTY
    assert fsverity.digest(b"") == fsverity.EMPTY


@needs_tool
@pytest.mark.parametrize("size", [0, 1, 12, B - 1, B, B + 1, 128 * B, 128 * B + 1,
                                  129 * B * 128 + 5])
def test_matches_tool(tmp_path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    want = tool_digest(path)
    assert fsverity.digest(data).hex() == want
    assert fsverity.digest_file(path).hex() == want
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fsverity.digest_fd(fd).hex() == want
        assert fsverity.digest_fd(fd, size).hex() == want
    finally:
        os.close(fd)


@needs_tool
def test_random_20mb_file(tmp_path) -> None:
    path = tmp_path / "big"
    data = os.urandom(20_000_003)
    path.write_bytes(data)
    want = tool_digest(path)
    assert fsverity.digest_file(path).hex() == want
    assert fsverity.digest(memoryview(data)).hex() == want


def test_digest_fd_ignores_position_and_honours_size(tmp_path) -> None:
    data = os.urandom(3 * fsverity.CHUNK_SIZE + 777)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 12345, os.SEEK_SET)
        assert fsverity.digest_fd(fd) == fsverity.digest(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 12345
        assert fsverity.digest_fd(fd, 5000) == fsverity.digest(data[:5000])
        with pytest.raises(OSError) as exc:
            fsverity.digest_fd(fd, len(data) + 1)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_digest_fd_pipe() -> None:
    data = os.urandom(300_001)
    r, w = os.pipe()

    def writer() -> None:
        with open(w, "wb") as f:
            f.write(data)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert fsverity.digest_fd(r) == fsverity.digest(data)
    finally:
        t.join()
        os.close(r)


def test_hasher_any_piece_sizes() -> None:
    data = os.urandom(5 * B + 123)
    for step in (1, 100, B - 1, B, B + 1, 3 * B, len(data)):
        h = fsverity.Hasher()
        for i in range(0, len(data), step):
            h.update(data[i : i + step])
        assert h.digest() == fsverity.digest(data), step
    assert fsverity.Hasher().digest() == fsverity.EMPTY


def test_digest_file_refuses_symlink(tmp_path) -> None:
    (tmp_path / "t").write_bytes(b"x")
    os.symlink("t", tmp_path / "l")
    with pytest.raises(OSError) as exc:
        fsverity.digest_file(tmp_path / "l")
    assert exc.value.errno == errno.ELOOP


def test_names() -> None:
    d = bytes.fromhex(HELLO)
    assert fsverity.hexdigest(d) == HELLO
    assert fsverity.object_name(d) == "37/" + HELLO[2:]
    assert len(fsverity.object_name(d)) == 65
    with pytest.raises(ValueError):
        fsverity.object_name(b"short")


def test_ioctl_numbers() -> None:
    assert fsverity.FS_IOC_ENABLE_VERITY == 0x40806685
    assert fsverity.FS_IOC_MEASURE_VERITY == 0xC0046686


def test_formatted_digest_for_signing() -> None:
    d = bytes(range(32))
    blob = fsverity.fsverity_descriptor_digest_for_signing(d)
    assert blob == b"FSVerity\x01\x00\x20\x00" + d


def test_kernel_ioctls(tmp_path) -> None:
    """Without kernel fs-verity (this host): measure is None, enable fails cleanly. With it:
    the kernel's digest equals ours."""
    data = b"hello world\n"
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fsverity.measure_fd(fd) is None
        try:
            fsverity.enable_fd(fd)
        except OSError as e:
            assert e.errno in (errno.EOPNOTSUPP, errno.ENOTTY)
            assert fsverity.measure_fd(fd) is None
        else:
            assert fsverity.measure_fd(fd) == fsverity.digest(data)
    finally:
        os.close(fd)


def test_digest_files_in_process_and_in_workers(tmp_path) -> None:
    paths = []
    for i in range(12):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(i * 1000 + 1))
        paths.append(p)
    want = [fsverity.digest(p.read_bytes()) for p in paths]
    assert fsverity.digest_files(paths) == want
    assert fsverity.digest_files(paths, workers=2, batch=2) == want  # spawned processes


def test_digest_files_error_names_file(tmp_path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    paths = [tmp_path / "a"] * 6 + [tmp_path / "missing"]
    with pytest.raises(OSError) as exc:
        fsverity.digest_files(paths, workers=2, batch=2)
    assert exc.value.errno == errno.ENOENT and exc.value.filename == str(tmp_path / "missing")
