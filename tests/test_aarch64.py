"""arm64 systems without a VM: the architecture table, running arm64 programs on this host
(qemu-user through binfmt_misc), the arm64 board root's spec, the QEMU command line of an arm64
machine, the disk of an arm64 release and the example containers built for arm64.

Booting an arm64 system under qemu-system-aarch64 is tests/test_board_arm64.py (VM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO, have, is_root, run_cli

from bootimg import arch, host
from bootimg.board.rootfs import RootfsSpec, customize_script
from bootimg.errors import BootimgError
from bootimg.vm.qemu import Machine, qemu_argv

HELLO_C = "int main(void) { return 42; }\n"
needs_cross = pytest.mark.skipif(not have(arch.AARCH64.cc), reason=f"needs {arch.AARCH64.cc_package}")


@pytest.fixture(scope="module")
def arm64_program(tmp_path_factory) -> Path:
    """A static arm64 program that exits with status 42 (cross-compiled here)."""
    if not have(arch.AARCH64.cc):
        pytest.skip(f"needs {arch.AARCH64.cc_package}")
    d = tmp_path_factory.mktemp("arm64-prog")
    (d / "hello.c").write_text(HELLO_C)
    subprocess.run([arch.AARCH64.cc, "-static", "-O2", "-o", str(d / "hello"), str(d / "hello.c")], check=True)
    return d / "hello"


# -- the architecture table ------------------------------------------------------------------------

def test_architectures_by_name_and_by_elf_header(arm64_program):
    assert arch.by_name("arm64") is arch.by_name("aarch64") is arch.AARCH64
    assert arch.by_name("amd64") is arch.by_name("x86_64") is arch.X86_64
    with pytest.raises(BootimgError, match="unsupported architecture 'riscv64'"):
        arch.by_name("riscv64")
    assert arch.of_elf(arm64_program.read_bytes()[:64]) is arch.AARCH64
    assert arch.of_elf(Path(sys.executable).resolve().read_bytes()[:64]) is arch.by_name(os.uname().machine)
    assert arch.X86_64.native == (os.uname().machine == "x86_64")
    assert arch.AARCH64.native == (os.uname().machine == "aarch64")
    a = arch.AARCH64
    assert (a.efi_boot_name, a.systemd_boot, a.console, a.kernel_package) == \
        ("BOOTAA64.EFI", "systemd-bootaa64.efi", "ttyAMA0", "linux-image-arm64")


# -- arm64 programs on this host --------------------------------------------------------------------

def test_binfmt_rule_and_entry_are_read_as_the_kernel_and_the_package_write_them(tmp_path):
    conf = tmp_path / "binfmt.d"
    conf.mkdir()
    line = (r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:"
            r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:"
            r"/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF")
    (conf / "qemu-aarch64.conf").write_text(f"# a comment\n{line}\n")
    assert host.binfmt_rule(arch.AARCH64, [tmp_path / "none", conf]) == ("qemu-aarch64", line)
    (conf / "qemu-aarch64.conf").write_text("# nothing\n")
    with pytest.raises(host.HostError, match="no binfmt_misc rule for qemu-aarch64"):
        host.binfmt_rule(arch.AARCH64, [conf])
    with pytest.raises(host.HostError, match="install qemu-user-static"):
        host.binfmt_rule(arch.AARCH64, [tmp_path / "none"])
    misc = tmp_path / "misc"
    misc.mkdir()
    (misc / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n"
                                       "flags: POF\noffset 0\nmagic 7f454c46\nmask ffffffff\n")
    entry = host.binfmt_entry("qemu-aarch64", misc)
    assert entry["enabled"] == "yes" and entry["flags"] == "POF"
    assert entry["interpreter"] == "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    assert host.binfmt_entry("qemu-riscv64", misc) is None


def test_native_architecture_needs_nothing():
    native = arch.by_name(os.uname().machine)
    host.enable_foreign(native)          # no binfmt_misc, no qemu-user needed


@pytest.mark.skipif(not is_root(), reason="registers with binfmt_misc: needs root")
@pytest.mark.skipif(arch.AARCH64.native, reason="an arm64 host runs arm64 programs itself")
def test_arm64_programs_run_here_and_inside_a_chroot(arm64_program, tmp_path):
    """After enable_foreign an arm64 program runs, also chrooted into a tree without any qemu
    (what debootstrap's second stage and dracut in an arm64 root need)."""
    if not have("qemu-aarch64-static"):
        pytest.skip("needs qemu-user-static")
    host.enable_foreign(arch.AARCH64)
    entry = host.binfmt_entry("qemu-aarch64")
    assert entry is not None and entry["enabled"] == "yes" and "F" in entry["flags"]
    assert subprocess.run([str(arm64_program)]).returncode == 42
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "run"):
        (root / d).mkdir()
    shutil.copy2(arm64_program, root / "bin" / "hello")
    with pytest.raises(host.HostError, match=r"exit 42"):
        host.chroot_run(root, ["/bin/hello"], what="arm64 program in a chroot")
    host.enable_foreign(arch.AARCH64)    # again: already there, nothing to do


# -- the arm64 board root -------------------------------------------------------------------------

def test_rootfs_spec_for_arm64_and_the_amd64_key():
    amd64 = RootfsSpec()
    # The amd64 spec's inputs are what they were before the architecture became one: its
    # cached roots stay valid. Naming amd64 explicitly is the same spec.
    assert "arch" not in amd64.inputs() and RootfsSpec.for_arch("amd64") == amd64
    assert RootfsSpec.for_arch("x86_64").key() == amd64.key()
    arm = RootfsSpec.for_arch("arm64")
    assert arm.arch == "arm64" and arm.target is arch.AARCH64
    assert arm.kernel_packages == ("linux-image-arm64",) and "systemd-boot-efi" in arm.extra_packages
    assert arm.inputs()["arch"] == "arm64" and arm.key() != amd64.key()
    # the architecture alone changes the key (same packages otherwise)
    assert replace(amd64, arch="arm64").key() not in (amd64.key(), arm.key())
    assert RootfsSpec.for_arch("arm64", mirror="http://mirror.example/debian").key() != arm.key()
    with pytest.raises(BootimgError, match="unsupported architecture"):
        RootfsSpec.for_arch("mips")


def test_arm64_root_talks_on_the_pl011_console():
    pc, arm = customize_script(), customize_script("ttyAMA0")
    assert customize_script(arch.X86_64.console) == pc and "serial-getty@ttyS0.service" in pc
    assert "ttyS0" not in arm and "serial-getty@ttyAMA0.service" in arm and "tty=/dev/ttyAMA0" in arm
    assert RootfsSpec.for_arch("arm64").inputs()["customize_sh"] == arm


def test_board_cli_takes_the_architecture():
    r = run_cli("board", "rootfs", "--arch", "sparc", "--build-dir", "/nonexistent")
    assert r.returncode != 0 and r.stderr.decode().strip().splitlines() == [
        "bootimg board: unsupported architecture 'sparc' (supported: amd64, arm64)"]


# -- the QEMU machine -----------------------------------------------------------------------------

def test_qemu_argv_of_an_arm64_machine(tmp_path):
    m = Machine(disk=Path("D"), arch=arch.AARCH64)
    argv = qemu_argv(m, efi_vars=Path("V"))
    assert argv[:7] == ["qemu-system-aarch64", "-machine", "virt", "-accel", "tcg", "-cpu", "max,pauth-impdef=on"]
    assert argv[argv.index("-nic") + 1] == "user,model=virtio-net-pci"
    assert "file=D,format=raw,if=virtio,cache=unsafe" in argv
    if Path("/usr/share/AAVMF/AAVMF_CODE.fd").is_file():
        assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd" in argv
    assert "if=pflash,format=raw,unit=1,file=V" in argv
    # the PC keeps its machine and CPU; an explicit -cpu wins
    assert qemu_argv(Machine(disk=Path("D")), efi_vars=Path("V"))[:7] == \
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max,hypervisor=off"]
    assert qemu_argv(m.with_(cpu="cortex-a57"), efi_vars=Path("V"))[6] == "cortex-a57"
    # a direct kernel boot of an arm64 kernel
    direct = qemu_argv(Machine(kernel=Path("K"), append="console=ttyAMA0", arch=arch.AARCH64))
    assert direct[:3] == ["qemu-system-aarch64", "-machine", "virt"] and "pflash" not in " ".join(direct)


@pytest.mark.skipif(not have("qemu-system-aarch64"), reason="needs qemu-system-arm")
def test_qemu_takes_the_arm64_command_line(tmp_path):
    """QEMU itself accepts the machine, CPU and devices of the arm64 argv (and its firmware's
    pflash sizes): started paused, then quit through QMP."""
    from bootimg.vm.qemu import Run, firmware

    if not Path(arch.AARCH64.firmware_code[0]).is_file():
        pytest.skip("needs qemu-efi-aarch64 (AAVMF)")
    code, template = firmware(arch.AARCH64)
    assert code.stat().st_size == template.stat().st_size == 64 << 20
    disk = tmp_path / "empty.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    run = Run(Machine(disk=disk, arch=arch.AARCH64, extra_args=("-S",)))
    try:
        exited = run.wait_exit(5)
    finally:
        run.stop()
    assert not exited, run.result().error           # a refused option or device ends QEMU at once
    assert "terminating on signal" in run.result().error


# -- the disk of an arm64 release ----------------------------------------------------------------

@needs_cross
def test_arm64_release_gets_an_arm64_disk(arm64_program, tmp_path):
    """``bootimg disk`` reads the architecture from the root's systemd: the aa64 loader names,
    the arm64 root partition type; a kernel + initramfs of another architecture is refused."""
    for t in ("sfdisk", "mkfs.vfat", "mcopy", "mke2fs"):
        if not have(t):
            pytest.skip(f"needs {t}")
    kver = "6.12.0-arm64-test"
    root = tmp_path / "rootfs"
    for d in (f"usr/lib/modules/{kver}/kernel", "boot", "usr/lib/systemd/boot/efi", "etc", "var", "sysroot"):
        (root / d).mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{kver}").write_bytes(b"arm64 kernel " * 1000)
    shutil.copy2(arm64_program, root / "usr/lib/systemd/systemd")
    loader = b"MZ systemd-boot for aa64 " * 100
    (root / "usr/lib/systemd/boot/efi/systemd-bootaa64.efi").write_bytes(loader)
    (tmp_path / "m.yaml").write_text(
        "apiVersion: bootimg/v1\nidentity: {name: ecu, version: '1.0', source_date_epoch: 1767225600}\n"
        "rootfs: {source: {type: directory, path: rootfs}}\nintegrity: {trust: sealed, fsverity: required}\n"
        "boot: {kernel_args: ['console=ttyAMA0,115200']}\n")
    r = run_cli("build", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "rel"), "--no-boot-check")
    assert r.returncode == 0, r.stderr.decode()
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"arm64 kernel " * 1000)
    (boot / "initrd.img").write_bytes(b"initramfs " * 1000)
    (boot / "info.json").write_text(json.dumps({"kver": kver, "arch": "arm64", "key": "t"}))
    r = run_cli("disk", str(tmp_path / "rel"), "-o", str(tmp_path / "disk.raw"), "--boot", str(boot), "--json")
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert info["arch"] == "arm64" and info["boot"]["systemd_boot"] == "root:/usr/lib/systemd/boot/efi/systemd-bootaa64.efi"
    table = json.loads(subprocess.run(["sfdisk", "--json", str(tmp_path / "disk.raw")], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    esp, data = table["partitions"]
    assert data["type"].lower() == arch.AARCH64.root_type
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    img = f"{tmp_path / 'disk.raw'}@@{esp['start'] * 512}"
    for path in ("/EFI/BOOT/BOOTAA64.EFI", "/EFI/systemd/systemd-bootaa64.efi"):
        assert subprocess.run(["mtype", "-i", img, f"::{path}"], capture_output=True, env=env).stdout == loader
    listing = subprocess.run(["mdir", "-i", img, "-/", "-b", "::/EFI"], capture_output=True, text=True, env=env).stdout
    assert "X64" not in listing.upper().replace("AA64", "")
    # `bootimg qemu` / `kpi run` take the machine's architecture from the disk
    from bootimg.vm.commands import disk_arch

    assert disk_arch(tmp_path / "disk.raw", "raw") is arch.AARCH64
    assert disk_arch(tmp_path / "disk.raw", "qcow2") is None and disk_arch(tmp_path / "m.yaml", "raw") is None
    # the amd64 kernel + initramfs of another release do not go on this disk
    (boot / "info.json").write_text(json.dumps({"kver": kver, "arch": "amd64", "key": "t"}))
    r = run_cli("disk", str(tmp_path / "rel"), "-o", str(tmp_path / "other.raw"), "--boot", str(boot))
    assert r.returncode != 0 and not (tmp_path / "other.raw").exists()
    assert r.stderr.decode().strip().splitlines() == [
        "bootimg disk: the kernel and initramfs are for amd64, the release's root is arm64"]


# -- the example containers for arm64 ---------------------------------------------------------------

def _example_inputs():
    sys.path.insert(0, str(REPO / "tools"))
    import example_inputs

    return example_inputs


def test_runtime_is_read_inside_its_root_not_the_host(tmp_path):
    ex = _example_inputs()
    root = tmp_path / "root"
    (root / "usr/lib/aarch64-linux-gnu").mkdir(parents=True)
    (root / "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1").write_bytes(b"the root's ld.so")
    (root / "lib").symlink_to("usr/lib")
    # an absolute link: /usr/lib/... of the root, never of the host
    (root / "usr/lib/ld-linux-aarch64.so.1").symlink_to("/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1")
    assert ex.read_in(root, "lib/ld-linux-aarch64.so.1") == b"the root's ld.so"
    assert ex.read_in(root, "usr/lib/../lib/./aarch64-linux-gnu/ld-linux-aarch64.so.1") == b"the root's ld.so"
    (root / "etc").mkdir()
    (root / "etc/os").symlink_to("/etc/os-release")          # the host has one; the root does not
    with pytest.raises(SystemExit, match="etc/os: not found"):
        ex.read_in(root, "etc/os")
    (root / "loop").symlink_to("loop")
    with pytest.raises(SystemExit, match="too many symlinks"):
        ex.read_in(root, "loop/x")


@needs_cross
def test_arm64_example_containers_carry_arm64_programs(tmp_path):
    """``example_inputs.py --arch arm64``: the four images in images-arm64, every ELF in them
    arm64 (demo-wait cross-compiled, sh/libc/ld.so from the arm64 root), the OCI configs say so;
    the amd64 images are not touched."""
    ex = _example_inputs()
    sysroot = tmp_path / "sysroot"
    program = tmp_path / "prog"
    (tmp_path / "p.c").write_text(HELLO_C)
    subprocess.run([arch.AARCH64.cc, "-static", "-o", str(program), str(tmp_path / "p.c")], check=True)
    for rel, _inside in ex.RUNTIME["arm64"]:
        (sysroot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(program, sysroot / rel)
    build = tmp_path / "build"
    (build / "images").mkdir(parents=True)
    (build / "images" / "amd64-marker").write_text("x")
    ex.main(build, "arm64", sysroot)
    images = build / "images-arm64"
    assert sorted(p.name for p in images.iterdir()) == ["cluster", "rear-camera.tar.zst", "telemetry", "vehicle-bus"]
    assert (build / "images" / "amd64-marker").exists() and not (build / "ivi-rootfs").exists()
    tel = images / "telemetry"
    for path in ("usr/bin/sh", "usr/bin/demo-wait", "usr/lib/aarch64-linux-gnu/libc.so.6",
                 "usr/lib/ld-linux-aarch64.so.1"):
        assert arch.of_elf((tel / path).read_bytes()[:64], file=path) is arch.AARCH64, path
    index = json.loads((images / "vehicle-bus" / "index.json").read_text())
    blobs = images / "vehicle-bus" / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    assert config["architecture"] == "arm64"
    # the same inputs give the same images
    first = {p.relative_to(images): p.read_bytes() for p in images.rglob("*") if p.is_file()}
    ex.main(build, "arm64", sysroot)
    assert first == {p.relative_to(images): p.read_bytes() for p in images.rglob("*") if p.is_file()}
