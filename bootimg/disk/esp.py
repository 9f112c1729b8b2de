"""The EFI system partition: systemd-boot and one boot entry for the release.

Layout (Boot Loader Specification; systemd-boot reads it as is)::

    EFI/BOOT/BOOTX64.EFI                     systemd-boot, the removable-media default path
    EFI/systemd/systemd-bootx64.efi          systemd-boot
    loader/loader.conf                       timeout, default entry, no command-line editor
    loader/entries/ENTRY.conf                Type #1 entry: kernel, initramfs, command line (boot/loader.py)
    bootimg/NAME/VERSION/{vmlinuz,initrd.img}
    EFI/Linux/ENTRY.efi                      or, with a UKI, a Type #2 entry instead

The command line (``loader.kernel_cmdline``) holds the root partition (by PARTUUID),
``composefs.digest=`` (the root image's fs-verity digest), ``bootimg.release=``,
``bootimg.security_version=`` and the manifest's kernel_args. In a UKI the
command line is part of the signed image, which is what the ``sealed`` trust profile relies on.
The systemd-boot binary comes from the release's own root (``systemd-boot-efi``), else the host's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ..arch import Arch
from ..boot import loader
from ..composefs.tree import Node
from ..host import SETUP_HINT, HostError, need_tools, run
from ..release.layout import ReleaseDir
from .initramfs import BootFiles

BOOT_EFI_DIR = "/usr/lib/systemd/boot/efi"
ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")


def systemd_boot_binary(arch: Arch, release: ReleaseDir, root: Node, dest: Path) -> str:
    """Write systemd-boot for ``arch`` to ``dest``: the root's own, else the host's. Returns
    where it came from."""
    name = f"{BOOT_EFI_DIR}/{arch.systemd_boot}"
    node = root.lookup(name.lstrip("/").encode())
    data = release.read_file(node) if node is not None else None
    if data is not None:
        dest.write_bytes(data)
        return f"root:{name}"
    if os.path.isfile(name):
        shutil.copyfile(name, dest)
        return f"host:{name}"
    raise HostError(f"no systemd-boot for {arch.name}: neither the root nor this host has {name} "
                    f"(install systemd-boot-efi in the root, or on the host; {SETUP_HINT})")


def efi_stub(arch: Arch, release: ReleaseDir, root: Node, dest: Path) -> str:
    name = f"{BOOT_EFI_DIR}/{arch.efi_stub}"
    node = root.lookup(name.lstrip("/").encode())
    data = release.read_file(node) if node is not None else None
    if data is not None:
        dest.write_bytes(data)
        return f"root:{name}"
    if os.path.isfile(name):
        shutil.copyfile(name, dest)
        return f"host:{name}"
    raise HostError(f"no EFI stub for {arch.name} to make a UKI: neither the root nor this host has {name} "
                    f"(systemd-boot-efi); {SETUP_HINT}")


def _pe_end(stub: Path) -> int:
    """The first virtual address past the stub's last section (objdump -h), page aligned."""
    out = run(["objdump", "-h", str(stub)], what="objdump -h (EFI stub)", capture=True)
    end = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0].isdigit():
            size, vma = int(parts[2], 16), int(parts[3], 16)
            end = max(end, vma + size)
    if end == 0:
        raise HostError("cannot read the EFI stub's sections", file=str(stub))
    return (end + 0xFFF) & ~0xFFF


def make_uki(stub: Path, boot: BootFiles, cmdline: str, os_release: bytes, out: Path, work: Path) -> Path:
    """A Unified Kernel Image: the EFI stub with .osrel, .cmdline, .linux and .initrd sections
    (the layout systemd's stub reads; ukify does the same with more options)."""
    need_tools("objcopy", "objdump")
    work.mkdir(parents=True, exist_ok=True)
    (work / "cmdline").write_bytes(cmdline.encode() + b"\0")
    (work / "osrel").write_bytes(os_release)
    sections = [(".osrel", work / "osrel"), (".cmdline", work / "cmdline"),
                (".linux", boot.kernel), (".initrd", boot.initrd)]
    vma = _pe_end(stub)
    argv = ["objcopy"]
    for name, path in sections:
        argv += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={vma:#x}"]
        vma = (vma + os.path.getsize(path) + 0xFFF) & ~0xFFF
    run([*argv, str(stub), str(out)], what="objcopy (UKI)")
    return out


def sbsign(image: Path, key: Path, cert: Path) -> None:
    """Sign a PE image for Secure Boot in place (sbsign), then check it with sbverify."""
    need_tools("sbsign", "sbverify")
    signed = image.with_name(image.name + ".signed")
    run(["sbsign", "--key", str(key), "--cert", str(cert), "--output", str(signed), str(image)],
        what=f"sbsign {image.name}")
    proc = subprocess.run(["sbverify", "--cert", str(cert), str(signed)], capture_output=True, text=True)
    if proc.returncode != 0:
        signed.unlink(missing_ok=True)
        raise HostError(f"sbverify refuses the signed {image.name}: {(proc.stderr or proc.stdout).strip()}")
    os.replace(signed, image)


def write_tree(tree: Path, work: Path, rel: ReleaseDir, release: dict, root: Node, arch: Arch, boot: BootFiles,
               cmdline: str, *, uki: bool = False, secureboot_key: Path | None = None,
               secureboot_cert: Path | None = None) -> tuple[str, int]:
    """The ESP's files in the new directory ``tree`` (``work`` for scratch files): systemd-boot,
    loader.conf and the release's entry (Type #1 with kernel + initramfs, or a UKI, signed with
    the Secure Boot key when given). Returns where systemd-boot came from and the bytes the
    entry's payload takes."""
    (tree / "EFI/BOOT").mkdir(parents=True)
    (tree / "EFI/systemd").mkdir()
    (tree / "loader/entries").mkdir(parents=True)
    sd_boot = tree / "EFI/systemd" / arch.systemd_boot
    sd_boot_from = systemd_boot_binary(arch, rel, root, sd_boot)
    (tree / "EFI/BOOT" / arch.efi_boot_name).write_bytes(sd_boot.read_bytes())
    (tree / loader.LOADER_CONF).write_text(loader.loader_conf(release["name"]))
    eid = loader.entry_id(release["name"], release["version"])
    if uki:
        (tree / "EFI/Linux").mkdir()
        stub = work / "stub.efi"
        efi_stub(arch, rel, root, stub)
        os_release = rel.read_file(root.lookup(b"usr/lib/os-release") or root.lookup(b"etc/os-release") or Node())
        image = tree / "EFI/Linux" / f"{eid}.efi"
        make_uki(stub, boot, cmdline, os_release or b"", image, work / "uki")
        if secureboot_key is not None:
            for signed in (image, sd_boot, tree / "EFI/BOOT" / arch.efi_boot_name):
                sbsign(signed, secureboot_key, secureboot_cert)
        return sd_boot_from, image.stat().st_size
    kdir = tree / loader.kernel_dir(release["name"], release["version"])
    kdir.mkdir(parents=True)
    (kdir / "vmlinuz").write_bytes(boot.kernel.read_bytes())
    (kdir / "initrd.img").write_bytes(boot.initrd.read_bytes())
    # The factory image's release is good from the start: no boot counter.
    (tree / loader.ENTRIES_DIR / loader.EntryName(eid).filename).write_text(loader.type1_entry(release, cmdline))
    return sd_boot_from, boot.kernel.stat().st_size + boot.initrd.stat().st_size
