"""The initramfs profile (manifest ``boot.initramfs``) as dracut gets it: the options, the cache
key, what release.json records, and `bootimg initramfs` checking it against the root before
dracut runs. (That a lean initramfs boots the board is tests/test_board_system.py.)"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_preflight import KVER, make_root, write_manifest

from bootimg.boot import initramfs
from bootimg.disk.initramfs import dracut_argv, initramfs_key, release_profile
from bootimg.errors import BootimgError
from bootimg.manifest.model import Initramfs

OWN_DRIVERS = "erofs overlay loop tpm_tis tpm_crb"


def test_no_profile_is_dracuts_generic_initramfs_plus_the_boards_drivers():
    assert initramfs.dracut_options(None) == ["--add-drivers", "virtio_blk virtio_pci virtio_scsi ext4"]


def test_a_profile_is_dracuts_exclusive_lists_plus_bootimgs_own():
    profile = Initramfs(drivers=("virtio_blk", "ext4", "loop"), modules=("systemd-initrd", "systemd", "udev-rules"),
                        omit=("plymouth",), compress="xz", compress_level=8)
    assert initramfs.dracut_options(profile) == [
        "--drivers", "virtio_blk ext4 loop erofs overlay tpm_tis tpm_crb",
        "--modules", "systemd-initrd systemd udev-rules bootimg",
        "--omit", "plymouth",
        "--compress", "xz --check=crc32 -8 -T0"]


@pytest.mark.parametrize("profile, expected", [
    (Initramfs(), ["--add-drivers", "virtio_blk virtio_pci virtio_scsi ext4"]),
    (Initramfs(compress="zstd"), ["--add-drivers", "virtio_blk virtio_pci virtio_scsi ext4", "--compress", "zstd"]),
    (Initramfs(compress="zstd", compress_level=19), ["--add-drivers", "virtio_blk virtio_pci virtio_scsi ext4",
                                                     "--compress", "zstd -19 -q -T0"]),
    (Initramfs(compress="gzip", compress_level=1), ["--add-drivers", "virtio_blk virtio_pci virtio_scsi ext4",
                                                    "--compress", "gzip -n -1"]),
    (Initramfs(compress="lz4", compress_level=12), ["--add-drivers", "virtio_blk virtio_pci virtio_scsi ext4",
                                                    "--compress", "lz4 -l -12"]),
    (Initramfs(drivers=("nvme",)), ["--drivers", f"nvme {OWN_DRIVERS}"]),
    (Initramfs(modules=("base",), omit=("i18n", "plymouth")), ["--add-drivers", "virtio_blk virtio_pci virtio_scsi ext4",
                                                                "--modules", "base bootimg systemd",
                                                                "--omit", "i18n plymouth"]),
])
def test_each_key_of_the_profile(profile, expected):
    assert initramfs.dracut_options(profile) == expected


def test_the_dracut_command_line_is_reproducible_and_not_host_only():
    argv = dracut_argv(KVER, "/tmp/initrd.img", Initramfs(drivers=("virtio_blk",), compress="zstd"))
    assert argv == ["dracut", "--no-hostonly", "--no-hostonly-cmdline", "--reproducible", "--force", "--kver", KVER,
                    "--drivers", f"virtio_blk {OWN_DRIVERS}", "--compress", "zstd", "/tmp/initrd.img"]


def test_the_cache_key_includes_the_profile():
    release = {"root": {"digest": "ab" * 32}}
    lean = Initramfs(drivers=("virtio_blk",))
    keys = {initramfs_key(release, p, extra=()) for p in (None, lean, Initramfs(drivers=("virtio_blk",), compress="xz"),
                                                          Initramfs(drivers=("virtio_blk",), compress="xz", compress_level=9))}
    assert len(keys) == 4
    assert initramfs_key(release, lean, extra=()) == initramfs_key(release, Initramfs(drivers=("virtio_blk",)), extra=())


def test_release_json_records_the_profile(tmp_path):
    root = make_root(tmp_path / "root", modules=("fs/erofs/erofs.ko.xz", "fs/overlayfs/overlay.ko.zst",
                                                  "drivers/block/virtio_blk.ko.xz"))
    boot = {"initramfs": {"drivers": ["virtio_blk"], "modules": ["kernel-modules"]}}
    manifest = write_manifest(tmp_path, {"type": "directory", "path": str(root)}, boot=boot)
    out = tmp_path / "release"
    res = run_cli("build", str(manifest), "-o", str(out))
    assert res.returncode == 0, res.stderr.decode()
    release = json.loads((out / "release.json").read_text())
    assert release["boot"]["initramfs"] == boot["initramfs"]
    assert release_profile(release, "release.json") == Initramfs(drivers=("virtio_blk",), modules=("kernel-modules",))


@pytest.mark.parametrize("bad", [{"drivers": "virtio_blk"}, {"compress": "bzip2"}, {"compress_level": "9"}, ["xz"],
                                 {"drivers": [1]}, {"hostonly": True}])
def test_a_malformed_profile_in_release_json_is_one_line(bad):
    with pytest.raises(BootimgError) as err:
        release_profile({"boot": {"initramfs": bad}}, "/r/release.json")
    assert str(err.value) == "/r/release.json: malformed 'boot.initramfs' (not an initramfs profile)"


def test_bootimg_initramfs_checks_the_profile_before_dracut_runs(tmp_path):
    root = make_root(tmp_path / "root")
    boot = {"initramfs": {"drivers": ["virtio_blk"], "omit": ["plymouth"], "compress": "zstd"}}
    manifest = write_manifest(tmp_path, {"type": "directory", "path": str(root)}, boot=boot)
    out = tmp_path / "release"
    res = run_cli("build", str(manifest), "-o", str(out), "--no-boot-check")
    assert res.returncode == 0, res.stderr.decode()
    cache = tmp_path / "cache"
    res = run_cli("initramfs", str(out), "-o", str(tmp_path / "boot"), env={"BOOTIMG_CACHE": str(cache)})
    assert res.returncode == 1 and b"Traceback" not in res.stderr
    rj = out / "release.json"
    assert res.stderr.decode().splitlines() == [
        f"bootimg initramfs: {rj}: boot.initramfs.drivers[0]: 'virtio_blk' is no module of the root's kernel {KVER} "
        f"(not in /usr/lib/modules/{KVER}/modules.builtin, no /usr/lib/modules/{KVER}/kernel/.../virtio_blk.ko*)",
        f"bootimg initramfs: {rj}: boot.initramfs.omit[0]: the root's dracut has no 'plymouth' module "
        "(no /usr/lib/dracut/modules.d/NNplymouth)",
        f"bootimg initramfs: {rj}: boot.initramfs.compress: the root has no zstd (/usr/bin/zstd), which dracut "
        "compresses a zstd initramfs with: install the zstd package in it",
        f"bootimg initramfs: {rj}: boot.initramfs.compress: the root's kernel {KVER} cannot unpack a zstd initramfs "
        f"(/boot/config-{KVER}: CONFIG_RD_ZSTD=n)"]
    assert not (tmp_path / "boot").exists()
    assert not any(p.name.startswith(".build-") for p in cache.rglob("*"))


def test_every_compressor_the_schema_offers_has_its_levels_and_its_tools():
    from bootimg.boot.initramfs import COMPRESSORS
    from bootimg.manifest import limits
    from bootimg.manifest.schema import schema

    offered = schema()["definitions"]["initramfs"]["properties"]["compress"]["enum"]
    assert set(offered) == set(COMPRESSORS) == set(limits.COMPRESS_LEVELS)
