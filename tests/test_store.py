"""Object store: naming, idempotence, atomicity, concurrency, copy fallbacks, fs-verity notice."""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest

from bootimg.composefs import fsverity
from bootimg.composefs import store as store_mod
from bootimg.composefs.store import ObjectStore
from bootimg.errors import BootimgError


def quiet_store(root: Path, **kw) -> ObjectStore:
    return ObjectStore(root, on_notice=lambda msg: None, **kw)


def temps(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith(".tmp")]


def make_files(d: Path, n: int, size: int = 10_000) -> list[Path]:
    d.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"f{i}"
        p.write_bytes(os.urandom(size + i))
        out.append(p)
    return out


def test_add_file_names_mode_and_idempotence(tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = os.urandom(123_457)
    src.write_bytes(data)
    st = quiet_store(tmp_path / "store")
    assert st.add_file(src) is True
    d = fsverity.digest(data)
    obj = Path(st.object_path(d))
    assert obj == tmp_path / "store" / d.hex()[:2] / d.hex()[2:]
    assert obj.read_bytes() == data
    assert stat.S_IMODE(obj.stat().st_mode) == 0o644
    assert st.has(d)
    before = obj.stat()

    assert st.add_file(src) is False
    assert st.add_file(src, d) is False
    after = obj.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert temps(tmp_path / "store") == []
    assert list(st.iter_objects()) == [(d, str(obj))]


def test_add_file_with_fd_and_verify(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"hello world\n")
    st = quiet_store(tmp_path / "store")
    fd = os.open(src, os.O_RDONLY)
    try:
        os.lseek(fd, 5, os.SEEK_SET)
        assert st.add_file(src, src_fd=fd, verify=True)
    finally:
        os.close(fd)
    assert st.has(fsverity.digest(b"hello world\n"))


def test_verify_rejects_wrong_digest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"content")
    st = quiet_store(tmp_path / "store")
    wrong = fsverity.digest(b"other")
    with pytest.raises(BootimgError, match="does not match"):
        st.add_file(src, wrong, verify=True)
    assert not st.has(wrong)
    assert temps(tmp_path / "store") == []


def test_no_temp_left_after_copy_failure(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(50_000))
    st = quiet_store(tmp_path / "store")

    def failing_copy(self, s: int, d: int, size: int) -> None:
        os.write(d, b"partial")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ObjectStore, "_copy", failing_copy)
    with pytest.raises(BootimgError) as exc:
        st.add_file(src)
    assert "Input/output error" in str(exc.value) and "\n" not in str(exc.value)
    assert temps(tmp_path / "store") == []
    assert list(st.iter_objects()) == []


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    st = quiet_store(tmp_path / "store")
    with pytest.raises(BootimgError, match="missing: cannot open"):
        st.add_file(tmp_path / "missing")
    (tmp_path / "dir").mkdir()
    with pytest.raises(BootimgError, match="cannot read"):
        st.add_file(tmp_path / "dir")
    os.symlink("dir", tmp_path / "link")
    with pytest.raises(BootimgError, match="cannot open"):
        st.add_file(tmp_path / "link")
    assert temps(tmp_path / "store") == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BootimgError, match="cannot create object store"):
        ObjectStore(tmp_path / "file" / "store")


def test_store_not_writable(tmp_path: Path, monkeypatch) -> None:
    st = quiet_store(tmp_path / "store")

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store_mod.tempfile, "mkstemp", denied)
    with pytest.raises(BootimgError, match="store: cannot create object in store: Permission"):
        st.add_bytes(b"x")


def test_add_bytes(tmp_path: Path) -> None:
    st = quiet_store(tmp_path / "store", fsync=False)
    d = st.add_bytes(b"hello world\n")
    assert d.hex() == "37061ef2ac4c21bec68489b56138c5780306a4ad7fe6676236ecdf2c9027cd92"
    assert Path(st.object_path(d)).read_bytes() == b"hello world\n"
    ino = os.stat(st.object_path(d)).st_ino
    assert st.add_bytes(b"hello world\n") == d
    assert os.stat(st.object_path(d)).st_ino == ino
    assert st.add_bytes(b"") == fsverity.EMPTY
    assert os.path.getsize(st.object_path(fsverity.EMPTY)) == 0
    assert temps(tmp_path / "store") == []


def test_fill_counts_missing_and_iter(tmp_path: Path) -> None:
    files = make_files(tmp_path / "src", 30)
    pairs = [(str(p), fsverity.digest_file(p)) for p in files]
    st = quiet_store(tmp_path / "store")
    assert st.missing([d for _, d in pairs[:3]] * 2) == [d for _, d in pairs[:3]]
    n, nbytes = st.fill(pairs[:10], threads=1)
    assert (n, nbytes) == (10, sum(p.stat().st_size for p in files[:10]))
    n, nbytes = st.fill(iter(pairs + pairs), threads=4)
    assert (n, nbytes) == (20, sum(p.stat().st_size for p in files[10:]))
    assert st.missing(d for _, d in pairs) == []
    assert sorted(d for d, _ in st.iter_objects()) == sorted(d for _, d in pairs)
    assert temps(tmp_path / "store") == []


def test_concurrent_threads_same_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(1_000_000))
    st = quiet_store(tmp_path / "store")
    barrier = threading.Barrier(8)
    results: list[bool] = []
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait()
        try:
            results.append(st.add_file(src))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 8 and any(results)
    assert [d for d, _ in st.iter_objects()] == [fsverity.digest_file(src)]
    assert temps(tmp_path / "store") == []


def _process_worker(root: str, paths: list[str], barrier) -> None:
    st = ObjectStore(root, on_notice=lambda msg: None)
    barrier.wait()
    for p in paths:
        st.add_file(p)


def test_concurrent_processes_same_content(tmp_path: Path) -> None:
    files = [str(p) for p in make_files(tmp_path / "src", 20, 200_000)]
    root = str(tmp_path / "store")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_process_worker, args=(root, files, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    objs = list(ObjectStore(root).iter_objects())
    assert sorted(d for d, _ in objs) == sorted(fsverity.digest_file(p) for p in files)
    assert sum(len(os.listdir(os.path.join(root, s))) for s in os.listdir(root)
               if not s.startswith(".")) == 20
    assert temps(Path(root)) == []


def test_copy_file_range_fallback(tmp_path: Path, monkeypatch) -> None:
    clone_calls, range_calls = [], []

    def no_clone(src: int, dst: int) -> None:
        clone_calls.append(1)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    real_range = os.copy_file_range

    def counting_range(*a):
        range_calls.append(1)
        return real_range(*a)

    monkeypatch.setattr(store_mod, "_ficlone", no_clone)
    monkeypatch.setattr(os, "copy_file_range", counting_range)
    files = make_files(tmp_path / "src", 5, 300_000)
    st = quiet_store(tmp_path / "store")
    for p in files:
        assert st.add_file(p, verify=True)
        assert Path(st.object_path(fsverity.digest_file(p))).read_bytes() == p.read_bytes()
    assert st.copy_method == "copy_file_range"
    assert len(clone_calls) == 1  # remembered, not retried per file
    assert len(range_calls) >= 5


def test_read_write_fallback(tmp_path: Path, monkeypatch) -> None:
    range_calls = []

    def no_range(*a):
        range_calls.append(1)
        raise OSError(errno.ENOSYS, "Function not implemented")

    def no_clone(src: int, dst: int) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(store_mod, "_ficlone", no_clone)
    monkeypatch.setattr(os, "copy_file_range", no_range)
    files = make_files(tmp_path / "src", 4, 3_000_000)
    st = quiet_store(tmp_path / "store")
    for p in files:
        assert st.add_file(p, verify=True)
    assert st.copy_method == "readwrite" and len(range_calls) == 1
    for p in files:
        assert Path(st.object_path(fsverity.digest_file(p))).read_bytes() == p.read_bytes()


def test_verity_notice_once(tmp_path: Path, monkeypatch) -> None:
    def unsupported(fd: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fsverity, "enable_fd", unsupported)
    notices: list[str] = []
    st = ObjectStore(tmp_path / "store", on_notice=notices.append)
    assert st.verity_enabled is None
    pairs = [(str(p), None) for p in make_files(tmp_path / "src", 40)]
    assert st.fill(pairs, threads=4)[0] == 40
    st.add_bytes(b"more")
    assert len(notices) == 1
    assert "does not support fs-verity" in notices[0] and str(tmp_path / "store") in notices[0]
    assert st.verity_enabled is False


def test_verity_on_this_host(tmp_path: Path, capsys) -> None:
    """Real ioctl: on a kernel/filesystem without fs-verity the default notice goes to stderr
    once; with it, objects get verity and the kernel's digest matches the name."""
    st = ObjectStore(tmp_path / "store")
    d1 = st.add_bytes(b"one")
    st.add_bytes(b"two")
    err = capsys.readouterr().err
    if st.verity_enabled:
        assert err == ""
        fd = os.open(st.object_path(d1), os.O_RDONLY)
        try:
            assert fsverity.measure_fd(fd) == d1
        finally:
            os.close(fd)
    else:
        assert st.verity_enabled is False
        assert err.count("bootimg: note:") == 1


def test_verity_enabled_path(tmp_path: Path, monkeypatch) -> None:
    enabled: list[int] = []
    monkeypatch.setattr(fsverity, "enable_fd", lambda fd: enabled.append(fd))
    monkeypatch.setattr(fsverity, "measure_fd", lambda fd: fsverity.digest_fd(fd))
    st = quiet_store(tmp_path / "store")
    src = tmp_path / "src"
    src.write_bytes(b"abc" * 5000)
    assert st.add_file(src, verify=True)
    assert st.verity_enabled is True and len(enabled) == 1


def test_verity_other_error_names_object(tmp_path: Path, monkeypatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsverity, "enable_fd", broken)
    st = quiet_store(tmp_path / "store")
    with pytest.raises(BootimgError) as exc:
        st.add_bytes(b"data")
    d = fsverity.digest(b"data")
    assert fsverity.object_name(d) in str(exc.value)
    assert "cannot enable fs-verity" in str(exc.value)
    assert not st.has(d)
    assert temps(tmp_path / "store") == []
