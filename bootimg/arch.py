"""CPU architectures a bootimg system can be built for, and how to tell which one a root is.

One table for every layer that depends on the target's architecture: the EFI file names on the
ESP, the Discoverable Partitions Specification's root partition type, the QEMU machine and its
UEFI firmware, and the compiler for code that runs on the target.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .errors import BootimgError

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
EM_AARCH64 = 183


@dataclass(frozen=True)
class Arch:
    name: str                 # Debian's name: amd64, arm64
    uname: str                # uname -m: x86_64, aarch64
    elf_machine: int
    efi: str                  # suffix of EFI file names: x64, aa64
    root_type: str            # DPS partition type GUID of this architecture's root
    qemu: str                 # qemu-system binary
    qemu_machine: tuple[str, ...]
    qemu_cpu: str             # -cpu under TCG (KVM takes the host's)
    console: str              # the serial console's device on that machine: ttyS0, ttyAMA0 (PL011)
    firmware_code: tuple[str, ...]   # UEFI firmware (read-only pflash), first that exists
    firmware_vars: tuple[str, ...]   # its variable store template, same order
    cc: str                   # a compiler producing code for it on a Debian host
    cc_package: str
    kernel_package: str       # Debian's generic kernel for it

    @property
    def native(self) -> bool:
        """Whether this host's CPU runs its programs (else qemu-user through binfmt_misc does)."""
        return self.uname == os.uname().machine

    @property
    def efi_boot_name(self) -> str:
        """The removable-media default loader path's file name (EFI/BOOT/BOOTX64.EFI)."""
        return f"BOOT{self.efi.upper()}.EFI"

    @property
    def systemd_boot(self) -> str:
        return f"systemd-boot{self.efi}.efi"

    @property
    def efi_stub(self) -> str:
        return f"linux{self.efi}.efi.stub"


# x86_64 under TCG: the CPUID hypervisor bit off, as on the ECU's bare metal. systemd-boot reads
# no TSC under a hypervisor (src/boot/efi/ticks.c), so with it on, the loader sets no
# LoaderTimeInitUSec/LoaderTimeExecUSec and the firmware and loader times cannot be measured.
X86_64 = Arch(
    name="amd64", uname="x86_64", elf_machine=EM_X86_64, efi="x64",
    root_type="4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
    qemu="qemu-system-x86_64", qemu_machine=("-machine", "q35"), qemu_cpu="max,hypervisor=off", console="ttyS0",
    firmware_code=("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd"),
    firmware_vars=("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    cc="x86_64-linux-gnu-gcc", cc_package="gcc-x86-64-linux-gnu", kernel_package="linux-image-amd64")

AARCH64 = Arch(
    name="arm64", uname="aarch64", elf_machine=EM_AARCH64, efi="aa64",
    root_type="b921b045-1df0-41c3-af44-4c6f280d3fae",
    # virt: PCIe (virtio-*-pci), PL011 serial, ACPI power button. pauth-impdef: QEMU emulates
    # pointer authentication with its implementation-defined algorithm instead of the
    # architected QARMA5, which is expensive under TCG (QEMU's advice for TCG; a guest only
    # needs PAC to work, not a particular algorithm).
    qemu="qemu-system-aarch64", qemu_machine=("-machine", "virt"), qemu_cpu="max,pauth-impdef=on",
    console="ttyAMA0",
    firmware_code=("/usr/share/AAVMF/AAVMF_CODE.fd",),
    firmware_vars=("/usr/share/AAVMF/AAVMF_VARS.fd",),
    cc="aarch64-linux-gnu-gcc", cc_package="gcc-aarch64-linux-gnu", kernel_package="linux-image-arm64")

ARCHES = {a.name: a for a in (X86_64, AARCH64)}
BY_ELF = {a.elf_machine: a for a in ARCHES.values()}
BY_UNAME = {a.uname: a for a in ARCHES.values()}


def by_name(name: str) -> Arch:
    """An architecture by its Debian name (amd64, arm64) or uname -m (x86_64, aarch64)."""
    arch = ARCHES.get(name) or BY_UNAME.get(name)
    if arch is None:
        raise BootimgError(f"unsupported architecture {name!r} (supported: {', '.join(ARCHES)})")
    return arch


def of_elf(header: bytes, *, file: str = "ELF file") -> Arch:
    """The architecture an ELF file is for, from its first 20 bytes."""
    if len(header) < 20 or header[:4] != ELF_MAGIC:
        raise BootimgError("not an ELF file", file=file)
    endian = "<" if header[5] == 1 else ">"
    (machine,) = struct.unpack_from(endian + "H", header, 18)
    arch = BY_ELF.get(machine)
    if arch is None:
        raise BootimgError(f"ELF machine {machine} is not a supported architecture", file=file)
    return arch
