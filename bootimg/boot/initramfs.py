"""The initramfs side of a release: the dracut module ``90bootimg``, generated into the root.

``contribute`` (one of the boot layer's ``ROOT_STEPS``) adds to the root tree, so that the root
digest covers them:

- ``/usr/lib/dracut/modules.d/90bootimg/``: ``module-setup.sh``, ``bootimg-root.service``,
  ``bootimg-root.sh`` (the hook) and ``bootimg-provision.sh``, from the templates in
  ``bootimg/boot/dracut/`` with the manifest's values substituted;
- ``/usr/lib/bootimg/boot.conf``: the hook's configuration (shell-sourceable ``KEY=value``),
  installed in the initramfs as ``/etc/bootimg/boot.conf``;
- ``/etc/dracut.conf.d/90-bootimg.conf``: ``add_dracutmodules+=" bootimg "``, so a plain
  ``dracut`` run inside the root includes the module;
- ``/usr/libexec/bootimg/bootimg-provision``: the same provisioning script, for the updater
  (on a production ECU enabling fs-verity on a new release is an install step);

The trusted keys are already in the root (``/usr/lib/bootimg/keys/KEYID.pub``, release/build.py);
``module-setup.sh`` installs them as ``/etc/bootimg/keys/KEYID.pub``. Everything here is plain
text derived from the manifest alone, so it is deterministic. The contract is
docs/boot-design.md. The paths are defined in ``bootimg.manifest.reserved``, whose list the
manifest checks hold ``add_files`` against.
"""

from __future__ import annotations

import re
from importlib import resources

from ..errors import BootimgError
from ..manifest.model import Manifest
from ..manifest.reserved import BOOT_CONF, DRACUT_CONF, PROVISION_IN_ROOT, RELEASE_PATH
from ..manifest.reserved import DRACUT_MODULE_DIR as MODULE_DIR
from ..release.build import BuildContext, InjectedFile

MODULE_NAME = "bootimg"
STATE_PATH = "/bootimg/state"

# template name -> (mode in the root)
TEMPLATES = {
    "module-setup.sh": 0o755,
    "bootimg-root.service": 0o644,
    "bootimg-root.sh": 0o755,
    "bootimg-provision.sh": 0o755,
}

# What module-setup.sh takes from the root into the initramfs, in one place: the template gets
# these lists through its placeholders, and the build's preflight (``preflight``) checks that the
# root has every one of them.
DRACUT_DEPENDS = ("systemd",)                     # dracut modules 90bootimg depends on
KERNEL_MODULES = ("erofs", "overlay", "loop")     # built in or modules of the root's kernel
HOOK_TOOLS = ("cat", "sed", "mkdir", "rm", "mount", "umount", "losetup", "fsverity")
SIGNED_TOOLS = ("minisign",)                      # trust profile "signed" only
_WORD = re.compile(r"[A-Za-z0-9._+-]+")
assert all(_WORD.fullmatch(w) for w in DRACUT_DEPENDS + KERNEL_MODULES + HOOK_TOOLS + SIGNED_TOOLS)

# Besides the hook's own parameters, variables that would change what the hook's tools do.
_UNSET_ALSO = ("LD_PRELOAD", "LD_LIBRARY_PATH")
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_ENV_PARAM = re.compile(r"\$\{(BOOTIMG_[A-Z_]+):-")


def template(name: str) -> str:
    """The raw text of a template in bootimg/boot/dracut/."""
    return resources.files(__package__).joinpath("dracut", name).read_text(encoding="utf-8")


def hook_parameters() -> list[str]:
    """The environment variables the hook and the provisioning script read (test harness only;
    the unit unsets them all)."""
    names = set()
    for name in ("bootimg-root.sh", "bootimg-provision.sh"):
        names.update(_ENV_PARAM.findall(template(name)))
    return sorted(names)


def hook_tools(trust: str) -> tuple[str, ...]:
    """The programs the initramfs needs from the root for trust profile ``trust``."""
    return HOOK_TOOLS + (SIGNED_TOOLS if trust == "signed" else ())


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
        "UNSET_ENVIRONMENT": " ".join(hook_parameters() + list(_UNSET_ALSO)),
        "DRACUT_DEPENDS": " ".join(DRACUT_DEPENDS),
        "KERNEL_MODULES": " ".join(KERNEL_MODULES),
        "HOOK_TOOLS": " ".join(HOOK_TOOLS),
        "SIGNED_TOOLS": " ".join(SIGNED_TOOLS),
    }
    text = _PLACEHOLDER.sub(lambda m: values.get(m.group(0)[1:-1], m.group(0)), template(name))
    left = _PLACEHOLDER.findall(text)
    if left:
        raise BootimgError(f"template {name} has unknown placeholders: {', '.join(sorted(set(left)))}")
    return text


def boot_conf(manifest: Manifest) -> str:
    i, b = manifest.integrity, manifest.boot
    return ("# bootimg boot configuration, generated by `bootimg build` (docs/boot-design.md).\n"
            "# Read by bootimg-root in the initramfs, where it is /etc/bootimg/boot.conf.\n"
            f"BOOTIMG_TRUST={i.trust}\n"
            f"BOOTIMG_FSVERITY={i.fsverity}\n"
            f"BOOTIMG_ETC={b.etc}\n"
            f"BOOTIMG_VAR={b.var}\n"
            f"BOOTIMG_ON_FAILURE={b.on_verification_failure}\n"
            f"BOOTIMG_RELEASE={RELEASE_PATH}\n"
            f"BOOTIMG_STATE={STATE_PATH}\n")


def dracut_conf() -> str:
    return ("# Include the bootimg module (verified composefs root) in every initramfs built here.\n"
            f'add_dracutmodules+=" {MODULE_NAME} "\n')


def initramfs_files(manifest: Manifest) -> list[InjectedFile]:
    """Every file this layer adds to the root tree."""
    files = [InjectedFile(f"{MODULE_DIR}/{name}", render(name, manifest).encode(), mode)
             for name, mode in TEMPLATES.items()]
    files.append(InjectedFile(BOOT_CONF, boot_conf(manifest).encode()))
    files.append(InjectedFile(DRACUT_CONF, dracut_conf().encode()))
    files.append(InjectedFile(PROVISION_IN_ROOT, render("bootimg-provision.sh", manifest).encode(), 0o755))
    return files


def contribute(ctx: BuildContext) -> list[InjectedFile]:
    return initramfs_files(ctx.manifest)
