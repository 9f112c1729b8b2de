"""A QEMU "board" that boots what bootimg builds, for real: a Debian bookworm root with systemd,
a Debian 6.12 kernel (fs-verity, EROFS, overlayfs data-only layers) and a dracut initramfs.

Layers, each usable alone:

* ``rootfs``    debootstrap + customisation -> cached ``rootfs-<key>.tar.zst``
* ``initramfs`` dracut inside the root (+ extra dracut modules) -> cached kernel + initrd
* ``disk``      ``mkfs.ext4 -d`` raw image, the tree at the top or under a subdirectory + extras
* ``qemu``      ``boot()``: TCG QEMU, serial console watched for marker / panic / emergency
* ``board``     ``prepare()`` and ``boot_baseline()`` on top of them

The cache lives in ``$BOOTIMG_CACHE/board`` (default ``/var/cache/bootimg/board``).
"""

from ..host import HostError, cache_dir
from .board import BaselineRun, Board, boot_baseline, prepare
from .disk import LABEL, DiskImage, make_disk
from .initramfs import DEFAULT_DRIVERS, BootFiles, build_initramfs
from .qemu import BootResult, baseline_cmdline, boot, check_qemu, qemu_version
from .rootfs import MARKER, POWEROFF_ARG, Rootfs, RootfsSpec, build_rootfs, extract_rootfs

__all__ = [
    "BaselineRun", "Board", "HostError", "BootFiles", "BootResult", "DEFAULT_DRIVERS", "DiskImage",
    "LABEL", "MARKER", "POWEROFF_ARG", "Rootfs", "RootfsSpec", "baseline_cmdline", "boot",
    "boot_baseline", "build_initramfs", "build_rootfs", "cache_dir", "check_qemu", "extract_rootfs",
    "make_disk", "prepare", "qemu_version",
]
