"""The example system on an arm64 board: manifests/board-arm64.yaml (the four example containers,
built for arm64, on a debootstrapped Debian bookworm arm64 root with the 6.12 arm64 kernel)
through the same commands as the amd64 board: ``bootimg build``, ``bootimg initramfs`` (dracut
in the release's arm64 root, through qemu-user on an x86_64 host), ``bootimg disk`` (BOOTAA64.EFI,
the arm64 root partition type), a provisioning boot; then UEFI boots under qemu-system-aarch64
(virt machine, AAVMF -> systemd-boot -> kernel), all TCG.

The arm64 root tarball, the initramfs and the provisioned disk are cached by their inputs like
the amd64 ones; the release signing keys stay in the board cache too, so that a second run
builds the same release (byte for byte) and finds its initramfs and provisioned disk there. A
cold run debootstraps arm64 through qemu-user (~14 min on two loaded cores), runs dracut in the
arm64 root (~2 min) and provisions under TCG (~4 min). Boot timeouts are generous: an arm64 guest
on an x86_64 host is several times slower than the amd64 board.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import REPO, is_root

pytestmark = [pytest.mark.vm, pytest.mark.skipif(not is_root(), reason="the board needs root")]

BOOT_TIMEOUT = 1800.0
CONTAINERS = ["vehicle-bus", "rear-camera", "cluster", "telemetry"]
LOADER_INFO = "/sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EM_AARCH64 = "b7 00"          # e_machine of an arm64 ELF file, little-endian


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    from bootimg import arch
    from bootimg.board import prepare
    from bootimg.board.rootfs import RootfsSpec
    from bootimg.board.system import ensure_tree, prepare_system
    from bootimg.host import cache_dir
    from bootimg.vm.qemu import check_qemu

    check_qemu(arch.AARCH64.qemu)
    spec = RootfsSpec.for_arch("arm64")
    top = tmp_path_factory.mktemp("board-arm64")
    shutil.copytree(REPO / "manifests", top / "manifests")
    build = top / "build"
    # The containers' runtime (sh, libc, ld.so) comes from the arm64 root itself.
    tree = ensure_tree(prepare(spec, initramfs=False), build)
    sys.path.insert(0, str(REPO / "tools"))
    import example_inputs

    keys = cache_dir() / "keys-board-arm64"            # development keys, kept for the caches' sake
    example_inputs.make_keys(keys)
    shutil.copytree(keys, build / "keys", ignore=shutil.ignore_patterns(".*"))
    example_inputs.main(build, "arm64", tree)
    system = prepare_system(top / "manifests" / "board-arm64.yaml", build_dir=build,
                            key=build / "keys" / "release-2026.key", spec=spec, provision_timeout=2 * BOOT_TIMEOUT)
    print(f"arm64 system: {json.dumps({k: round(v) for k, v in system.timings.items()})} s")
    return system


def running(system, disk=None, **kw):
    from bootimg.board import BOARD_MARKER
    from bootimg.vm.session import running as vm_running

    return vm_running(system.machine(disk), marker=BOARD_MARKER, timeout=BOOT_TIMEOUT, **kw)


def test_arm64_system_boots_verified_by_uefi_with_its_arm64_containers(system, tmp_path):
    from bootimg import arch

    assert system.arch is arch.AARCH64 and system.disk_result.boot["systemd_boot"].endswith("systemd-bootaa64.efi")
    if system.provisioning is not None:            # None: the provisioned disk came from the cache
        assert system.provisioning.ok and "fs-verity enabled on" in system.provisioning.console
    with running(system, serial_log=tmp_path / "console.log") as vm:
        assert vm.result.ok, vm.result.summary()
        print(f"arm64 boot: marker after {vm.result.duration:.0f} s; {vm.result.marker}")
        assert vm.run("uname", "-m").stdout.strip() == "aarch64"
        # UEFI firmware -> systemd-boot -> kernel: the loader left its name in an EFI variable
        info = vm.run(f"cat {LOADER_INFO} | tr -d '\\000'").stdout     # 4 bytes of attributes, UTF-16
        assert "systemd-boot " in info, info
        booted = json.loads(vm.run("cat", "/run/bootimg/booted.json").stdout)
        assert booted["digest"] == system.digest
        assert booted["verity"] == "require" and booted["fsverity"] == "required" and booted["trust"] == "signed"
        assert booted["provisioned_now"] is False
        root = vm.run("findmnt", "-no", "FSTYPE,OPTIONS", "/").stdout.split()
        assert root[0] == "overlay" and "verity=require" in root[1].split(","), root
        meas = vm.run("fsverity", "measure", "/sysroot/bootimg/releases/1.4.0/images/root.cfs").stdout
        assert meas.split()[0] == f"sha256:{system.digest}"
        # the boot-time containers: active, each from its verified image, running arm64 programs
        units = vm.unit_properties([f"{c}.service" for c in CONTAINERS], "ActiveState,MainPID,ActiveEnterTimestampMonotonic")
        state = {u.removesuffix(".service"): p for u, p in units.items()}
        for name in CONTAINERS:
            assert state[name]["ActiveState"] == "active", (name, state[name])
            mnt = vm.run("findmnt", "-no", "FSTYPE,OPTIONS", f"/run/bootimg/containers/{name}").stdout.split()
            assert mnt[0] == "overlay" and "verity=require" in mnt[1].split(","), (name, mnt)
            pid = state[name]["MainPID"]
            exe = vm.run("readlink", f"/proc/{pid}/exe").stdout.strip()
            assert exe.endswith("/usr/bin/demo-wait"), (name, exe)
            machine = vm.run("od", "-An", "-tx1", "-j18", "-N2", f"/proc/{pid}/exe").stdout.strip()
            assert machine == EM_AARCH64, (name, machine)
        t = {n: int(state[n]["ActiveEnterTimestampMonotonic"]) for n in CONTAINERS}
        assert 0 < t["vehicle-bus"] < t["rear-camera"]
        status = vm.run("systemctl", "show", "-p", "StatusText", "vehicle-bus.service").stdout
        assert "StatusText=vehicle-bus running" in status          # sd_notify from inside the container
        pid = state["vehicle-bus"]["MainPID"]
        assert "ID=bootimg-demo" in vm.run("cat", f"/proc/{pid}/root/etc/os-release").stdout
        assert vm.run("stat", "-c", "%u", f"/proc/{pid}").stdout.strip() == "1100"


def test_arm64_tampered_root_object_reads_as_eio(system, tmp_path):
    """An object of the root replaced on the data partition and given fs-verity of its own:
    the overlay compares its digest with the one in the signed image and refuses it."""
    from bootimg.board import diskedit
    from bootimg.board.system import copy_disk

    victim = "/usr/share/common-licenses/GPL-3"
    disk = copy_disk(system, tmp_path / "disk.img")
    # the next boot gives the new file fs-verity
    obj = diskedit.tamper_object(disk, system.release_dir / "images/root.cfs", victim,
                                 lambda data: data.replace(b"GNU", b"GNO", 1))
    path = f"/bootimg/objects/{obj}"
    with running(system, disk, serial_log=tmp_path / "console.log") as vm:
        assert vm.result.ok, vm.result.summary()
        print(f"arm64 tamper boot: marker after {vm.result.duration:.0f} s")
        assert "fs-verity enabled on 1 files" in vm.result.console
        phys = vm.run("fsverity", "measure", f"/sysroot{path}").stdout.split()[0]
        assert phys != "sha256:" + obj.replace("/", "")
        read = vm.run("cat", victim, check=False)
        assert read.returncode != 0 and "Input/output error" in read.stderr, read
        dmesg = vm.run("dmesg").stdout
        assert f"overlayfs: lower file '{obj.split('/')[1]}' has the wrong fs-verity digest" in dmesg, dmesg[-2000:]
        assert vm.run("cat", "/usr/share/common-licenses/GPL-2").returncode == 0
