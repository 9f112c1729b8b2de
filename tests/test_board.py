"""The QEMU board (bootimg.board): cache keys, disk layouts and argv without a VM; then, marked
``vm``, real boots of the plain ext4 baseline under TCG QEMU.

The VM tests use the real cache ($BOOTIMG_CACHE/board, default /var/cache/bootimg/board): on a
fresh machine the first test builds the root (debootstrap, ~1-2 min) and the initramfs (~30 s);
afterwards the whole file takes a few boots of ~20-40 s each.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import have, is_root, run_cli

from bootimg import host
from bootimg.board import (
    LABEL,
    MARKER,
    POWEROFF_ARG,
    BootResult,
    HostError,
    RootfsSpec,
    baseline_cmdline,
    boot,
    boot_baseline,
    check_qemu,
    extract_rootfs,
    make_disk,
    prepare,
)
from bootimg.board.rootfs import customize_script
from bootimg.vm.qemu import SWITCH_ROOT_RE, Machine, qemu_argv

BOOT_TIMEOUT = 180.0


# --- no VM ----------------------------------------------------------------------------------

def test_rootfs_key_covers_every_input(monkeypatch):
    base = RootfsSpec()
    base_key = base.key()
    assert base_key == RootfsSpec().key() and len(base_key) == 16
    changed = [replace(base, suite="trixie"), replace(base, mirror="http://mirror.example/debian"),
               replace(base, packages=base.packages + ("less",)), replace(base, extra_packages=("vim",)),
               replace(base, kernel_suite="bookworm"), replace(base, kernel_packages=("linux-image-cloud-amd64",))]
    keys = {spec.key() for spec in changed}
    assert base_key not in keys and len(keys) == len(changed)
    # The customisation script is part of the key.
    import bootimg.board.rootfs as rootfs_mod
    monkeypatch.setattr(rootfs_mod, "BOARD_READY_UNIT", rootfs_mod.BOARD_READY_UNIT + "# changed\n")
    assert RootfsSpec().key() != base_key


def test_customize_script_installs_marker_unit_and_getty():
    script = customize_script()
    assert not re.search(r"@[A-Z_]+@", script)  # every placeholder substituted
    assert "board-ready.service" in script and "WantedBy=multi-user.target" in script
    assert "Type=oneshot" in script and "After=multi-user.target" in script
    assert MARKER in script and POWEROFF_ARG in script
    assert "--autologin root" in script and ": > /etc/machine-id" in script


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTIMG_CACHE", str(tmp_path / "c"))
    assert host.cache_dir() == tmp_path / "c" / "board" and (tmp_path / "c" / "board").is_dir()
    assert host.cache_dir(tmp_path / "x") == tmp_path / "x"


def test_prune_cache_keeps_the_recent_the_newest_and_the_locked(tmp_path):
    """The cache of disks, initramfs builds and roots stays bounded across runs: the least
    recently used entries beyond ``keep`` go, with their companions, but never one used in the
    last hours, one another process holds the lock of, a lock file, or a name that is not an
    entry."""
    import fcntl
    import os

    now = time.time()
    keys = [f"{i:016x}" for i in range(6)]
    for i, key in enumerate(keys):          # key 0 used 10 h ago, ..., key 5 just now
        entry = tmp_path / f"disk-{key}.img"
        entry.write_bytes(b"x")
        (tmp_path / f"disk-{key}.json").write_text("{}")
        (tmp_path / f".disk-{key}.lock").touch()
        age = 3600 * (10 - 2 * i)
        os.utime(entry, (now - age, now - age))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / f"disk-{keys[0]}.log").write_text("log")
    (tmp_path / "disk-notakey.img").write_bytes(b"mine")
    os.utime(tmp_path / "disk-notakey.img", (0, 0))
    boot = tmp_path / f"boot-{keys[0]}"
    boot.mkdir()
    (boot / "initrd.img").write_bytes(b"i")
    os.utime(boot, (0, 0))
    with open(tmp_path / f".disk-{keys[1]}.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = host.prune_cache(tmp_path, "disk-", ".img", keep=2, min_age=3 * 3600)
    # Newest 2: keys 5, 4 (0 h, 2 h). Beyond them: 3 (4 h), 2 (6 h), 1 (8 h, locked), 0 (10 h).
    assert sorted(p.name for p in removed) == [f"disk-{keys[0]}.img", f"disk-{keys[2]}.img", f"disk-{keys[3]}.img"]
    left = sorted(p.name for p in tmp_path.iterdir())
    for key in keys[1:2] + keys[4:]:
        assert f"disk-{key}.img" in left and f"disk-{key}.json" in left
    for key in (keys[0], keys[2], keys[3]):
        assert f"disk-{key}.img" not in left and f"disk-{key}.json" not in left
        assert f".disk-{key}.lock" in left
    assert not (tmp_path / "logs" / f"disk-{keys[0]}.log").exists()
    assert (tmp_path / "disk-notakey.img").read_bytes() == b"mine"
    assert boot.is_dir()                    # another kind of entry
    # A hit makes an entry the newest again: key 1, once unlocked and used, outlives key 4.
    host.cache_used(tmp_path / f"disk-{keys[1]}.img")
    again = host.prune_cache(tmp_path, "disk-", ".img", keep=1, min_age=0)
    assert sorted(p.name for p in again) == [f"disk-{keys[4]}.img", f"disk-{keys[5]}.img"]
    assert (tmp_path / f"disk-{keys[1]}.img").exists()


def test_baseline_cmdline_and_qemu_argv(tmp_path):
    cmdline = baseline_cmdline("quiet")
    assert cmdline.split() == [f"root=LABEL={LABEL}", "rw", "console=ttyS0", "panic=-1", POWEROFF_ARG, "quiet"]
    assert POWEROFF_ARG not in baseline_cmdline(poweroff=False)
    argv = qemu_argv(Machine(disk=Path("D"), kernel=Path("K"), initrd=Path("I"), append=cmdline))
    assert argv[:7] == ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max,hypervisor=off"]
    for pair in (["-kernel", "K"], ["-initrd", "I"], ["-append", cmdline], ["-m", "2048"], ["-smp", "2"]):
        i = argv.index(pair[0])
        assert argv[i:i + 2] == pair
    assert "-no-reboot" in argv and "-snapshot" in argv and "pflash" not in " ".join(argv)
    assert "file=D,format=raw,if=virtio,cache=unsafe" in argv
    assert "-initrd" not in qemu_argv(Machine(kernel=Path("K"), append=cmdline))
    # a UEFI machine: the firmware as read-only pflash, the variables given, the disk, no -kernel
    uefi = qemu_argv(Machine(disk=Path("D.qcow2"), disk_format="qcow2"), efi_vars=Path("V"))
    assert "-kernel" not in uefi and "file=D.qcow2,format=qcow2,if=virtio,cache=unsafe" in uefi
    assert any(a.startswith("if=pflash,format=raw,unit=0,readonly=on,file=") for a in uefi)
    assert "if=pflash,format=raw,unit=1,file=V" in uefi


def test_boot_result_parses_the_marker():
    line = (f"{MARKER} Startup finished in 2.354s (kernel) + 5.115s (initrd) + 3.471s (userspace) "
            f"= 10.941s; multi-user.target reached; uptime 11.20s")
    r = BootResult("ready", line, line, 12.5, 14.0, "root", lines=[(12.5, line)])
    assert r.ok and r.startup == {"kernel": 2.354, "initrd": 5.115, "userspace": 3.471, "total": 10.941}
    assert r.line_time("READY") == 12.5 and "ready in 12.5 s" in r.summary()
    assert BootResult("timeout", "", None, 9, 9, "initramfs").startup == {}


@pytest.mark.skipif(not have("mkfs.ext4") or not have("debugfs"), reason="needs e2fsprogs")
def test_disk_layouts(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("board\n")
    (tree / "sbin").symlink_to("usr/sbin")
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "release.json").write_text("{}\n")

    def ls(img: Path, path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"ls -l {path}", str(img)], capture_output=True,
                              text=True, check=True).stdout

    flat = make_disk(tmp_path / "flat.img", tree, headroom=8 << 20)
    assert "hostname" in ls(flat.path, "/etc") and "sbin" in ls(flat.path, "/")
    nested = make_disk(tmp_path / "nested.img", tree, subdir="rootfs",
                       extra={"bootimg/releases/1": rel}, seed="s1", headroom=8 << 20)
    assert "hostname" in ls(nested.path, "/rootfs/etc") and "release.json" in ls(nested.path, "/bootimg/releases/1")
    assert "etc" not in ls(nested.path, "/")
    assert nested.layout == {"root": "/rootfs", "extra": {"/bootimg/releases/1": str(rel)}}
    head = subprocess.run(["dumpe2fs", "-h", str(nested.path)], capture_output=True, text=True).stdout
    assert f"Filesystem volume name:   {LABEL}" in head and nested.uuid in head
    assert "verity" in head.split("Filesystem features:")[1].splitlines()[0]
    # The UUID comes from the seed: same seed, same UUID; another seed, another.
    assert make_disk(tmp_path / "again.img", tree, subdir="rootfs", seed="s1", headroom=8 << 20).uuid == nested.uuid
    assert nested.uuid != flat.uuid
    # The staging tree is gone and the source is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.img", "flat.img", "nested.img", "rel", "tree"]
    with pytest.raises(HostError, match="bad destination"):
        make_disk(tmp_path / "bad.img", tree, extra={"../x": rel})


def test_old_qemu_is_refused_with_a_hint(tmp_path):
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u13)'\n")
    fake.chmod(0o755)
    with pytest.raises(HostError, match=r"QEMU 7\.2\.22 is too old.*>= 8.*bookworm-backports"):
        check_qemu(str(fake))
    with pytest.raises(HostError, match="not found"):
        check_qemu(str(tmp_path / "missing-qemu"))


@pytest.mark.skipif(not have("qemu-system-x86_64"), reason="needs QEMU")
def test_qemu_start_failure_is_reported_not_hung(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    result = boot(kernel, None, None, "console=ttyS0", timeout=60, extra_args=["-no-such-option"])
    assert result.exit_reason == "qemu-error" and result.wall < 30
    assert "no-such-option" in result.error
    assert "QEMU failed" in result.summary()


FAULT_LINE = "[   22.588636] rcu: rcu_preempt kthread timer wakeup didn't happen for 5251 jiffies! g-1151 f0x0"


@pytest.mark.parametrize("consoles, machine_changes, runs, reason, faults", [
    # A lost timer interrupt (TCG) then a good boot: run again, ready, the fault counted.
    ([["Run /init", FAULT_LINE], ["Run /init", "BOOTIMG-BOARD: READY"]], {}, 2, "ready", 1),
    # A timeout of the system itself: not run again.
    ([["Run /init", "bootimg: FATAL: no"]], {}, 1, "timeout", 0),
    # Faulty twice: the second result stands.
    ([[FAULT_LINE], [FAULT_LINE], ["BOOTIMG-BOARD: READY"]], {}, 2, "timeout", 1),
    # A run that leaves state behind (persistent UEFI variables, a disk without snapshot) is not repeated.
    ([[FAULT_LINE], ["BOOTIMG-BOARD: READY"]], {"efi_vars": Path("/x/vars.fd")}, 1, "timeout", 0),
    ([[FAULT_LINE], ["BOOTIMG-BOARD: READY"]], {"snapshot": False}, 1, "timeout", 0),
])
def test_boot_runs_again_only_after_an_emulator_fault(tmp_path, monkeypatch, consoles, machine_changes, runs,
                                                      reason, faults):
    """A vCPU that never gets its timer interrupt under TCG makes a boot crawl past any timeout;
    such a boot is run once more, and only when the run leaves nothing behind."""
    from bootimg.vm import qemu

    started = []

    class FakeRun:
        def __init__(self, machine, *, marker=None, powers_off=False, serial_log=None):
            self.console = consoles[len(started)]
            started.append(machine)
            Path(serial_log).write_text("\n".join(self.console))

        def watch(self, **kw):
            pass

        def stop(self):
            pass

        def result(self):
            ready = any("READY" in line for line in self.console)
            return qemu.BootResult(exit_reason="ready" if ready else "timeout", console="\n".join(self.console),
                                   marker="READY" if ready else None, duration=1.0, wall=1.0, stage="initramfs",
                                   lines=[(0.1, line) for line in self.console])

    monkeypatch.setattr(qemu, "Run", FakeRun)
    machine = qemu.Machine(disk=tmp_path / "d.raw", **machine_changes)
    log = tmp_path / "console.log"
    result = qemu.boot(machine, serial_log=log)
    assert (len(started), result.exit_reason, result.emulator_faults) == (runs, reason, faults)
    assert log.read_text() == "\n".join(consoles[runs - 1])
    assert sorted(p.name for p in tmp_path.glob("console.log.fault-*")) == [f"console.log.fault-{i + 1}" for i in range(faults)]


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("board", "boot-baseline", "--times", "0")
    assert proc.returncode != 0
    assert proc.stderr.decode().strip() == "bootimg board: --times must be at least 1"


# --- VM: real boots -------------------------------------------------------------------------

def vm(test):
    """A real-boot test: marked ``vm``; building the board needs root (debootstrap, chroot)."""
    return pytest.mark.vm(pytest.mark.skipif(not is_root(), reason="building the board needs root")(test))


@pytest.fixture(scope="session")
def board():
    check_qemu()
    return prepare()


@pytest.fixture(scope="session")
def baseline_disk(board, tmp_path_factory):
    work = tmp_path_factory.mktemp("board")
    tree = extract_rootfs(board.rootfs, work / "tree")
    disk = make_disk(work / "baseline.img", tree, seed="test-baseline")
    shutil.rmtree(tree)
    return disk


@vm
def test_baseline_boots_to_default_target(board, tmp_path):
    assert board.kver.startswith("6.12."), board.kver
    run = boot_baseline(board, times=1, timeout=BOOT_TIMEOUT, serial_logs=tmp_path, work_dir=tmp_path / "work")
    result = run.results[0]
    assert result.ok, result.summary()
    assert result.marker.startswith(MARKER)
    startup = result.startup
    assert set(startup) == {"kernel", "initrd", "userspace", "total"}
    assert 0 < startup["total"] < BOOT_TIMEOUT
    assert abs(startup["kernel"] + startup["initrd"] + startup["userspace"] - startup["total"]) < 0.01
    assert "multi-user.target reached" in result.marker
    assert result.duration < BOOT_TIMEOUT and result.stage == "root"
    # The whole chain ran: 6.12 kernel, dracut's initramfs, switch to the ext4 root, our unit,
    # then the poweroff the command line asked for (QEMU exits by itself).
    console = result.console
    assert f"Linux version {board.kver}" in console
    assert "(Initramfs)" in console and "EXT4-fs (vda): mounted filesystem" in console
    assert result.line_time(r"\(Initramfs\)") < result.line_time(SWITCH_ROOT_RE.pattern) < result.duration
    assert "reboot: Power down" in console and result.returncode == 0
    assert (tmp_path / "boot-1.log").read_bytes().count(MARKER.encode()) == 1
    # The throw-away tree and disk are gone.
    assert list((tmp_path / "work").iterdir()) == []


@vm
def test_prepare_reuses_the_cache(board):
    tarball = board.rootfs.tarball
    before = tarball.stat()
    t0 = time.monotonic()
    again = prepare()
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0
    assert again.rootfs.cached and again.boot_files.cached and again.cached
    assert again.rootfs.tarball == tarball and again.rootfs.key == board.rootfs.key
    after = tarball.stat()
    # Not rebuilt (the same file), only marked as used for the cache's pruning.
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert after.st_mtime_ns >= before.st_mtime_ns
    assert again.initrd == board.initrd and again.boot_files.initrd_size == board.initrd.stat().st_size
    # The CLI says the same.
    proc = run_cli("board", "prepare")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert str(tarball) in out and "cached" in out and board.kver in out


@vm
def test_broken_root_ends_in_initramfs_emergency(board, baseline_disk, tmp_path):
    # rd.timeout bounds dracut's wait for the root device (default: several minutes).
    cmdline = baseline_cmdline("rd.timeout=10 rd.retry=5", root="LABEL=no-such-disk")
    t0 = time.monotonic()
    result = boot(board.kernel, board.initrd, baseline_disk.path, cmdline, timeout=BOOT_TIMEOUT,
                  serial_log=tmp_path / "serial.log")
    elapsed = time.monotonic() - t0
    assert result.exit_reason == "emergency", result.summary()
    assert result.stage == "initramfs" and result.marker is None and not result.ok
    assert "/dev/disk/by-label/no-such-disk does not exist" in result.console
    assert "emergency shell (initramfs)" in result.summary()
    assert elapsed < BOOT_TIMEOUT - 30  # detected, not run into the watchdog


@vm
def test_kernel_panic_is_reported(board, baseline_disk):
    # Without the initramfs the kernel has no virtio_blk (a module): it cannot mount the root.
    result = boot(board.kernel, None, baseline_disk.path, "root=/dev/vda rw console=ttyS0 panic=-1",
                  timeout=BOOT_TIMEOUT)
    assert result.exit_reason == "panic", result.summary()
    assert "VFS: Unable to mount root fs" in result.console and result.wall < 60


@vm
def test_watchdog_kills_a_hanging_boot(board, baseline_disk):
    t0 = time.monotonic()
    result = boot(board.kernel, board.initrd, baseline_disk.path, timeout=4)
    assert result.exit_reason == "timeout" and not result.ok
    assert time.monotonic() - t0 < 20
    assert result.returncode is not None  # QEMU was reaped
    assert "timeout" in result.summary()


MODULE_SETUP = """\
#!/bin/bash
# bootimg board test module: a systemd unit in the composefs slot (after sysroot.mount,
# before initrd-root-fs.target) that leaves a line on the console.
check() { return 255; }
depends() { echo systemd; return 0; }
install() {
    inst_simple "$moddir/bootimg-test.service" "$systemdsystemunitdir/bootimg-test.service"
    $SYSTEMCTL -q --root "$initdir" add-wants initrd-root-fs.target bootimg-test.service
}
"""

MODULE_UNIT = """\
[Unit]
Description=bootimg board test hook
DefaultDependencies=no
After=sysroot.mount
Before=initrd-root-fs.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'test -e /sysroot/etc/os-release && echo "BOOTIMG-TEST-MODULE: sysroot ok" > /dev/kmsg'
"""


@vm
def test_extra_dracut_module_runs_in_the_initramfs(board, baseline_disk, tmp_path):
    module = tmp_path / "90bootimgtest"
    module.mkdir()
    (module / "module-setup.sh").write_text(MODULE_SETUP)
    (module / "bootimg-test.service").write_text(textwrap.dedent(MODULE_UNIT))
    custom = prepare(add_modules=["bootimgtest"], module_dirs=[module])
    assert custom.rootfs.key == board.rootfs.key and custom.boot_files.key != board.boot_files.key
    assert custom.kernel.read_bytes() == board.kernel.read_bytes()
    result = boot(custom.kernel, custom.initrd, baseline_disk.path, timeout=BOOT_TIMEOUT)
    assert result.ok, result.summary()
    hook = result.line_time("BOOTIMG-TEST-MODULE: sysroot ok")
    assert hook is not None and hook < result.line_time(SWITCH_ROOT_RE.pattern) < result.duration
    assert custom.initrd != board.initrd and board.initrd.is_file()


def test_device_tools_in_the_board_root_do_not_follow_the_checkout_times(tmp_path):
    """The root image's digest depends on bootimg's code, not on when its checkout's directories
    changed (an import makes __pycache__ and changes its directory's mtime)."""
    import os

    import bootimg
    from bootimg.board.system import install_device_tools

    tree = tmp_path / "root"
    for d in ("usr/lib/python3/dist-packages", "usr/bin"):
        (tree / d).mkdir(parents=True)
        os.utime(tree / d, (1000, 1000))

    def times() -> dict[str, int]:
        return {str(p.relative_to(tree)): p.lstat().st_mtime_ns for p in sorted(tree.rglob("*"))}

    install_device_tools(tree)
    first = times()
    package = Path(bootimg.__file__).parent / "boot"
    before = package.stat()
    os.utime(package, (before.st_atime + 3600, before.st_mtime + 3600))    # as a new __pycache__ would
    try:
        install_device_tools(tree)
    finally:
        os.utime(package, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert times() == first
    assert first["usr/bin"] == first["usr/lib/python3/dist-packages"] == 1000 * 10**9
    assert (tree / "usr/bin/bootimg").stat().st_mode & 0o777 == 0o755
    assert (tree / "usr/lib/python3/dist-packages/bootimg/cli.py").is_file()
    assert not list(tree.rglob("__pycache__"))


@pytest.mark.skipif(not shutil.which("debugfs"), reason="needs e2fsprogs")
def test_tamper_object_rewrites_the_object_of_a_file_and_unprovisions(tmp_path):
    """diskedit.tamper_object, the attacker of the VM tests, on a bare ext4 image: the object
    the image names for the file is what changes, nothing is mounted."""
    import stat

    from bootimg.board import diskedit
    from bootimg.composefs import fsverity
    from bootimg.composefs.store import ObjectStore
    from bootimg.composefs.tree import Node
    from bootimg.composefs.writer import write_image
    from bootimg.host import HostError
    from bootimg.sources import treeops

    content = b"GNU General Public License\n" * 10
    store = ObjectStore(tmp_path / "tree/bootimg/objects")
    root = Node(stat.S_IFDIR | 0o755)
    node = treeops.add_file(root, "/usr/share/gpl", content, store=store)
    obj = fsverity.object_name(node.digest)
    (tmp_path / "root.cfs").write_bytes(write_image(root))
    (tmp_path / "tree/bootimg/state").mkdir(parents=True)
    (tmp_path / "tree/bootimg/state/.provisioned").write_text("")
    disk = tmp_path / "data.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tmp_path / "tree"), str(disk), "8M"], check=True)
    got = diskedit.tamper_object(disk, tmp_path / "root.cfs", "/usr/share/gpl", lambda d: d.replace(b"GNU", b"GNO", 1))
    assert got == obj
    assert diskedit.read_file(disk, f"/bootimg/objects/{obj}") == content.replace(b"GNU", b"GNO", 1)
    assert not diskedit.exists(disk, diskedit.PROVISIONED_MARKER)
    with pytest.raises(HostError, match="/usr/share is not a file in the object store"):
        diskedit.tamper_object(disk, tmp_path / "root.cfs", "/usr/share", lambda d: d)
