"""The boot check of `bootimg build` / `bootimg validate --root`: a root that cannot boot a
verified composefs root is refused before anything is written, with one line per missing piece
naming it and what provides it; a complete root passes. The roots are small synthetic trees made
here (the files a Debian or Fedora root has where the check looks), plus the QEMU board's real
Debian root when this machine has it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from bootimg.boot import initramfs, preflight
from bootimg.composefs.reader import load_image
from bootimg.composefs.store import ObjectStore
from bootimg.manifest.model import Initramfs, Source
from bootimg.release.layout import ReleaseDir
from bootimg.signing import generate_keypair
from bootimg.sources import SourcePolicy, load_source

EPOCH = 1767225600
KVER = "6.12.9-test-amd64"
# Long enough (> 64 bytes) to live in the object store: the check must read it through the store.
BUILTIN = "".join(f"kernel/drivers/misc/filler{i}.ko\n" for i in range(4)) + "kernel/drivers/block/loop.ko\n"
CONFIG = "# Linux kernel configuration\nCONFIG_EROFS_FS=m\nCONFIG_OVERLAY_FS=m\nCONFIG_BLK_DEV_LOOP=y\nCONFIG_FS_VERITY=y\n"


def make_root(top: Path, kver: str = KVER, *, fedora: bool = False, config: str | None = CONFIG,
              builtin: str = BUILTIN, modules: tuple[str, ...] = ("fs/erofs/erofs.ko.xz", "fs/overlayfs/overlay.ko.zst"),
              drop: tuple[str, ...] = ()) -> Path:
    """A merged-/usr root with what the check looks for; ``drop`` removes paths from it."""
    files: dict[str, bytes] = {
        "usr/lib/systemd/systemd": Path("/usr/lib/systemd/systemd").read_bytes(),   # an ELF of this host
        "usr/bin/dracut": b"#!/bin/bash\n# dracut\n" * 5,
        "usr/lib/dracut/modules.d/00systemd/module-setup.sh": b"#!/bin/bash\n",
        "usr/lib/dracut/modules.d/90kernel-modules/module-setup.sh": b"#!/bin/bash\n",
        f"usr/lib/modules/{kver}/modules.builtin": builtin.encode(),
        "etc/os-release": b"ID=test\n",
    }
    for mod in modules:
        files[f"usr/lib/modules/{kver}/kernel/{mod}"] = b"\xfd7zXZ module" * 10
    kernel = f"usr/lib/modules/{kver}/vmlinuz" if fedora else f"boot/vmlinuz-{kver}"
    files[kernel] = b"MZ kernel image" * 20
    if config is not None:
        files[f"usr/lib/modules/{kver}/config" if fedora else f"boot/config-{kver}"] = config.encode()
    for rel, data in files.items():
        if rel in drop:
            continue
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if "bin/" in rel or rel.endswith("systemd") else 0o644)
    for link, target in {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib"}.items():
        os.symlink(target, top / link)
    return top


def write_manifest(top: Path, source: dict, trust: str = "sealed", exclude: tuple[str, ...] = (),
                   boot: dict | None = None) -> Path:
    doc = {"apiVersion": "bootimg/v1",
           "identity": {"name": "pf", "version": "1", "source_date_epoch": EPOCH},
           "rootfs": {"source": source, **({"exclude": list(exclude)} if exclude else {})},
           "integrity": {"trust": trust, "fsverity": "required"}}
    if trust == "signed":
        pub = top / "k.pub"
        if not pub.exists():
            secret, public = generate_keypair("preflight test")
            secret.to_file(top / "k.key")
            public.to_file(pub)
        doc["integrity"]["trusted_keys"] = [str(pub)]
    if boot is not None:
        doc["boot"] = boot
    path = top / "m.yaml"
    path.write_text(json.dumps(doc, indent=2))
    return path


def build(top: Path, root: Path, *extra: str, trust: str = "sealed", source: dict | None = None,
          exclude: tuple[str, ...] = ()):
    manifest = write_manifest(top, source or {"type": "directory", "path": str(root)}, trust, exclude)
    out = top / "out" / "release"
    key = ["--key", str(top / "k.key")] if trust == "signed" else []
    return out, run_cli("build", str(manifest), "-o", str(out), *key, *extra)


def error_lines(res) -> list[str]:
    return res.stderr.decode().strip().splitlines()


def assert_refused_with(top: Path, out: Path, res, *needles: str) -> None:
    """Refused, one line per needle (each naming one missing piece), nothing left behind."""
    lines = error_lines(res)
    assert res.returncode == 1, res.stderr.decode()
    assert b"Traceback" not in res.stderr
    assert len(lines) == len(needles), lines
    for line, needle in zip(lines, needles):
        assert line.startswith("bootimg build: rootfs: "), line
        assert needle in line, (needle, line)
    assert not out.exists()
    assert not (out.parent.exists() and os.listdir(out.parent)), "a temp dir was left behind"


# -- the build ----------------------------------------------------------------------------------------

def test_complete_root_builds(tmp_path):
    root = make_root(tmp_path / "root")
    out, res = build(tmp_path, root, trust="signed")
    assert res.returncode == 0, res.stderr.decode()
    assert (out / "release.json").exists()
    # What the check passed is what the root image carries: the module with the same lists.
    res = run_cli("validate", str(tmp_path / "m.yaml"), "--root")
    assert res.returncode == 0, res.stderr.decode()
    assert f"kernel {KVER} (erofs module, overlay module, loop built in; fs-verity built in)" in res.stdout.decode()


def test_root_without_dracut_is_refused(tmp_path):
    root = make_root(tmp_path / "root", drop=("usr/bin/dracut",))
    out, res = build(tmp_path, root)
    assert_refused_with(tmp_path, out, res, "the root has no dracut (/usr/bin/dracut): install the dracut package")


def test_root_without_systemd_is_refused(tmp_path):
    root = make_root(tmp_path / "root", drop=("usr/lib/systemd/systemd",))
    out, res = build(tmp_path, root)
    assert_refused_with(tmp_path, out, res, "the root has no systemd (/usr/lib/systemd/systemd): install the systemd package")


def test_kernel_without_erofs_is_refused(tmp_path):
    root = make_root(tmp_path / "root", modules=("fs/overlayfs/overlay.ko.zst",))
    out, res = build(tmp_path, root)
    assert_refused_with(tmp_path, out, res, f"the root's kernel {KVER} has no EROFS (not in /usr/lib/modules/{KVER}/modules.builtin, "
                                            f"no /usr/lib/modules/{KVER}/kernel/fs/erofs/erofs.ko*): install a kernel built "
                                            "with CONFIG_EROFS_FS=y or =m")


def test_every_missing_piece_is_reported(tmp_path):
    """All at once, each on its own line: no kernel, no systemd, no dracut."""
    root = make_root(tmp_path / "root", drop=(f"boot/vmlinuz-{KVER}", "usr/lib/systemd/systemd", "usr/bin/dracut"))
    out, res = build(tmp_path, root)
    assert_refused_with(tmp_path, out, res, "the root has no kernel", "no systemd", "no dracut")


def test_the_root_is_checked_as_its_image_holds_it(tmp_path):
    """The kernel and the initramfs are made from the root image (dracut runs inside it): what
    the manifest excludes from the image is missing, what it adds is there."""
    root = make_root(tmp_path / "root", drop=("usr/bin/sed",))
    (tmp_path / "sed").write_bytes(b"\x7fELF sed" * 10)
    manifest = write_manifest(tmp_path, {"type": "directory", "path": str(root)}, exclude=("/boot/**",))
    doc = json.loads(manifest.read_text())
    doc["rootfs"]["add_files"] = [{"path": "/usr/bin/sed", "source_path": str(tmp_path / "sed"), "mode": "0755"}]
    manifest.write_text(json.dumps(doc))
    out = tmp_path / "out" / "release"
    res = run_cli("build", str(manifest), "-o", str(out))
    assert_refused_with(tmp_path, out, res, "the root has no kernel")      # /boot/vmlinuz-KVER excluded
    doc["rootfs"]["exclude"] = ["/boot/System.map-*"]
    manifest.write_text(json.dumps(doc))
    res = run_cli("build", str(manifest), "-o", str(out))
    assert res.returncode == 0, res.stderr.decode()
    assert load_image(out / "images" / "root.cfs").root.lookup(b"/usr/bin/sed").is_reg()


def test_no_boot_check_builds_a_root_that_cannot_boot(tmp_path):
    root = make_root(tmp_path / "root", drop=("usr/bin/dracut", "usr/lib/systemd/systemd"))
    out, res = build(tmp_path, root, "--no-boot-check")
    assert res.returncode == 0, res.stderr.decode()
    assert (out / "release.json").exists()


def test_the_check_reads_a_tar_source_through_the_store(tmp_path):
    """The same trees as a tar: kernel config and modules.builtin are only in the object store."""
    no_verity = CONFIG.replace("CONFIG_FS_VERITY=y", "# CONFIG_FS_VERITY is not set")
    for name, kwargs, ok in [("good", {}, True), ("noverity", {"config": no_verity}, False)]:
        top = tmp_path / name
        root = make_root(top / "root", **kwargs)
        with tarfile.open(top / "root.tar", "w") as tar:
            tar.add(root, arcname=".")
        shutil.rmtree(root)
        out, res = build(top, root, source={"type": "tar", "path": str(top / "root.tar")})
        if ok:
            assert res.returncode == 0, res.stderr.decode()
        else:
            assert_refused_with(top, out, res, f"the root's kernel {KVER} has no fs-verity (/boot/config-{KVER}: "
                                               "CONFIG_FS_VERITY=n; it cannot be a module)")


# -- the pieces, on the tree ---------------------------------------------------------------------------

def check(root_dir: Path, tmp_path: Path, trust: str = "signed", initramfs: Initramfs | None = None) -> preflight.BootCheck:
    rel = ReleaseDir(tmp_path / "scratch")
    store = ObjectStore(rel.objects, fsync=False, on_notice=lambda _m: None)
    tree = load_source(Source("directory", root_dir), store, policy=SourcePolicy(allow_devices=True)).root
    return preflight.check_root(tree, rel, trust, initramfs)


def test_the_lists_are_the_ones_module_setup_uses():
    """One list: the rendered module-setup.sh installs exactly what the check requires, and no
    program of the root's besides the one bootimg puts there."""
    from bootimg.manifest import load_manifest

    m = load_manifest(REPO / "manifests" / "minimal.yaml", on_warning=None)
    for trust in ("signed", "sealed"):
        text = initramfs.render("module-setup.sh", dataclasses.replace(
            m, integrity=dataclasses.replace(m.integrity, trust=trust)))
        assert not re.search(r"^\s*inst_multiple ", text, re.M)
        assert re.findall(r"^\s*inst_binary (\S+)", text, re.M) == [initramfs.SETUP_ROOT]
        assert re.search(rf"^\s*instmods {' '.join(initramfs.KERNEL_MODULES)}$", text, re.M)
        assert re.search(rf"^\s*echo {' '.join(initramfs.DRACUT_DEPENDS)}$", text, re.M)


def test_fedora_layout_passes(tmp_path):
    result = check(make_root(tmp_path / "root", fedora=True), tmp_path)
    assert result.problems == [] and result.kernel == KVER and result.fsverity == "built in"


@pytest.mark.parametrize("kver", ["6.1.0-28-amd64", "5.15.0-generic"])
def test_kernel_older_than_6_6_is_refused(tmp_path, kver):
    result = check(make_root(tmp_path / "root", kver), tmp_path)
    assert len(result.problems) == 1, result.problems
    assert f"kernel {kver} (/boot/vmlinuz-{kver}) cannot mount a composefs root" in result.problems[0]
    assert "6.6" in result.problems[0]


def test_the_newest_kernel_is_checked(tmp_path):
    root = make_root(tmp_path / "root", "6.6.0-test", modules=())     # no erofs/overlay modules
    new = make_root(tmp_path / "new", "6.12.1-test")
    shutil.copytree(new / "usr/lib/modules/6.12.1-test", root / "usr/lib/modules/6.12.1-test")
    shutil.copy(new / "boot/vmlinuz-6.12.1-test", root / "boot")
    shutil.copy(new / "boot/config-6.12.1-test", root / "boot")
    result = check(root, tmp_path)
    assert result.kernel == "6.12.1-test" and result.problems == []


def test_modules_built_in_per_config_or_builtin_list(tmp_path):
    builtin = BUILTIN + "kernel/fs/erofs/erofs.ko\n"
    config = CONFIG.replace("CONFIG_OVERLAY_FS=m", "CONFIG_OVERLAY_FS=y")
    result = check(make_root(tmp_path / "root", builtin=builtin, config=config, modules=()), tmp_path)
    assert result.problems == [] and result.modules == {"erofs": "built in", "overlay": "built in", "loop": "built in"}


def test_no_config_skips_the_fsverity_check(tmp_path):
    result = check(make_root(tmp_path / "root", config=None), tmp_path)
    assert result.problems == [] and result.fsverity.startswith("not checked")


def test_a_kernel_without_its_modules_directory(tmp_path):
    root = make_root(tmp_path / "root")
    shutil.rmtree(root / "usr/lib/modules")
    result = check(root, tmp_path)
    assert result.problems == [f"the root's kernel {KVER} (/boot/vmlinuz-{KVER}) has no modules directory "
                               f"(/usr/lib/modules/{KVER}): install the kernel package's modules"]


def test_kernel_features_need_their_dracut_module(tmp_path):
    root = make_root(tmp_path / "root", drop=("usr/lib/dracut/modules.d/00systemd/module-setup.sh",))
    result = check(root, tmp_path)
    assert len(result.problems) == 1 and "dracut has no 'systemd' module" in result.problems[0]


def test_validate_root_reports_every_problem(tmp_path):
    root = make_root(tmp_path / "root", drop=("usr/bin/dracut", "usr/lib/systemd/systemd"))
    manifest = write_manifest(tmp_path, {"type": "directory", "path": str(root)})
    res = run_cli("validate", str(manifest), "--root")
    assert res.returncode == 1
    lines = error_lines(res)
    assert len(lines) == 2 and all(ln.startswith(f"bootimg validate: rootfs: {root}: the root has no ") for ln in lines)
    assert "systemd" in lines[0] and "dracut" in lines[1]
    assert set(os.listdir(tmp_path)) == {"root", "m.yaml"}


# -- the real board root ----------------------------------------------------------------------------------

def _board_root() -> Source | None:
    for tree in (REPO / "build" / "board" / "rootfs", Path("/work/main/build/board/rootfs")):
        if (tree / "usr").is_dir():
            return Source("directory", tree)
    cache = Path(os.environ.get("BOOTIMG_CACHE") or "/var/cache/bootimg") / "board"
    tars = sorted(cache.glob("rootfs-*.tar.zst"), key=lambda p: p.stat().st_mtime) if cache.is_dir() else []
    return Source("tar", tars[-1]) if tars else None


@pytest.mark.skipif(_board_root() is None, reason="no QEMU board root on this machine (bootimg board builds it)")
def test_the_board_root_passes(tmp_path):
    rel = ReleaseDir(tmp_path / "scratch")
    store = ObjectStore(rel.objects, fsync=False, on_notice=lambda _m: None)
    tree = load_source(_board_root(), store, policy=SourcePolicy(allow_devices=True)).root
    result = preflight.check_root(tree, rel, "signed")
    assert result.problems == []
    assert set(result.modules) == set(initramfs.KERNEL_MODULES) and result.fsverity == "built in"
    assert preflight.kernel_version(result.kernel) >= (6, 6, 0)


# -- the initramfs profile (boot.initramfs) against the root ---------------------------------------------------

def test_a_profile_the_root_has_passes(tmp_path):
    root = make_root(tmp_path / "root", modules=("fs/erofs/erofs.ko.xz", "fs/overlayfs/overlay.ko.zst",
                                                  "drivers/block/virtio_blk.ko.xz"),
                     config=CONFIG + "CONFIG_RD_ZSTD=y\n")
    (root / "usr/bin/zstd").write_bytes(b"\x7fELF zstd")
    profile = Initramfs(drivers=("virtio-blk", "loop", "erofs"), modules=("kernel-modules",), omit=("systemd",),
                        compress="zstd")
    result = check(root, tmp_path, initramfs=profile)
    assert result.ok and result.initramfs == []


def test_every_problem_of_a_profile_is_at_its_place(tmp_path):
    root = make_root(tmp_path / "root", modules=("fs/erofs/erofs.ko.xz", "fs/overlayfs/overlay.ko.zst",
                                                  "drivers/block/virtio_blk.ko.xz"),
                     config=CONFIG + "# CONFIG_RD_XZ is not set\n")
    profile = Initramfs(drivers=("ext4", "virtio_blkk"), modules=("kernel-modules", "systemd-initrd"),
                        omit=("kernel-modulez",), compress="xz")
    result = check(root, tmp_path, initramfs=profile)
    assert result.problems == [] and not result.ok
    assert result.initramfs == [
        (("drivers", 0), f"'ext4' is no module of the root's kernel {KVER} (not in /usr/lib/modules/{KVER}/modules.builtin, "
                         f"no /usr/lib/modules/{KVER}/kernel/.../ext4.ko*)"),
        (("drivers", 1), f"'virtio_blkk' is no module of the root's kernel {KVER} (not in /usr/lib/modules/{KVER}/"
                         f"modules.builtin, no /usr/lib/modules/{KVER}/kernel/.../virtio_blkk.ko*) (did you mean 'virtio_blk'?)"),
        (("modules", 1), "the root's dracut has no 'systemd-initrd' module (no /usr/lib/dracut/modules.d/NNsystemd-initrd)"),
        (("omit", 0), "the root's dracut has no 'kernel-modulez' module (no /usr/lib/dracut/modules.d/NNkernel-modulez) "
                      "(did you mean 'kernel-modules'?)"),
        (("compress",), "the root has no xz (/usr/bin/xz), which dracut compresses a xz initramfs with: install the "
                        "xz-utils package in it"),
        (("compress",), f"the root's kernel {KVER} cannot unpack a xz initramfs (/boot/config-{KVER}: CONFIG_RD_XZ=n)"),
    ]


def test_the_build_names_the_profiles_place_in_the_manifest(tmp_path):
    root = make_root(tmp_path / "root")
    boot = {"initramfs": {"drivers": ["erofs", "virtio_scsii"], "compress": "lz4"}}
    manifest = write_manifest(tmp_path, {"type": "directory", "path": str(root)}, boot=boot)
    out = tmp_path / "out" / "release"
    res = run_cli("build", str(manifest), "-o", str(out))
    assert res.returncode == 1 and b"Traceback" not in res.stderr
    lines = error_lines(res)
    text = manifest.read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if '"virtio_scsii"' in t)
    col = text[line - 1].index('"virtio_scsii"') + 1
    assert lines[0] == (f"bootimg build: {manifest}:{line}:{col}: boot.initramfs.drivers[1]: "
                        f"'virtio_scsii' is no module of the root's kernel {KVER} (not in /usr/lib/modules/{KVER}/"
                        f"modules.builtin, no /usr/lib/modules/{KVER}/kernel/.../virtio_scsii.ko*)")
    assert lines[1].startswith(f"bootimg build: {manifest}:") and "boot.initramfs.compress: the root has no lz4" in lines[1]
    assert lines[2].endswith(f"boot.initramfs.compress: the root's kernel {KVER} cannot unpack a lz4 initramfs "
                             f"(/boot/config-{KVER}: CONFIG_RD_LZ4=n)")
    assert len(lines) == 3 and not out.exists()
    # validate --root checks the profile too, with the same lines
    res = run_cli("validate", str(manifest), "--root")
    assert res.returncode == 1 and [ln.split(": ", 1)[1] for ln in error_lines(res)] == \
        [ln.split(": ", 1)[1] for ln in lines]
