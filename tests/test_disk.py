"""`bootimg disk`: the GPT disk of a release, made without root or loop devices, byte for byte
the same from the same inputs; checked with the tools that read it (sfdisk, mtools, debugfs,
objdump, sbverify, qemu-img). Booting such disks is tests/test_disk_boot.py (VM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import have, is_root, run_cli

from bootimg.composefs import fsverity

pytestmark = pytest.mark.skipif(not all(have(t) for t in ("sfdisk", "mkfs.vfat", "mcopy", "mke2fs", "debugfs")),
                                reason="needs fdisk, dosfstools, mtools, e2fsprogs")

KVER = "6.12.0-test"
UNPRIVILEGED = ("nobody", "nogroup")


def make_root(top: Path) -> Path:
    """A small root with what `bootimg disk` reads from it: a kernel, its modules directory,
    systemd (the ELF header says the architecture) and a /var with an owner and an xattr."""
    root = top / "rootfs"
    for d in (f"usr/lib/modules/{KVER}/kernel", "boot", "usr/lib/systemd", "etc", "var/lib/app", "sysroot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "boot" / f"vmlinuz-{KVER}").write_bytes(b"MZ kernel image " * 4096)
    (root / f"usr/lib/modules/{KVER}/modules.builtin").write_text("kernel/fs/erofs/erofs.ko\n")
    shutil.copyfile("/usr/lib/systemd/systemd", root / "usr/lib/systemd/systemd")
    (root / "usr/lib/os-release").write_text('ID=test\nPRETTY_NAME="disk test"\n')
    (root / "var/lib/app/state").write_text("persistent state\n")
    os.chown(root / "var/lib/app/state", 105, 106)
    subprocess.run(["setfattr", "-n", "security.capability", "-v", "0x0100000200200000000000000000000000000000",
                    str(root / "var/lib/app/state")], check=True)
    subprocess.run(["setfattr", "-n", "user.test", "-v", "yes", str(root / "var/lib/app/state")], check=True)
    return root


MANIFEST = """\
apiVersion: bootimg/v1
identity: {name: disktest, version: "2.0", source_date_epoch: 1767225600}
rootfs:
  source: {type: directory, path: rootfs}
integrity: {trust: sealed, fsverity: required}
boot: {kernel_args: ["console=ttyS0,115200", quiet]}
"""


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("disk")
    make_root(top)
    (top / "m.yaml").write_text(MANIFEST)
    r = run_cli("build", str(top / "m.yaml"), "-o", str(top / "release"), "--no-boot-check")
    assert r.returncode == 0, r.stderr.decode()
    return top / "release"


@pytest.fixture(scope="module")
def boot_dir(tmp_path_factory) -> Path:
    """What `bootimg initramfs -o DIR` writes (a stand-in initramfs: dracut itself runs in the VM tests)."""
    d = tmp_path_factory.mktemp("boot")
    (d / "vmlinuz").write_bytes(b"MZ kernel image " * 4096)
    (d / "initrd.img").write_bytes(b"\x1f\x8b initramfs " * 8192)
    (d / "info.json").write_text(json.dumps({"kver": KVER, "arch": "amd64", "key": "test"}))
    return d


def as_user(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` as an unprivileged user (the disk step must not need root)."""
    import sys

    cmd = [sys.executable, "-m", "bootimg", *argv]
    if is_root():
        cmd = ["setpriv", f"--reuid={UNPRIVILEGED[0]}", f"--regid={UNPRIVILEGED[1]}", "--clear-groups", *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HOME": str(cwd)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, env=env, timeout=300)


def open_to_all(*paths: Path) -> None:
    for top in paths:
        for p in [top, *top.parents]:
            if p == Path("/"):
                break
            p.chmod(p.stat().st_mode | 0o755)
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames:
                os.chmod(os.path.join(dirpath, n), 0o755)
            for n in filenames:
                os.chmod(os.path.join(dirpath, n), os.stat(os.path.join(dirpath, n)).st_mode | 0o444)


def partitions(disk: Path) -> list[dict]:
    out = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]["partitions"]


def esp_file(disk: Path, path: str) -> bytes:
    esp = partitions(disk)[0]
    return subprocess.run(["mtype", "-i", f"{disk}@@{esp['start'] * 512}", f"::{path}"], capture_output=True,
                          check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout


def data_debugfs(disk: Path, command: str) -> str:
    data = partitions(disk)[1]
    return subprocess.run(["debugfs", "-R", command, f"{disk}?offset={data['start'] * 512}"], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.skipif(not have("setpriv"), reason="needs setpriv (util-linux)")
def test_disk_unprivileged_reproducible_and_laid_out(release, boot_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    open_to_all(release, boot_dir, out)
    os.chmod(out, 0o777)
    rel = json.loads((release / "release.json").read_text())
    disks = []
    for name in ("a.raw", "b.raw"):
        r = as_user(["disk", str(release), "-o", str(out / name), "--boot", str(boot_dir), "--json"], out)
        assert r.returncode == 0, r.stderr.decode()
        disks.append(out / name)
        info = json.loads(r.stdout)
    assert disks[0].stat().st_uid != 0 or not is_root()          # made by the unprivileged user
    assert disks[0].read_bytes() == disks[1].read_bytes()
    # GPT: the ESP and the data partition with the DPS root type of x86-64, the UUIDs it reported
    esp, data = partitions(disks[0])
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" and esp["name"] == "esp"
    assert data["type"] == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" and data["name"] == "bootimg-data"
    assert data["uuid"].lower() == info["data_partuuid"]
    # the ESP: systemd-boot at the removable-media path, loader.conf, the release's Type #1 entry
    assert esp_file(disks[0], "/EFI/BOOT/BOOTX64.EFI") == Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").read_bytes()
    conf = esp_file(disks[0], "/loader/loader.conf").decode()
    assert "editor no" in conf and "default bootimg-disktest-*" in conf
    entry = esp_file(disks[0], "/loader/entries/bootimg-disktest-2.0.conf").decode().splitlines()
    options = next(line for line in entry if line.startswith("options ")).split()[1:]
    assert options == [f"root=PARTUUID={info['data_partuuid']}", "rw", rel["root"]["kernel_argument"],
                       "bootimg.release=/bootimg/releases/2.0", "bootimg.security_version=0",
                       "console=ttyS0,115200", "quiet"]
    assert "linux /bootimg/disktest/2.0/vmlinuz" in entry and "initrd /bootimg/disktest/2.0/initrd.img" in entry
    assert esp_file(disks[0], "/bootimg/disktest/2.0/initrd.img") == (boot_dir / "initrd.img").read_bytes()
    # the data partition: the release beside the shared object store, owned by root; /var from the root image
    assert data_debugfs(disks[0], "cat /bootimg/releases/2.0/release.json") == (release / "release.json").read_text()
    objects = sorted(str(p.relative_to(release / "objects")) for p in (release / "objects").rglob("*") if p.is_file())
    listed = data_debugfs(disks[0], f"ls -p /bootimg/objects/{objects[0].split('/')[0]}")
    assert objects and objects[0].split("/")[1] in listed
    assert "objects" not in data_debugfs(disks[0], "ls -p /bootimg/releases/2.0")
    root_img = data_debugfs(disks[0], "stat /bootimg/releases/2.0/images/root.cfs")
    assert "User:     0   Group:     0" in root_img
    state = data_debugfs(disks[0], "stat /bootimg/state/var/lib/app/state")
    assert "User:   105   Group:   106" in state
    assert data_debugfs(disks[0], "cat /bootimg/state/var/lib/app/state") == "persistent state\n"
    assert "security.capability (20)" in data_debugfs(disks[0], "ea_list /bootimg/state/var/lib/app/state")
    # mke2fs from a tar keeps no other xattr: said, not hidden
    assert "xattrs of the root's /var are not carried" in r.stderr.decode()
    assert "/bootimg/state/var/lib/app/state (user.test)" in r.stderr.decode()
    assert "Filesystem features:" in (feat := data_debugfs(disks[0], "stats")) and "verity" in feat
    dumped = tmp_path / "root.cfs"
    subprocess.run(["debugfs", "-R", f"dump /bootimg/releases/2.0/images/root.cfs {dumped}",
                    f"{disks[0]}?offset={data['start'] * 512}"], capture_output=True, check=True)
    assert fsverity.digest(dumped.read_bytes()).hex() == rel["root"]["digest"]


@pytest.mark.skipif(not have("qemu-img"), reason="needs qemu-img")
def test_qcow2_is_reproducible_and_holds_the_raw_disk(release, boot_dir, tmp_path):
    for name in ("a.qcow2", "b.qcow2"):
        r = run_cli("disk", str(release), "-o", str(tmp_path / name), "--boot", str(boot_dir), "--format", "qcow2")
        assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "a.qcow2").read_bytes() == (tmp_path / "b.qcow2").read_bytes()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(tmp_path / "a.qcow2")],
                                     capture_output=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert run_cli("disk", str(release), "-o", str(tmp_path / "c.raw"), "--boot", str(boot_dir)).returncode == 0
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "a.qcow2"), str(tmp_path / "back.raw")],
                   check=True)
    assert (tmp_path / "back.raw").read_bytes() == (tmp_path / "c.raw").read_bytes()


def test_refusals_are_one_line_and_touch_nothing(release, boot_dir, tmp_path):
    existing = tmp_path / "mine.img"
    existing.write_bytes(b"precious")
    r = run_cli("disk", str(release), "-o", str(existing), "--boot", str(boot_dir))
    assert r.returncode == 1 and existing.read_bytes() == b"precious"
    assert r.stderr.decode().strip() == f"bootimg disk: {existing}: already exists (use --force to replace it)"
    folder = tmp_path / "folder"
    folder.mkdir()
    r = run_cli("disk", str(release), "-o", str(folder), "--boot", str(boot_dir), "--force")
    assert r.returncode == 1 and "is not a regular file; refusing to replace it" in r.stderr.decode()
    r = run_cli("disk", str(release), "-o", str(tmp_path / "small.img"), "--boot", str(boot_dir), "--size", "64M")
    errors = [line for line in r.stderr.decode().splitlines() if not line.startswith("bootimg: note:")]
    assert r.returncode == 1 and errors == ["bootimg disk: --size 64 MiB is too small: the release needs 195 MiB"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "mine.img"]     # nothing left behind
    r = run_cli("disk", str(tmp_path / "nope"), "-o", str(tmp_path / "x.img"), "--boot", str(boot_dir))
    assert r.returncode == 1 and "release.json: cannot read" in r.stderr.decode() and b"Traceback" not in r.stderr
    r = run_cli("disk", str(release), "-o", str(tmp_path / "x.img"), "--boot", str(tmp_path))
    assert r.returncode == 1 and "not a kernel + initramfs directory" in r.stderr.decode()
    r = run_cli("disk", str(release), "-o", str(tmp_path / "x.img"), "--boot", str(boot_dir), "--size", "lots")
    assert r.returncode == 1 and "bad size 'lots'" in r.stderr.decode()


@pytest.mark.skipif(not (have("objdump") and have("sbverify") and have("openssl")), reason="needs binutils, sbsigntool")
def test_uki_carries_the_sealed_command_line_and_is_signed(release, boot_dir, tmp_path):
    key, cert = tmp_path / "db.key", tmp_path / "db.crt"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                    "-subj", "/CN=bootimg test db/", "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True)
    disk = tmp_path / "uki.raw"
    r = run_cli("disk", str(release), "-o", str(disk), "--boot", str(boot_dir), "--uki",
                "--secureboot-key", str(key), "--secureboot-cert", str(cert), "--json")
    assert r.returncode == 0, r.stderr.decode()
    uki = tmp_path / "uki.efi"
    uki.write_bytes(esp_file(disk, "/EFI/Linux/bootimg-disktest-2.0.efi"))
    sections = subprocess.run(["objdump", "-h", str(uki)], capture_output=True, text=True, check=True).stdout
    for name in (".osrel", ".cmdline", ".linux", ".initrd"):
        assert name in sections, sections
    section = tmp_path / "cmdline"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.cmdline", str(uki), str(section)], check=True)
    rel = json.loads((release / "release.json").read_text())
    assert rel["root"]["kernel_argument"].encode() in section.read_bytes()
    assert subprocess.run(["sbverify", "--cert", str(cert), str(uki)], capture_output=True).returncode == 0
    sd_boot = tmp_path / "BOOTX64.EFI"
    sd_boot.write_bytes(esp_file(disk, "/EFI/BOOT/BOOTX64.EFI"))
    assert subprocess.run(["sbverify", "--cert", str(cert), str(sd_boot)], capture_output=True).returncode == 0
    # signing needs a UKI
    r = run_cli("disk", str(release), "-o", str(tmp_path / "y.raw"), "--boot", str(boot_dir),
                "--secureboot-key", str(key), "--secureboot-cert", str(cert))
    assert r.returncode == 1 and "Secure Boot signing is for a UKI: add --uki" in r.stderr.decode()


@pytest.mark.skipif(not is_root(), reason="owners and device nodes need root")
def test_write_dir_keeps_what_a_tar_would_carry(tmp_path):
    """fs.write_dir (the data partition's tree for osbuild's cp -a): every kind of entry, with
    owners, modes, xattrs (security.capability survives the chown) and times."""
    from bootimg.disk import fs

    src = tmp_path / "src"
    src.write_bytes(b"from a host file\n")
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    entries = [
        fs.Entry("top", "dir", 0o750, 7, 8, mtime=1000),
        fs.Entry("top/data", "file", 0o4755, 105, 106, mtime=2000, data=b"in memory\n",
                 xattrs={"security.capability": cap, "user.note": b"kept"}),
        fs.Entry("top/host", "file", 0o600, 0, 0, mtime=3000, source=src),
        fs.Entry("top/link", "symlink", 0o777, 5, 5, mtime=4000, target="data"),
        fs.Entry("top/hard", "hardlink", target="top/data"),
        fs.Entry("top/fifo", "fifo", 0o640, 0, 0, mtime=5000),
        fs.Entry("top/null", "chr", 0o666, 0, 0, mtime=6000, rdev=os.makedev(1, 3)),
    ]
    dest = tmp_path / "dest"
    dest.mkdir()
    assert fs.write_dir(entries, dest) == (len(b"in memory\n") + len(b"from a host file\n"), len(entries))
    top = dest / "top"
    st = top.lstat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, st.st_mtime) == ("0o750", 7, 8, 1000)
    data = (top / "data").lstat()
    assert (oct(data.st_mode & 0o7777), data.st_uid, data.st_gid, data.st_mtime, data.st_nlink) == \
        ("0o4755", 105, 106, 2000, 2)
    assert os.getxattr(top / "data", "security.capability") == cap and os.getxattr(top / "data", "user.note") == b"kept"
    assert (top / "host").read_bytes() == b"from a host file\n" and (top / "host").stat().st_mode & 0o777 == 0o600
    assert os.readlink(top / "link") == "data" and (top / "link").lstat().st_uid == 5
    assert (top / "hard").stat().st_ino == data.st_ino
    assert stat_kind(top / "fifo") == "fifo" and (top / "null").lstat().st_rdev == os.makedev(1, 3)
    with pytest.raises(FileExistsError):      # never over what is there
        fs.write_dir([fs.Entry("top/data", "file", data=b"x")], dest)


def stat_kind(path: Path) -> str:
    import stat

    mode = path.lstat().st_mode
    return "fifo" if stat.S_ISFIFO(mode) else "chr" if stat.S_ISCHR(mode) else "other"
