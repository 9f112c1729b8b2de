"""Where `bootimg build` puts a release: --force replaces only a release, builds of one output
take turns, a killed build never leaves OUT without a complete release and what it leaves
behind is cleaned by the next build, and an output it cannot write is one line."""

from __future__ import annotations

import fcntl
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import example_workspace, run_cli

from bootimg.release import layout, output
from bootimg.release.verify import verify_release
from bootimg.signing import PublicKey


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return example_workspace(tmp_path_factory.mktemp("ws"))


def build_args(ws: Path, out: Path, *extra: str) -> list[str]:
    """`bootimg build` of the example (the one place its command line is made here)."""
    return ["build", str(ws / "manifests" / "ivi-demo.yaml"), "-o", str(out),
            "--key", str(ws / "build" / "keys" / "release-2026.key"), "--no-boot-check", *extra]


def build(ws: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(*build_args(ws, out, *extra))


def popen_build(ws: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("CFS_PARSE_STRICT", None)
    return subprocess.Popen([sys.executable, "-m", "bootimg", *build_args(ws, out, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def trusted_keys(ws: Path) -> list[PublicKey]:
    return [PublicKey.from_file(ws / "build" / "keys" / "release-2026.pub")]


def tree_bytes(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def tree_state(top: Path) -> dict[str, tuple]:
    """Every entry under top with its kind, mode, size and content (directories included)."""
    state = {}
    for p in sorted([top, *top.rglob("*")]):
        st = p.lstat()
        state[str(p.relative_to(top))] = (st.st_mode, st.st_size, p.read_bytes() if p.is_file() else None)
    return state


def one_line(res: subprocess.CompletedProcess) -> str:
    err = res.stderr.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of a clean build."""
    out = tmp_path_factory.mktemp("ref") / "release"
    res = build(workspace, out)
    assert res.returncode == 0, res.stderr.decode()
    return tree_bytes(out)


# -- --force replaces only a release -------------------------------------------------------------

@pytest.mark.parametrize("case", ["foreign-dir", "manifests-dir", "release-plus-file", "file", "symlink",
                                  "fifo", "not-a-release-json"])
def test_force_refuses_what_is_not_a_release(workspace, reference, tmp_path, case):
    out = tmp_path / "target"
    if case == "foreign-dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    elif case == "manifests-dir":
        shutil.copytree(workspace / "manifests", out)
    elif case == "release-plus-file":
        assert build(workspace, out).returncode == 0
        (out / "README").write_text("added by hand\n")
    elif case == "file":
        out.write_text("a file\n")
    elif case == "symlink":
        (tmp_path / "real").mkdir()
        assert build(workspace, tmp_path / "real" / "rel").returncode == 0
        out.symlink_to(tmp_path / "real" / "rel")
    elif case == "fifo":
        os.mkfifo(out)
    else:
        out.mkdir()
        (out / "release.json").write_text('{"format": "something-else"}\n')
        (out / "images").mkdir()
    before = tree_state(tmp_path)
    res = build(workspace, out, "--force")
    assert res.returncode == 1
    err = one_line(res)
    assert str(out) in err and "--force only replaces a release bootimg built" in err
    assert tree_state(tmp_path) == before            # nothing touched, nothing added


def test_force_replaces_a_release_and_an_empty_directory(workspace, reference, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    res = build(workspace, out, "--force")
    assert res.returncode == 0, res.stderr.decode()
    assert tree_bytes(out) == reference
    (out / "sharing.json").write_text("{}\n")         # a release someone edited is still a release
    res = build(workspace, out, "--force")
    assert res.returncode == 0, res.stderr.decode()
    assert tree_bytes(out) == reference
    assert os.listdir(tmp_path) == ["r"]


@pytest.mark.parametrize("where", ["read-only", "full", "proc", "root", "parent-is-a-file"])
def test_unwritable_output_is_one_line(workspace, tmp_path, where):
    if where in ("read-only", "full"):
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a tmpfs")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m" if where == "read-only" else "size=1m", "none",
                        str(mnt)], check=True)
        try:
            results = [build(workspace, mnt / "out"), build(workspace, mnt / "sub" / "out")]
            if where == "full":
                assert os.listdir(mnt) == ["sub"]         # no partial release, no temporary, no lock file
                assert os.listdir(mnt / "sub") == []
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    elif where == "proc":
        results = [build(workspace, Path("/proc/bootimg-out")), build(workspace, Path("/proc/self/out"))]
    elif where == "root":
        results = [build(workspace, Path("/"), "--force")]
    else:
        (tmp_path / "f").write_text("x")
        results = [build(workspace, tmp_path / "f" / "out")]
    for res in results:
        assert res.returncode == 1
        one_line(res)


# -- builds of one output take turns -----------------------------------------------------------------

def test_concurrent_builds_without_force_exactly_one_wins(workspace, reference, tmp_path):
    for round_ in range(3):
        parent = tmp_path / f"round{round_}"
        parent.mkdir()
        out = parent / "rel"
        results = _finish([popen_build(workspace, out) for _ in range(4)])
        winners = [err for rc, err in results if rc == 0]
        losers = [err for rc, err in results if rc != 0]
        assert len(winners) == 1, results
        for rc, err in results:
            if rc != 0:
                assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
                assert "already exists" in err or "another bootimg build" in err, err
        assert len(losers) == 3
        assert tree_bytes(out) == reference
        assert os.listdir(parent) == ["rel"]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Exit status and stderr of each build (without the build's notes, which are not errors)."""
    results = [(p.wait(timeout=300), "".join(line for line in p.stderr.read().decode().splitlines(keepends=True)
                                             if not line.startswith("bootimg build: note:"))) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    return results


def test_concurrent_builds_with_force_take_turns(workspace, reference, tmp_path):
    """While another build holds OUT's lock (here: this test, the way a build holds it), builds
    with --force wait for it, each saying so in one line, then replace the release one after
    another; started all at once, the same without a holder."""
    out = tmp_path / "rel"
    lock_path = tmp_path / ".rel.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    procs = [popen_build(workspace, out, "--force") for _ in range(4)]
    try:
        for p in procs:               # each is waiting for the lock, and says whose it is
            ready, _, _ = select.select([p.stderr], [], [], 120)
            assert ready, "no build said it waits"
            line = p.stderr.readline().decode()
            assert line == f"{out}: waiting for another bootimg build (process {os.getpid()}) of it to finish\n", line
        assert not out.exists()
    finally:
        os.unlink(lock_path)
        os.close(fd)
    results = _finish(procs)
    assert [rc for rc, _ in results] == [0] * 4, results
    assert [err for _, err in results] == [""] * 4, results
    results = _finish([popen_build(workspace, out, "--force") for _ in range(4)])
    for rc, err in results:
        assert rc == 0, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
        assert not err or "waiting for another bootimg build" in err
    report = verify_release(out, trusted_keys(workspace))
    assert report.ok and report.authenticated, report.problems
    assert tree_bytes(out) == reference
    assert os.listdir(tmp_path) == ["rel"]


# -- what killed builds leave ----------------------------------------------------------------------

def test_stale_temporaries_are_removed_and_foreign_ones_kept(workspace, reference, tmp_path):
    out = tmp_path / "rel"
    assert build(workspace, out).returncode == 0
    shutil.copytree(out, tmp_path / ".rel.tmp-999999")              # a killed build's copy
    (tmp_path / ".rel.old-888888").mkdir()                          # the two-rename fallback's
    shutil.copytree(out / "images", tmp_path / ".rel.old-888888" / "images")
    foreign = tmp_path / ".rel.tmp-777777"                          # not provably bootimg's
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me\n")
    (tmp_path / ".rel.tmp-666666").symlink_to(out)                  # a symlink: never followed
    (tmp_path / ".other.tmp-555555").mkdir()                        # another output's
    res = build(workspace, out, "--force")
    assert res.returncode == 0, res.stderr.decode()
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-555555", ".rel.tmp-666666", ".rel.tmp-777777", "rel"]
    assert (foreign / "thesis.tex").read_text() == "keep me\n"
    assert tree_bytes(out) == reference


def test_force_commit_without_rename_exchange(workspace, reference, tmp_path):
    """The fallback for filesystems that refuse RENAME_EXCHANGE: the same result by two renames
    (no filesystem here refuses it, so the fallback is called directly)."""
    out = tmp_path / "rel"
    assert build(workspace, out).returncode == 0
    new = tmp_path / ".rel.tmp-1"
    shutil.copytree(out, new)
    (new / "sharing.json").write_text("{}\n")
    output.replace_by_two_renames(new, out)
    assert (out / "sharing.json").read_text() == "{}\n"
    assert os.listdir(tmp_path) == ["rel"]


def _kill_after(proc: subprocess.Popen, delay: float) -> None:
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)


def _kill_at_exchange(proc: subprocess.Popen, out: Path, deadline: float) -> None:
    """SIGKILL the build the moment OUT changes to the new release (the old one is then still
    next to it, not yet removed)."""
    old = out.stat().st_ino
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if os.stat(out).st_ino != old:
                break
        except FileNotFoundError:
            break
    proc.send_signal(signal.SIGKILL)


def test_killed_builds_never_lose_the_release(workspace, reference, tmp_path):
    """20 builds with --force SIGKILLed at random points (fixed seed) over a build's duration,
    4 of them right after the new release took OUT's name: after each, OUT is a complete
    release; the rerun leaves no temporaries and gives the bytes of a clean build."""
    parent = tmp_path / "p"
    parent.mkdir()
    out = parent / "rel"
    keys = trusted_keys(workspace)
    t0 = time.monotonic()
    assert build(workspace, out).returncode == 0
    duration = time.monotonic() - t0
    rng = random.Random(20260101)
    plan = [("time", rng.uniform(0.0, duration * 1.1)) for _ in range(16)] + [("exchange", 0.0)] * 4
    rng.shuffle(plan)
    left_temporaries = window_hits = 0
    for kind, delay in plan:
        proc = popen_build(workspace, out, "--force")
        if kind == "time":
            _kill_after(proc, delay)
        else:
            _kill_at_exchange(proc, out, time.monotonic() + 60)
        proc.wait(timeout=300)
        proc.stdout.close()
        proc.stderr.close()
        report = verify_release(out, keys)
        assert report.ok and report.authenticated, (kind, delay, report.problems)
        leftovers = [n for n in os.listdir(parent) if n != "rel"]
        temporaries = [n for n in leftovers if n.startswith(".rel.tmp-")]
        left_temporaries += bool(temporaries)
        if kind == "exchange" and any((parent / n / layout.RELEASE_JSON).exists() for n in temporaries):
            window_hits += 1           # killed with the old, complete release still next to OUT
        res = build(workspace, out, "--force")
        assert res.returncode == 0, res.stderr.decode()
        assert os.listdir(parent) == ["rel"], (kind, delay)
        assert tree_bytes(out) == reference
    assert left_temporaries >= 3         # the kills did interrupt builds mid-way
    assert window_hits >= 1              # and one of them between the swap and the old one's removal
