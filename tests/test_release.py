"""`bootimg build` / `bootimg verify`: the example manifests build into signed, reproducible
releases; verify passes and then names every flipped byte; failures leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import example_workspace, run_cli

from bootimg.composefs import fsverity
from bootimg.composefs.reader import load_image


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return example_workspace(tmp_path_factory.mktemp("rel"))


def build(ws: Path, out: Path, manifest: str = "ivi-demo.yaml", key: str | None = "release-2026",
          *extra: str) -> subprocess.CompletedProcess:
    # The example root (tools/example_inputs.py) has no kernel, systemd or dracut: it is never booted.
    args = ["build", str(ws / "manifests" / manifest), "-o", str(out), "--no-boot-check", *extra]
    if key:
        args += ["--key", str(ws / "build" / "keys" / f"{key}.key")]
    return run_cli(*args)


@pytest.fixture(scope="module")
def release(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "release"
    res = build(workspace, out)
    assert res.returncode == 0, res.stderr.decode()
    return out


def tree_bytes(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def test_release_contents(release):
    rel = json.loads((release / "release.json").read_bytes())
    assert set(rel["images"]) == {"root", "vehicle-bus", "rear-camera", "cluster", "telemetry"}
    for entry in rel["images"].values():
        data = (release / entry["path"]).read_bytes()
        assert fsverity.digest(data).hex() == entry["digest"]
        assert entry["size"] == len(data)
    assert rel["root"]["kernel_argument"] == f"composefs.digest=v1-sha256-12:{rel['images']['root']['digest']}"
    assert rel["kernel_arguments"][0] == rel["root"]["kernel_argument"]
    # The root carries the containers' digests and the trusted keys.
    root = load_image(release / "images" / "root.cfs").root
    carried = root.lookup(b"/usr/lib/bootimg/containers.json")
    assert carried is not None
    keys = root.lookup(b"/usr/lib/bootimg/keys")
    assert keys is not None and len(keys.children) == 2
    # The manifest's excludes and extra files are applied.
    assert root.lookup(b"/var/cache/demo/stale.bin") is None
    assert root.lookup(b"/etc/hostname").content == b"ivi-demo\n"
    # Whiteouts of the cluster image's upper layer took effect.
    cluster = load_image(release / "images" / "cluster.cfs").root
    assert cluster.lookup(b"/usr/share/cluster/legacy.txt") is None
    assert cluster.lookup(b"/usr/share/cluster/theme/old.css") is None
    assert cluster.lookup(b"/usr/share/cluster/theme/new.css") is not None


def test_sharing_report(release):
    report = json.loads((release / "sharing.json").read_bytes())
    # libc, ld.so and sh are in the root and in every container: stored once.
    assert report["shared_objects"] >= 3
    assert report["sharing_ratio"] > 2.0
    assert report["bytes_saved"] == report["referenced_bytes"] - report["object_bytes"]
    on_disk = sum(p.stat().st_size for p in (release / "objects").rglob("*") if p.is_file())
    assert on_disk == report["object_bytes"]


def test_two_builds_are_byte_identical(workspace, release, tmp_path):
    res = build(workspace, tmp_path / "again")
    assert res.returncode == 0, res.stderr.decode()
    assert tree_bytes(tmp_path / "again") == tree_bytes(release)


def test_verify_passes(workspace, release):
    res = run_cli("verify", str(release), "--key", str(workspace / "build" / "keys" / "release-2026.pub"))
    assert res.returncode == 0, res.stderr.decode()
    assert b"OK" in res.stdout
    res = run_cli("verify", str(release))       # consistent, but nothing says who signed it
    assert res.returncode == 3 and res.stderr == b"", res.stderr.decode()
    res = run_cli("verify", str(release), "--key", str(release.parent.parent / "x.pub"))
    assert res.returncode == 1 and b"Traceback" not in res.stderr


def _flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["object", "image", "release", "signature", "container-image"])
def test_verify_names_a_flipped_byte(workspace, release, tmp_path, target):
    copy = tmp_path / "rel"
    shutil.copytree(release, copy)
    rel = json.loads((copy / "release.json").read_bytes())
    if target == "object":
        victim = sorted(p for p in (copy / "objects").rglob("*") if p.is_file())[0]
    elif target == "image":
        victim = copy / rel["images"]["root"]["path"]
    elif target == "container-image":
        victim = copy / rel["images"]["cluster"]["path"]
    elif target == "release":
        victim = copy / "release.json"
    else:
        victim = copy / "release.json.minisig"
    _flip(victim, offset=len(victim.read_bytes()) // 2)
    for keys in ([], ["--key", str(workspace / "build" / "keys" / "release-2026.pub")]):
        res = run_cli("verify", str(copy), *keys)
        err = res.stderr.decode()
        assert res.returncode == 1
        assert "Traceback" not in err
        assert str(victim.relative_to(copy)) in err, err
        if target in ("release", "signature"):      # said first, and not blamed on an image
            assert err.startswith(f"{copy}/release.json: the signature does not verify"), err
            assert "image modified or replaced" not in err


def test_verify_with_explicit_keys_and_rotation(workspace, tmp_path):
    keys = workspace / "build" / "keys"
    out = tmp_path / "rotated"
    res = build(workspace, out, "ivi-demo.yaml", "release-2027")    # the next key, already trusted
    assert res.returncode == 0, res.stderr.decode()
    ok = run_cli("verify", str(out), "--key", str(keys / "release-2026.pub"), "--key", str(keys / "release-2027.pub"))
    assert ok.returncode == 0, ok.stderr.decode()
    old_only = run_cli("verify", str(out), "--key", str(keys / "release-2026.pub"))
    assert old_only.returncode == 1 and b"not trusted" in old_only.stderr


def test_untrusted_signing_key_is_refused(workspace, tmp_path):
    run_cli("keygen", "--out", str(tmp_path), "--name", "rogue")
    out = tmp_path / "out"
    res = run_cli("build", str(workspace / "manifests" / "ivi-demo.yaml"), "-o", str(out),
                  "--key", str(tmp_path / "rogue.key"))
    assert res.returncode == 1 and b"not among the manifest's trusted keys" in res.stderr
    assert not out.exists()


def test_sealed_minimal_manifest_builds_unsigned(workspace, tmp_path):
    out = tmp_path / "minimal"
    res = build(workspace, out, "minimal.yaml", None)
    assert res.returncode == 0, res.stderr.decode()
    assert not (out / "release.json.minisig").exists()
    assert run_cli("verify", str(out)).returncode == 3      # consistent; sealed: the UKI vouches for it


def test_failed_build_leaves_nothing(workspace, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, symlinks=True)
    # A hostile container archive: the build must fail cleanly, with no OUT and no temp dir.
    import io
    import tarfile

    import zstandard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../escape")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    (ws / "build" / "images" / "rear-camera.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    out = tmp_path / "out"
    res = build(ws, out)
    assert res.returncode == 1
    assert b"Traceback" not in res.stderr and b"escape" in res.stderr
    assert len(res.stderr.decode().strip().splitlines()) == 1
    assert not out.exists()
    assert os.listdir(tmp_path) == ["ws"]
    assert not (tmp_path.parent / "escape").exists()


def test_existing_output_needs_force(workspace, release, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    res = build(workspace, out)
    assert res.returncode == 1 and b"--force" in res.stderr
    res = build(workspace, out, "ivi-demo.yaml", "release-2026", "--force")
    assert res.returncode == 0, res.stderr.decode()
    assert tree_bytes(out) == tree_bytes(release)


def test_fsverity_pkcs7_signatures(workspace, tmp_path):
    from bootimg.signing import make_signing_cert

    key_pem, cert_pem = make_signing_cert("bootimg test images", "rsa-2048", epoch=1767225600)
    (tmp_path / "v.key").write_bytes(key_pem)
    (tmp_path / "v.crt").write_bytes(cert_pem)
    out = tmp_path / "out"
    res = build(workspace, out, "ivi-demo.yaml", "release-2026",
                "--verity-key", str(tmp_path / "v.key"), "--verity-cert", str(tmp_path / "v.crt"))
    assert res.returncode == 0, res.stderr.decode()
    assert (out / "images" / "root.cfs.p7s").exists()
    key = str(workspace / "build" / "keys" / "release-2026.pub")
    assert run_cli("verify", str(out), "--key", key).returncode == 0
    _flip(out / "images" / "cluster.cfs.p7s", 40)
    res = run_cli("verify", str(out), "--key", key)
    assert res.returncode == 1 and b"cluster.cfs.p7s" in res.stderr


def test_every_path_the_build_injects_is_reserved(workspace, release):
    """What the build writes into the root of its own accord is covered by the manifest layer's list
    (bootimg.manifest.reserved), which validate holds add_files against: the two cannot drift apart."""
    from bootimg.manifest import limits, load_manifest, reserved

    m = load_manifest(workspace / "manifests" / "ivi-demo.yaml", on_warning=None)
    source = m.rootfs.source.path
    added = {a.path for a in m.rootfs.add_files}
    root = load_image(release / "images" / "root.cfs").root
    injected = []
    for node in root.walk():
        path = node.path().decode("utf-8", "surrogateescape")
        host = source / path.lstrip("/")
        if path == "/" or path in added:
            continue
        if node.is_dir():
            if not os.path.lexists(host) and not node.children:
                injected.append(path)  # an empty directory of bootimg's (/sysroot)
        elif not os.path.lexists(host):
            injected.append(path)
        elif node.is_reg() and host.is_file() and not host.is_symlink():
            data = node.content if node.content is not None else \
                (release / "objects" / node.payload.decode()).read_bytes() if node.size else b""
            if bytes(data) != host.read_bytes():
                injected.append(path)
    owned = reserved.root_paths(c.name for c in m.containers)
    assert {"/usr/lib/bootimg/containers.json", "/sysroot", "/usr/lib/systemd/system/cluster.service",
            "/usr/libexec/bootimg/bootimg-setup-root"} <= set(injected)
    # /tmp is made only where the source has none (this one has none): it replaces nothing
    assert [p for p in injected if not any(e.covers(p) for e in owned)] == [reserved.TMP_DIR]
    # The kernel argument is as long as the command-line budget assumes.
    rel = json.loads((release / "release.json").read_bytes())
    assert len(rel["root"]["kernel_argument"]) == limits.BUILD_KERNEL_ARGS["composefs.digest"][1]
