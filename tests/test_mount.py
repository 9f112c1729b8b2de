"""`bootimg mount` / `bootimg umount` with real kernel mounts: the example release's root and a
container image, read through the object store; the refusals (no fs-verity on this host without
--no-verity, a modified image, not root) leave nothing mounted; unmount undoes both mounts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import example_workspace, is_root, requires_root, run_cli

from bootimg.release.mount import RUN_DIR, mounts, objects_verity

pytestmark = [pytest.mark.kernel]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return example_workspace(tmp_path_factory.mktemp("mnt-ws"))


@pytest.fixture(scope="module")
def built(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("mnt-rel") / "release"
    # The example root has no kernel, systemd or dracut: looked into here, never booted.
    res = run_cli("build", str(workspace / "manifests" / "ivi-demo.yaml"), "-o", str(out), "--no-boot-check",
                  "--key", str(workspace / "build" / "keys" / "release-2026.key"))
    assert res.returncode == 0, res.stderr.decode()
    return out, res


def ours() -> list[tuple[str, str, str, str]]:
    """Every mount a bootimg mount makes: its EROFS mounts and overlays over them."""
    return [m for m in mounts() if m[0].startswith(str(RUN_DIR)) or f"lowerdir={RUN_DIR}" in m[3]]


def loops_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout


@pytest.fixture
def clean():
    """No bootimg mount before or after the test (one left behind is a failure, then cleaned)."""
    assert ours() == []
    yield
    left = ours()
    for m in reversed(left):
        subprocess.run(["umount", m[0]], capture_output=True)
    assert left == [], left


def one_line(res) -> str:
    lines = res.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and b"Traceback" not in res.stderr, res.stderr.decode()
    return lines[0]


@requires_root
def test_mount_the_root_and_read_through_the_store(workspace, built, tmp_path, clean):
    out, _ = built
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli("mount", str(out), str(mnt), "--no-verity")
    assert res.returncode == 0, res.stderr.decode()
    release = json.loads((out / "release.json").read_text())
    assert release["images"]["root"]["digest"] in res.stdout.decode()
    (erofs,) = [m for m in ours() if m[1] == "erofs"]
    (overlay,) = [m for m in ours() if m[1] == "overlay"]
    assert overlay[0] == str(mnt) and overlay[3].startswith("ro,")
    assert f"lowerdir={erofs[0]}::{out}/objects" in overlay[3] and "metacopy=on" in overlay[3]
    assert "verity" not in overlay[3]
    # An external file (its data is an object) and an inline one, as the source has them.
    banner = workspace / "build" / "ivi-rootfs" / "usr" / "lib" / "bootimg-demo" / "banner.txt"
    assert (mnt / "usr/lib/bootimg-demo/banner.txt").read_bytes() == banner.read_bytes()
    assert (mnt / "etc/hostname").read_text() == "ivi-demo\n"
    with pytest.raises(OSError):
        (mnt / "etc" / "new").write_text("x")                     # read-only
    res = run_cli("mount", str(out), str(mnt), "--no-verity")
    assert res.returncode == 1 and "already mounted" in one_line(res)
    res = run_cli("mount", "--unmount", str(mnt))
    assert res.returncode == 0, res.stderr.decode()
    assert ours() == [] and not os.listdir(mnt)
    assert loops_of(out / "images" / "root.cfs") == ""            # the loop device went with it
    assert not RUN_DIR.exists() or os.listdir(RUN_DIR) == []


@requires_root
def test_mount_a_container_image(workspace, built, tmp_path, clean):
    out, _ = built
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli("mount", str(out), str(mnt), "--image", "telemetry", "--no-verity")
    assert res.returncode == 0, res.stderr.decode()
    src = workspace / "build" / "images" / "telemetry"
    for rel in ("usr/bin/telemetryd", "etc/telemetry.toml", "usr/bin/sh"):
        assert (mnt / rel).read_bytes() == (src / rel).read_bytes(), rel
    res = run_cli("umount", str(mnt))
    assert res.returncode == 0, res.stderr.decode()
    assert ours() == []


@requires_root
def test_verity_require_is_refused_where_the_objects_have_no_fsverity(built, tmp_path, clean):
    out, build_res = built
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    has_verity = objects_verity(out / "objects")
    res = run_cli("mount", str(out), str(mnt))
    if has_verity:                                                # a host whose filesystem has fs-verity
        assert res.returncode == 0, res.stderr.decode()
        assert any("verity=require" in m[3] for m in ours())
        assert run_cli("umount", str(mnt)).returncode == 0
        assert b"note:" not in build_res.stderr
        return
    line = one_line(res)
    assert res.returncode == 1
    assert "no fs-verity" in line and "EIO" in line and "--no-verity" in line
    assert ours() == [] and not os.listdir(mnt)
    # ... and the build said so, once, pointing at the same way in.
    notes = [ln for ln in build_res.stderr.decode().splitlines() if "note:" in ln]
    assert len(notes) == 1 and "bootimg mount --no-verity" in notes[0], build_res.stderr.decode()


@requires_root
@pytest.mark.parametrize("change", ["flip", "replace"])
def test_a_modified_image_is_refused(built, tmp_path, clean, change):
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    image = copy / "images" / "root.cfs"
    if change == "flip":
        data = bytearray(image.read_bytes())
        data[1030] ^= 0x01                                        # in the EROFS superblock's area
        image.write_bytes(bytes(data))
    else:
        shutil.copy(copy / "images" / "telemetry.cfs", image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli("mount", str(copy), str(mnt), "--no-verity")
    line = one_line(res)
    assert res.returncode == 1 and str(image) in line and "modified or replaced" in line
    assert ours() == [] and loops_of(image) == ""


@requires_root
def test_bad_arguments_are_one_line(built, tmp_path, clean):
    out, _ = built
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli("mount", str(out), str(mnt), "--image", "nope", "--no-verity")
    assert res.returncode == 1 and "no image 'nope'" in one_line(res) and "telemetry" in one_line(res)
    res = run_cli("mount", str(tmp_path), str(mnt), "--no-verity")
    assert res.returncode == 1 and "release.json" in one_line(res)
    res = run_cli("mount", str(out), str(tmp_path / "missing"), "--no-verity")
    assert res.returncode == 1 and "missing" in one_line(res)
    res = run_cli("umount", str(mnt))
    assert res.returncode == 1 and "not mounted by bootimg mount" in one_line(res)
    res = run_cli("mount", str(out))
    assert res.returncode == 1 and "RELEASE and DIR" in one_line(res)
    assert ours() == []


@pytest.mark.skipif(not is_root() or shutil.which("setpriv") is None, reason="needs root to drop it (setpriv)")
def test_not_root_says_so(built, tmp_path):
    out, _ = built
    import sys

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                          "bootimg", "mount", str(out), str(tmp_path), "--no-verity"],
                         capture_output=True, env=env, timeout=120, cwd="/")
    assert res.returncode == 1
    line = one_line(res)
    assert line.startswith("bootimg mount: needs root")
