"""A QEMU "board" that boots what bootimg builds, for real: a Debian bookworm root with systemd,
a Debian 6.12 kernel (fs-verity, EROFS, overlayfs data-only layers) and a dracut initramfs.

Layers, each usable alone:

* ``rootfs``    debootstrap + customisation -> cached ``rootfs-<key>.tar.zst``
* ``initramfs`` dracut inside the plain root (+ extra dracut modules) -> the baseline's initrd
* ``disk``      ``mkfs.ext4 -d`` raw image of a plain root (the baseline)
* ``board``     ``prepare()`` and ``boot_baseline()`` on top of them (QEMU: ``bootimg.vm``)
* ``system``    ``manifests/board.yaml`` through the general path (build, initramfs, disk), with
                its provisioned disk cached for the tests
* ``diskedit``  offline edits of a disk's data partition (the tests' attacker)

Releases boot the general way (``bootimg disk``, ``bootimg qemu``); this package only holds what
the test rig adds: the debootstrapped root and its plain baseline.

The cache lives in ``$BOOTIMG_CACHE/board`` (default ``/var/cache/bootimg/board``).
"""

from ..host import HostError, cache_dir
from ..vm.qemu import BootResult, Machine, check_qemu, qemu_version
from .board import BOARD_MARKER, BaselineRun, Board, baseline_cmdline, boot, boot_baseline, prepare
from .disk import LABEL, DiskImage, make_disk
from .initramfs import DEFAULT_DRIVERS, BootFiles, build_initramfs
from .rootfs import MARKER, POWEROFF_ARG, Rootfs, RootfsSpec, build_rootfs, extract_rootfs

__all__ = [
    "BaselineRun", "Board", "HostError", "BootFiles", "BootResult", "DEFAULT_DRIVERS", "DiskImage",
    "BOARD_MARKER", "LABEL", "MARKER", "Machine", "POWEROFF_ARG", "Rootfs", "RootfsSpec", "baseline_cmdline", "boot",
    "boot_baseline", "build_initramfs", "build_rootfs", "cache_dir", "check_qemu", "extract_rootfs",
    "make_disk", "prepare", "qemu_version",
]
