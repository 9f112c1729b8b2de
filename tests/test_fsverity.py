"""fs-verity digests against known vectors and the `fsverity digest` C tool."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------
# The C accelerator (_fsverity_accel) against the pure-Python reference and the C tool

accel = fsverity._accel
needs_accel = pytest.mark.skipif(accel is None, reason="C extension _fsverity_accel not built")
SIZES = [0, 1, 12, B - 1, B, B + 1, 2 * B, 3 * B - 1, 128 * B, 128 * B + 1, 129 * B * 128 + 5]


@pytest.fixture(params=["openssl", "sha-ni-2x"])
def backend(request):
    """Run a test with each way the extension can hash blocks (OpenSSL EVP, or its own
    two-stream SHA-NI code on x86-64 CPUs with the SHA extensions)."""
    try:
        prev = accel._set_backend(request.param)
    except ValueError:
        pytest.skip(f"{request.param} not available on this CPU/build")
    try:
        yield request.param
    finally:
        accel._set_backend(prev)


def test_accelerator_built_when_required() -> None:
    """`make test` sets BOOTIMG_REQUIRE_ACCEL=1: then a missing extension is a failure, so CI
    proves the accelerated path is really built (needs gcc and libssl-dev at install time)."""
    if os.environ.get("BOOTIMG_REQUIRE_ACCEL") == "1":
        assert fsverity.ACCELERATED, (
            "bootimg.composefs._fsverity_accel is not importable; install gcc and libssl-dev, "
            "then `pip install -e .` (pip -v shows why the optional build failed)")
        from bootimg.composefs import _fsverity_accel  # noqa: F401
    elif not fsverity.ACCELERATED:
        pytest.skip("C extension not built (set BOOTIMG_REQUIRE_ACCEL=1 to make this fail)")
    assert fsverity.ACCELERATED == (accel is not None)


@needs_accel
def test_accel_uses_sha_ni_when_the_cpu_has_it() -> None:
    """The SHA-NI path is chosen at import unless its self-check against OpenSSL failed."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if os.uname().machine != "x86_64" or "sha_ni" not in flags:
        assert accel.backend() == "openssl"
    else:
        assert accel.backend() == "sha-ni-2x"


@needs_accel
@needs_tool
@pytest.mark.parametrize("size", SIZES)
def test_accel_matches_pure_and_tool(tmp_path, size: int, backend: str) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    want = tool_digest(path)
    assert fsverity._py_digest(data).hex() == want
    assert accel.digest_bytes(data).hex() == want
    assert accel.digest_bytes(bytearray(data)).hex() == want
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fsverity._py_digest_fd(fd).hex() == want
        assert fsverity._py_digest_fd(fd, size).hex() == want
        assert accel.digest_fd(fd).hex() == want
        assert accel.digest_fd(fd, -1).hex() == want
        assert accel.digest_fd(fd, size).hex() == want
    finally:
        os.close(fd)
    assert accel.digest_paths([path]) == [bytes.fromhex(want)]
    assert accel.digest_paths([os.fsencode(path)], [size]) == [bytes.fromhex(want)]
    assert fsverity._py_digest_paths([os.fspath(path)], [size]) == [bytes.fromhex(want)]


@needs_accel
@needs_tool
def test_accel_random_files_batch(tmp_path, backend: str) -> None:
    """Random sizes around the block, chunk and tree-level boundaries, as one batch."""
    rng = random.Random(1234)
    sizes = [rng.choice([rng.randrange(0, 3 * B), rng.randrange(0, 2 << 20),
                         accel.CHUNK_SIZE + rng.randrange(-B, B), 128 * B * rng.randrange(1, 4)])
             for _ in range(40)]
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(rng.randbytes(size))
        paths.append(os.fspath(p))
    out = subprocess.run(["fsverity", "digest", "--compact", *paths],
                         check=True, capture_output=True, text=True).stdout.split()
    want = [bytes.fromhex(h) for h in out]
    assert accel.digest_paths(paths, sizes) == want
    assert accel.digest_paths(paths) == want
    assert accel.digest_paths(paths, [None] * len(paths)) == want
    assert fsverity._py_digest_paths(paths, sizes) == want
    assert fsverity.digest_files(paths, workers=2, batch=7) == want


@needs_accel
def test_accel_short_file_is_eio(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * B + 5))
    fd = os.open(path, os.O_RDONLY)
    try:
        for impl in (accel.digest_fd, fsverity._py_digest_fd):
            with pytest.raises(OSError) as exc:
                impl(fd, 3 * B + 6)
            assert exc.value.errno == errno.EIO
            assert "ended after 12293 of 12294 bytes" in str(exc.value)
        # shorter than the file: the prefix is digested, as in the pure version
        assert accel.digest_fd(fd, 5000) == fsverity._py_digest(path.read_bytes()[:5000])
        with pytest.raises(ValueError):
            accel.digest_fd(fd, -2)
    finally:
        os.close(fd)
    for impl in (accel.digest_paths, fsverity._py_digest_paths):
        with pytest.raises(OSError) as exc:
            impl([path, path], [3 * B + 5, 3 * B + 6])
        assert exc.value.errno == errno.EIO and exc.value.filename == path


@needs_accel
def test_accel_refuses_symlink_and_names_first_failure(tmp_path) -> None:
    (tmp_path / "t").write_bytes(b"x" * 100)
    os.symlink("t", tmp_path / "l")
    for impl in (accel.digest_paths, fsverity._py_digest_paths):
        with pytest.raises(OSError) as exc:
            impl([tmp_path / "t", tmp_path / "l", tmp_path / "missing"])
        assert exc.value.errno == errno.ELOOP and exc.value.filename == tmp_path / "l"
        missing = os.fsencode(tmp_path / "missing")
        with pytest.raises(FileNotFoundError) as exc:
            impl([os.fsencode(tmp_path / "t"), missing])
        assert exc.value.filename == missing
    with pytest.raises(IsADirectoryError):
        accel.digest_paths([tmp_path])
    with pytest.raises(ValueError):
        accel.digest_paths([b"a\0b"])
    with pytest.raises(TypeError):
        accel.digest_paths([1])
    with pytest.raises(ValueError):
        accel.digest_paths([tmp_path / "t"], [1, 2])
    assert accel.digest_paths([]) == []


@needs_accel
def test_accel_public_api_delegates(tmp_path) -> None:
    data = os.urandom(5 * B + 7)
    path = tmp_path / "f"
    path.write_bytes(data)
    want = fsverity._py_digest(data)
    assert fsverity.digest(data) == want
    assert fsverity.digest_file(path) == want
    assert fsverity.digest_paths([path], [len(data)]) == [want]
    with pytest.raises(TypeError):  # not C-contiguous: same error as the pure version
        fsverity.digest(memoryview(data)[::2])


@needs_accel
def test_accel_releases_gil(tmp_path) -> None:
    """A digest blocked in read() on a pipe or in open() on a FIFO must let the writer thread
    run; holding the GIL would deadlock, so this runs in a subprocess with a timeout."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = f"""
import os, threading
from bootimg.composefs import _fsverity_accel as a, fsverity as f
data = os.urandom(1_000_003)
r, w = os.pipe()
out = []
t = threading.Thread(target=lambda: out.append(a.digest_fd(r)))
t.start()
with open(w, "wb") as fw:
    fw.write(data)
t.join()
assert out == [f._py_digest(data)], out
t = threading.Thread(target=lambda: out.append(a.digest_paths([{os.fspath(fifo)!r}])))
t.start()
with open({os.fspath(fifo)!r}, "wb") as fw:
    fw.write(data[:5000])
t.join()
assert out[1] == [f._py_digest(data[:5000])], out
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@needs_accel
def test_accel_threads_agree(backend: str) -> None:
    datas = [os.urandom(n) for n in (0, 1, B, 3 * B + 1, 1 << 20, (1 << 20) + 1)] * 4
    want = [fsverity._py_digest(d) for d in datas]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(accel.digest_bytes, datas)) == want
