"""The initramfs side of a release: the dracut module ``90bootimg``, generated into the root.

``contribute`` (one of the boot layer's ``ROOT_STEPS``) adds to the root tree, so that the root
digest covers them:

- ``/usr/lib/dracut/modules.d/90bootimg/``: ``module-setup.sh`` and ``bootimg-root.service``,
  from the templates in ``bootimg/boot/dracut/`` with the manifest's values substituted;
- ``/usr/lib/bootimg/boot.conf``: the program's configuration (``KEY=value`` lines), installed
  in the initramfs as ``/etc/bootimg/boot.conf``;
- ``/etc/dracut.conf.d/90-bootimg.conf``: ``add_dracutmodules+=" bootimg "``, so a plain
  ``dracut`` run inside the root includes the module.

``add_program`` (a tree hook: it reads the root to tell its architecture) adds
``/usr/libexec/bootimg/bootimg-setup-root``, the compiled program (``setup_root``) that does the
whole boot path: the root setup in the initramfs, provisioning (the updater's install step) and
the container image mounts of the units. ``module-setup.sh`` installs it and nothing else.

The trusted keys are already in the root (``/usr/lib/bootimg/keys/KEYID.pub``, release/build.py);
``module-setup.sh`` installs them as ``/etc/bootimg/keys/KEYID.pub``. Everything here is derived
from the manifest and the program's sources alone, so it is deterministic. The contract is
docs/boot-design.md. The paths are defined in ``bootimg.manifest.reserved``, whose list the
manifest checks hold ``add_files`` against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from ..composefs.tree import Node
from ..errors import BootimgError
from ..manifest.model import Initramfs, Manifest
from ..manifest.reserved import BOOT_CONF, DRACUT_CONF, DRACUT_DEPENDS, RELEASE_PATH, SETUP_ROOT
from ..manifest.reserved import DRACUT_MODULE as MODULE_NAME
from ..manifest.reserved import DRACUT_MODULE_DIR as MODULE_DIR
from ..release.build import BuildContext, InjectedFile
from ..sources import treeops
from . import partition, setup_root

# The data partition (boot/partition.py): releases side by side over one object store, and state.
RELEASES_PATH = partition.RELEASES                # RELEASES_PATH/<version>: bootimg.release= names one
OBJECTS_PATH = partition.OBJECTS                  # the fs-verity object store all releases share
STATE_PATH = partition.STATE                      # var/, .provisioned, rollback
ROLLBACK_FILE = partition.ROLLBACK_FILE           # the rollback minimum's copy on the partition (decimal)
ROLLBACK_NV = partition.ROLLBACK_NV_INDEX         # the rollback minimum's TPM 2.0 NV counter

# template name -> (mode in the root)
TEMPLATES = {
    "module-setup.sh": 0o755,
    "bootimg-root.service": 0o644,
}

# What module-setup.sh takes from the root into the initramfs, in one place: the template gets
# these lists through its placeholders, and the build's boot check (``preflight``) checks that
# the root has every one of them. The program needs no tool of the root's: nothing but libc.
# DRACUT_DEPENDS (bootimg.manifest.reserved): the dracut modules 90bootimg depends on.
KERNEL_MODULES = ("erofs", "overlay", "loop")     # built in or modules of the root's kernel
# The TPM's drivers, for the rollback counter: installed when the kernel has them as modules (a
# machine without a TPM boots without them), not required by the boot check.
OPTIONAL_KERNEL_MODULES = ("tpm_tis", "tpm_crb")
# What a QEMU board (virtio) and a generic PC need to reach the data partition: added to dracut's
# generic set of drivers when the manifest names no drivers of its own.
GENERIC_DRIVERS = ("virtio_blk", "virtio_pci", "virtio_scsi", "ext4")


@dataclass(frozen=True)
class Compressor:
    """An initramfs compressor (``boot.initramfs.compress``): what dracut runs in the root, the
    Debian package of it, the kernel's decompressor, and the command dracut compresses with when
    the manifest gives a level (dracut's own options but the level; xz keeps the kernel's CRC32
    check). The levels each takes are the manifest's (``limits.COMPRESS_LEVELS``)."""

    program: str
    package: str
    kernel_symbol: str
    command: str                # with {level}


COMPRESSORS = {
    "gzip": Compressor("gzip", "gzip", "CONFIG_RD_GZIP", "gzip -n -{level}"),
    "zstd": Compressor("zstd", "zstd", "CONFIG_RD_ZSTD", "zstd -{level} -q -T0"),
    "xz": Compressor("xz", "xz-utils", "CONFIG_RD_XZ", "xz --check=crc32 -{level} -T0"),
    "lz4": Compressor("lz4", "lz4", "CONFIG_RD_LZ4", "lz4 -l -{level}"),
}
_WORD = re.compile(r"[A-Za-z0-9._+-]+")
assert all(_WORD.fullmatch(w) for w in DRACUT_DEPENDS + KERNEL_MODULES + OPTIONAL_KERNEL_MODULES)

# The program reads no environment; these would change what the dynamic loader does to it.
UNSET_ENVIRONMENT = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT")
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")


def dracut_options(profile: Initramfs | None) -> list[str]:
    """dracut's options for the initramfs profile (``boot.initramfs``; None: dracut's generic
    initramfs plus GENERIC_DRIVERS). The profile's lists are dracut's exclusive ones, to which
    bootimg's boot path is always added: the ``bootimg`` module and the modules it depends on,
    and the EROFS, overlayfs, loop and TPM drivers (``--drivers`` skips a driver the kernel does
    not have, so a kernel without TPM drivers still builds)."""
    if profile is None:
        return ["--add-drivers", " ".join(GENERIC_DRIVERS)]
    argv: list[str] = []
    if profile.drivers is not None:
        argv += ["--drivers", " ".join(_unique((*profile.drivers, *KERNEL_MODULES, *OPTIONAL_KERNEL_MODULES)))]
    else:
        argv += ["--add-drivers", " ".join(GENERIC_DRIVERS)]
    if profile.modules is not None:
        argv += ["--modules", " ".join(_unique((*profile.modules, MODULE_NAME, *DRACUT_DEPENDS)))]
    if profile.omit:
        argv += ["--omit", " ".join(profile.omit)]
    if profile.compress is not None:
        level = profile.compress_level
        argv += ["--compress", profile.compress if level is None else COMPRESSORS[profile.compress].command.format(level=level)]
    return argv


def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def template(name: str) -> str:
    """The raw text of a template in bootimg/boot/dracut/."""
    return resources.files(__package__).joinpath("dracut", name).read_text(encoding="utf-8")


def failure_policy(manifest: Manifest) -> str:
    """The unit lines for boot.on_verification_failure."""
    policy = manifest.boot.on_verification_failure
    if policy == "reboot":
        # reboot-force, not reboot: a reboot *job* loses to the initrd's own
        # OnFailure=emergency.target (initrd-root-fs.target fails with this unit), which would
        # leave an emergency shell; reboot-force ends the manager's run directly.
        return "FailureAction=reboot-force"
    if policy == "emergency":
        return "OnFailure=emergency.target\nOnFailureJobMode=replace-irreversibly"
    raise BootimgError(f"unknown on_verification_failure policy {policy!r}")


def render(name: str, manifest: Manifest) -> str:
    values = {
        "TRUST": manifest.integrity.trust,
        "FAILURE_POLICY": failure_policy(manifest),
        "UNSET_ENVIRONMENT": " ".join(UNSET_ENVIRONMENT),
        "SETUP_ROOT": SETUP_ROOT,
        "DRACUT_DEPENDS": " ".join(DRACUT_DEPENDS),
        "KERNEL_MODULES": " ".join(KERNEL_MODULES),
        "OPTIONAL_KERNEL_MODULES": " ".join(OPTIONAL_KERNEL_MODULES),
    }
    text = _PLACEHOLDER.sub(lambda m: values.get(m.group(0)[1:-1], m.group(0)), template(name))
    left = _PLACEHOLDER.findall(text)
    if left:
        raise BootimgError(f"template {name} has unknown placeholders: {', '.join(sorted(set(left)))}")
    return text


def boot_conf(manifest: Manifest) -> str:
    i, b = manifest.integrity, manifest.boot
    return ("# bootimg boot configuration, generated by `bootimg build` (docs/boot-design.md).\n"
            "# Read by bootimg-setup-root in the initramfs, where it is /etc/bootimg/boot.conf.\n"
            f"BOOTIMG_TRUST={i.trust}\n"
            f"BOOTIMG_FSVERITY={i.fsverity}\n"
            f"BOOTIMG_ETC={b.etc}\n"
            f"BOOTIMG_VAR={b.var}\n"
            f"BOOTIMG_ON_FAILURE={b.on_verification_failure}\n"
            f"BOOTIMG_RELEASE={RELEASE_PATH}\n"
            f"BOOTIMG_STATE={STATE_PATH}\n"
            f"BOOTIMG_RELEASES={RELEASES_PATH}\n"
            f"BOOTIMG_OBJECTS={OBJECTS_PATH}\n"
            f"BOOTIMG_ROLLBACK_NV=0x{ROLLBACK_NV:08x}\n")


def dracut_conf() -> str:
    return ("# Include the bootimg module (verified composefs root) in every initramfs built here.\n"
            f'add_dracutmodules+=" {MODULE_NAME} "\n')


def initramfs_files(manifest: Manifest) -> list[InjectedFile]:
    """Every file this layer adds to the root tree."""
    files = [InjectedFile(f"{MODULE_DIR}/{name}", render(name, manifest).encode(), mode)
             for name, mode in TEMPLATES.items()]
    files.append(InjectedFile(BOOT_CONF, boot_conf(manifest).encode()))
    files.append(InjectedFile(DRACUT_CONF, dracut_conf().encode()))
    return files


def contribute(ctx: BuildContext) -> list[InjectedFile]:
    return initramfs_files(ctx.manifest)


def add_program(ctx: BuildContext, root: Node) -> None:
    """Put bootimg-setup-root, compiled for the root's architecture, into the root tree."""
    binary, _ = setup_root.for_root(setup_root.RootFiles(root, ctx.out.read_file),
                                    str(ctx.manifest.source_file or "manifest"))
    treeops.add_file(root, SETUP_ROOT, binary, 0o755, mtime=ctx.manifest.identity.source_date_epoch, store=ctx.store)
