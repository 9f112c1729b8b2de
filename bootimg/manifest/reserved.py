"""What bootimg itself names and writes: the names and root paths a manifest cannot claim.

The one list of them. The build takes its names from here (release/layout.py,
release/build.py, boot/initramfs.py, boot/units.py and boot/security.py import these
constants), and the manifest checks refuse a container whose name, or an ``add_files``
path, would collide with one: a container called ``root`` would overwrite
``images/root.cfs``, one called ``dbus`` would replace the system's ``dbus.service``, a file
added at ``/usr/lib/bootimg/containers.json`` would be silently replaced by the build's own.
tests/test_release.py builds the example and checks every path the build injected into
the root is covered by :func:`root_paths`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

# -- the release directory ------------------------------------------------------------------------

ROOT_IMAGE_NAME = "root"  # images/root.cfs; containers are images/NAME.cfs

# -- the kernel command line ----------------------------------------------------------------------

# The root's argument, in the self-describing form composefs-rs and bootc read: EROFS format v1,
# fs-verity with SHA-256 and 2^12-byte blocks, then the digest in hex.
KERNEL_DIGEST_PREFIX = "composefs.digest=v1-sha256-12:"
# Arguments the build derives from the image digests; a manifest's value would fight them.
DERIVED_KERNEL_ARGS = ("composefs", "composefs.digest", "bootimg.release", "bootimg.security_version")
RELEASE_PATH = "/bootimg/release"  # on the data partition; bootimg.release= overrides it
RELEASES_PATH = "/bootimg/releases"  # releases side by side (boot/partition.py)

# -- inside the root image ------------------------------------------------------------------------

ROOT_DATA_DIR = "/usr/lib/bootimg"
ROOT_CONTAINERS_JSON = f"{ROOT_DATA_DIR}/containers.json"
ROOT_KEYS_DIR = f"{ROOT_DATA_DIR}/keys"
BOOT_CONF = f"{ROOT_DATA_DIR}/boot.conf"
LIBEXEC_DIR = "/usr/libexec/bootimg"
SETUP_ROOT = f"{LIBEXEC_DIR}/bootimg-setup-root"      # the boot path's one program
DRACUT_MODULE_DIR = "/usr/lib/dracut/modules.d/90bootimg"
DRACUT_CONF = "/etc/dracut.conf.d/90-bootimg.conf"
DRACUT_MODULE = "bootimg"                             # the dracut module in DRACUT_MODULE_DIR
DRACUT_DEPENDS = ("systemd",)                         # the dracut modules it depends on
UNIT_DIR = "/usr/lib/systemd/system"
QUADLET_DIR = "/usr/share/containers/systemd"
SYSUSERS_FILE = "/usr/lib/sysusers.d/bootimg-containers.conf"
CONTAINERS_TARGET = "bootimg-containers.target"
DROPIN_NAME = "50-bootimg.conf"
PHASE_TARGETS = {"early": "sysinit.target", "basic": "basic.target"}
WANTS_TARGETS = ("multi-user.target", *PHASE_TARGETS.values())  # targets bootimg adds a drop-in to
SYSROOT = "/sysroot"  # an empty directory: the physical root is mounted there at boot
# A root with containers gets an empty /tmp (1777) when its source has none (a tmpfs is mounted
# there at boot); it never replaces anything, so it is no path a manifest cannot claim.
TMP_DIR = "/tmp"
ESP_MOUNT = "/efi"    # an empty directory: systemd's gpt-auto generator mounts the ESP there
BLESS_UNIT = "bootimg-bless.service"
BLESS_TIMER = "bootimg-bless.timer"      # starts the assessment once the good boot's units have settled
ASSESS_UNIT = "bootimg-assess.service"   # required by boot-complete.target: the units are up, never restarted
ASSESS_PROGRAM = f"{LIBEXEC_DIR}/bootimg-assess"
# systemd-boot's boot counting variable: set when the booted entry is being counted.
BOOT_COUNT_VAR = "/sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
# Masked (a symlink to /dev/null): it would start systemd-bless-boot.service, and with it the
# assessment, in the boot transaction itself, before the containers had time to fail.
BLESS_GENERATOR_MASK = "/etc/systemd/system-generators/systemd-bless-boot-generator"
ASSESSMENT_DROPINS = ("boot-complete.target", "multi-user.target", "systemd-bless-boot.service")
ASSESSMENT_DROPIN_NAME = "60-bootimg-assessment.conf"

# Where systemd (system manager) and podman's quadlet generator look for units in a root image.
UNIT_SEARCH_DIRS = ("/etc/systemd/system", "/usr/local/lib/systemd/system", UNIT_DIR, "/lib/systemd/system")
QUADLET_SEARCH_DIRS = ("/etc/containers/systemd", QUADLET_DIR)
UNIT_SUFFIXES = ("service", "socket", "target", "mount", "automount", "swap", "path", "timer", "device",
                 "slice", "scope")
QUADLET_SERVICE_SUFFIXES = ("container", "kube")  # the quadlet files that become NAME.service


def image_unit(name: str) -> str:
    return f"bootimg-image-{name}.service"


def service_unit(name: str) -> str:
    return f"{name}.service"


def quadlet_file(name: str) -> str:
    return f"{QUADLET_DIR}/{name}.container"


@dataclass(frozen=True)
class ReservedPath:
    """A path bootimg writes in the root: one file, or (``tree``) a directory that is all bootimg's."""

    path: str
    what: str  # what bootimg puts there, for messages
    tree: bool = False

    def covers(self, path: str) -> bool:
        return path == self.path or (self.tree and path.startswith(self.path + "/"))


def root_paths(container_names: Iterable[str] = ()) -> list[ReservedPath]:
    """Every path the build writes into the root image, for a manifest with these containers."""
    out = [
        ReservedPath(ROOT_DATA_DIR, "the containers' digests, the trusted keys and boot.conf", tree=True),
        ReservedPath(LIBEXEC_DIR, "bootimg-setup-root", tree=True),
        ReservedPath(DRACUT_MODULE_DIR, "the dracut module that verifies the root", tree=True),
        ReservedPath(DRACUT_CONF, "the dracut configuration that enables that module"),
        ReservedPath(SYSROOT, "an empty directory the physical root is mounted on at boot", tree=True),
        ReservedPath(f"{UNIT_DIR}/{CONTAINERS_TARGET}", "the target that starts the containers"),
        ReservedPath(SYSUSERS_FILE, "the containers' users"),
        ReservedPath(ESP_MOUNT, "an empty directory the ESP is mounted on (boot counting, updates)", tree=True),
        ReservedPath(f"{UNIT_DIR}/{BLESS_UNIT}", "the unit that raises the rollback minimum after a good boot"),
        ReservedPath(f"{UNIT_DIR}/{BLESS_TIMER}", "the timer that assesses the boot once its units have settled"),
        ReservedPath(f"{UNIT_DIR}/{ASSESS_UNIT}", "the unit that checks the units a good boot needs"),
        ReservedPath(BLESS_GENERATOR_MASK, "the mask of systemd-bless-boot-generator (bootimg starts the blessing)"),
    ]
    out += [ReservedPath(f"{UNIT_DIR}/{target}.d/{DROPIN_NAME}", f"the drop-in that makes {target} start containers")
            for target in WANTS_TARGETS]
    out += [ReservedPath(f"{UNIT_DIR}/{target}.d/{ASSESSMENT_DROPIN_NAME}", f"the boot assessment's drop-in for {target}")
            for target in ASSESSMENT_DROPINS]
    for name in container_names:
        out += [
            ReservedPath(f"{UNIT_DIR}/{service_unit(name)}", f"the unit of container '{name}'"),
            ReservedPath(f"{UNIT_DIR}/{image_unit(name)}", f"the image mount unit of container '{name}'"),
            ReservedPath(quadlet_file(name), f"the podman quadlet of container '{name}'"),
        ]
    return out


# -- container names --------------------------------------------------------------------------------

# Base names (without suffix) of system units a container's NAME.service would replace or shadow
# (only those a container name can spell): the units systemd 252 ships (Debian bookworm's systemd
# package; tests/test_manifest.py checks them against the installed one), the special units of
# systemd.special(7), and well-known services of the distributions a root is built from. A root
# source's own units are checked when inputs are (manifest/inputs.py).
SYSTEM_UNITS = frozenset("""
    basic bluetooth boot-complete console-getty cryptdisks cryptdisks-early cryptsetup cryptsetup-pre
    ctrl-alt-del debug-shell default dev-hugepages dev-mqueue emergency exit factory-reset final
    first-boot-complete getty getty-pre getty-static graphical halt hibernate hwclock hybrid-sleep initrd
    initrd-cleanup initrd-fs initrd-parse-etc initrd-root-device initrd-root-fs initrd-switch-root
    initrd-udevadm-cleanup-db initrd-usr-fs integritysetup integritysetup-pre kexec kmod kmod-static-nodes
    local-fs local-fs-pre machine machines multi-user network network-online network-pre nss-lookup
    nss-user-lookup paths poweroff printer procps quotaon rc rc-local reboot remote-cryptsetup remote-fs
    remote-fs-pre remote-veritysetup rescue rpcbind runlevel0 runlevel1 runlevel2 runlevel3 runlevel4
    runlevel5 runlevel6 shutdown sigpwr sleep slices smartcard sockets sound suspend suspend-then-hibernate
    swap sys-fs-fuse-connections sys-kernel-config sys-kernel-debug sys-kernel-tracing sysinit syslog
    system-update system-update-cleanup system-update-pre time-set time-sync timers tmp umount usb-gadget
    user var-lib-machines veritysetup veritysetup-pre x11-common
    dbus display-manager init kbrequest ldconfig soft-reboot system udev
    auditd chrony chronyd containerd cron crond dbus-broker docker networking podman podman-auto-update
    podman-restart polkit rsyslog ssh sshd
""".split())


def container_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a container's name (its image and units would collide), or None."""
    if name == ROOT_IMAGE_NAME:
        return f"container name '{name}' is reserved: the root image is images/{ROOT_IMAGE_NAME}.cfs"
    if name == "bootimg" or name.startswith("bootimg-"):
        return (f"container name '{name}' is reserved: bootimg names its own units bootimg-* "
                f"({image_unit('NAME')}, {CONTAINERS_TARGET})")
    if name.startswith("systemd-"):
        return f"container name '{name}' is reserved: systemd-* units are systemd's own"
    if name in SYSTEM_UNITS:
        return (f"container name '{name}' is reserved: it names a system unit ({name}.*), which the "
                f"container's {service_unit(name)} would replace or shadow")
    return None
