"""The initramfs side of a release (dracut module 90bootimg and bootimg-setup-root), run for real.

Releases are built with `bootimg build` from the example manifests; the module's files are taken
out of the built root image (what the root digest covers), assembled into an "initramfs"
directory by running module-setup.sh's own install() with copying stubs, and the program then
runs against a temporary physical root: a tmpfs mounted inside a private mount namespace
(`unshare -m`), so every mount and loop device goes away with the namespace, even on failure.

This host's kernel has EROFS, overlayfs and loop but no fs-verity, so the runs use the program's
TEST build (compile-time hooks: its paths from BOOTIMG_* variables, and an fs-verity simulation,
BOOTIMG_TEST_VERITY=enabled|track|none|term, that "measures" with the program's own user-space
digest, checked here against fsverity-utils), built under AddressSanitizer and UBSan. The
overlay is really mounted with verity=require, which shows: reading a file stored in the object
store gives EIO, because the objects have no fs-verity. The release build in the root image is
the same source without the hooks (test_setup_root_build.py checks that it has none).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, have, is_root, run_cli

from bootimg.boot import initramfs, setup_root
from bootimg.composefs import fsverity
from bootimg.composefs.reader import load_image
from bootimg.manifest import load_manifest
from bootimg.release.description import canonical_json
from bootimg.signing import PublicKey, SecretKey, generate_keypair, make_trusted_comment, sign

sys.path.insert(0, str(REPO / "tools"))
import example_inputs  # noqa: E402

MODULE_DIR = initramfs.MODULE_DIR
UNIT_DIR = "/usr/lib/systemd/system"
PROGRAM = initramfs.SETUP_ROOT
# The program's own ways to mount: the kernel's newest (file-backed EROFS, fsconfig with
# lowerdir+/datadir+) and the fallbacks older kernels take (loop device, mount(2) options).
MOUNT_PATHS = [pytest.param({}, id="fsmount"),
               pytest.param({"BOOTIMG_TEST_EROFS": "loop", "BOOTIMG_TEST_OVERLAY": "mount"}, id="loop-mount2")]


def kernel_test(fn):
    """Runs the program with real mounts: root and unshare(1)."""
    for mark in (pytest.mark.kernel,
                 pytest.mark.skipif(not is_root(), reason="needs root for kernel mounts"),
                 pytest.mark.skipif(not have("unshare"), reason="needs unshare")):
        fn = mark(fn)
    return fn


@pytest.fixture(scope="session")
def test_program() -> Path:
    """The TEST build (hooks) under ASan/UBSan."""
    return setup_root.build(variant="test-asan")


# Stubs of the dracut functions module-setup.sh calls: log every call; inst_simple and ln_r
# really install into $initdir (from $dracutsysrootdir), so the harness runs what install() put.
DRACUT_STUBS = r"""
inst_simple() {
    echo "inst_simple $*" >>"$LOG"
    src=$1                                   # $moddir/... is a full path; the rest is in the root
    [ -e "$src" ] || src=${dracutsysrootdir-}$1
    [ -e "$src" ] || return 1
    mkdir -p "$initdir$(dirname "$2")" && cp -p "$src" "$initdir$2"
}
inst_binary() {
    echo "inst_binary $*" >>"$LOG"
    [ -e "${dracutsysrootdir-}$1" ] || return 1
    mkdir -p "$initdir$(dirname "$1")" && cp -p "${dracutsysrootdir-}$1" "$initdir$1"
}
inst_multiple() { echo "inst_multiple $*" >>"$LOG"; }
instmods() { echo "instmods $*" >>"$LOG"; }
dfatal() { echo "dfatal $*" >>"$LOG"; }
ln_r() { echo "ln_r $*" >>"$LOG"; mkdir -p "$initdir$(dirname "$2")" && ln -sfn "$1" "$initdir$2"; }
dracut_module_included() { case " ${DRACUT_MODULES-base systemd} " in *" $1 "*) return 0;; esac; return 1; }
"""

HARNESS = r"""#!/bin/sh
# Runs inside `unshare -m --propagation private`: mount the physical root, run the program, probe.
T=$1
shift
if [ -n "${PHYS_EXT4:-}" ]; then
    mke2fs -q -t ext4 -d "$T/phys" "$T/phys.ext4" 256M || exit 90
    mount -o loop "$T/phys.ext4" "$T/sysroot" || exit 90
    stat -c '%d' "$T/sysroot" >"$T/out/phys-dev"
else
    mount -t tmpfs -o mode=0755 phys "$T/sysroot" || exit 90
    cp -a "$T/phys/." "$T/sysroot/" || exit 91
fi
if [ -n "${PHYS_RO:-}" ]; then mount -o remount,ro "$T/sysroot" || exit 92; fi
"$@" >"$T/out/stdout" 2>"$T/out/stderr"
echo $? >"$T/out/rc"
cat /proc/self/mountinfo >"$T/out/mountinfo"
if [ "$(cat "$T/out/rc")" = 0 ]; then
    S=$T/sysroot
    cat "$S/etc/os-release" >"$T/out/inline" 2>&1; echo $? >"$T/out/inline.rc"
    cat "$S/usr/bin/sh" >"$T/out/external" 2>"$T/out/external.err"; echo $? >"$T/out/external.rc"
    echo probe 2>/dev/null >"$S/etc/bootimg-probe"; echo $? >"$T/out/etc-write.rc"
    echo probe 2>/dev/null >"$S/var/bootimg-probe"; echo $? >"$T/out/var-write.rc"
    echo probe 2>/dev/null >"$S/tmp/bootimg-probe"; echo $? >"$T/out/tmp-write.rc"
    stat -c %a "$S/tmp" >"$T/out/tmp-mode" 2>&1
    cat "$S/etc/machine-id" >"$T/out/machine-id" 2>&1
    ls -a "$S/sysroot/bootimg" >"$T/out/physical" 2>&1
    cp -a "$S/sysroot/bootimg/state" "$T/out/state-after" 2>/dev/null
fi
exit 0
"""


# After switch-root (`unshare -m`): the physical root (a tmpfs copy of $T/phys, read-only if asked)
# at $T/newroot/sysroot, then the program (bless, mount-image), its mounts, then the state back.
AFTER_SWITCH_ROOT = r"""#!/bin/sh
T=$1
shift
mkdir -p "$T/newroot/sysroot"
mount -t tmpfs -o mode=0755 phys "$T/newroot/sysroot" || exit 90
cp -a "$T/phys/." "$T/newroot/sysroot/" || exit 91
if [ -n "${PHYS_RO:-}" ]; then mount -o remount,ro "$T/newroot/sysroot" || exit 92; fi
"$@" >"$T/out/after.stdout" 2>"$T/out/after.stderr"
echo $? >"$T/out/after.rc"
cat /proc/self/mountinfo >"$T/out/after.mountinfo"
rm -rf "$T/phys/bootimg/state" && cp -a "$T/newroot/sysroot/bootimg/state" "$T/phys/bootimg/state"
"""


# -- building releases ---------------------------------------------------------------------------

DEV_BOOT = """  fsverity: optional
boot:
  etc: readonly
  var: transient
  on_verification_failure: emergency
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("initrd-ws")
    shutil.copytree(REPO / "manifests", top / "manifests")
    example_inputs.main(top / "build")
    minimal = (top / "manifests" / "minimal.yaml").read_text()
    assert minimal.endswith("  trust: sealed\n")
    (top / "manifests" / "dev.yaml").write_text(minimal.replace("name: minimal", "name: dev") + DEV_BOOT)
    return top


@pytest.fixture(scope="module")
def keyids(workspace) -> dict[str, str]:
    """The example keys' ids (random per workspace): {"release-2026": ID, "release-2027": ID}."""
    return {name: PublicKey.from_file(workspace / "build" / "keys" / f"{name}.pub").keyid
            for name in ("release-2026", "release-2027")}


@pytest.fixture(scope="module")
def releases(workspace, tmp_path_factory) -> dict[str, Path]:
    """signed: ivi-demo (signed, required, /etc transient, /var persistent, reboot);
    sealed: minimal (sealed, required, defaults); dev: minimal with fsverity optional,
    /etc readonly, /var transient, emergency."""
    out = tmp_path_factory.mktemp("initrd-rel")
    built = {}
    for name, manifest, key in [("signed", "ivi-demo.yaml", "release-2026"), ("sealed", "minimal.yaml", None),
                                ("dev", "dev.yaml", None)]:
        # The example roots have no kernel or dracut: the module is run here, not booted.
        args = ["build", str(workspace / "manifests" / manifest), "-o", str(out / name), "--no-boot-check"]
        if key:
            args += ["--key", str(workspace / "build" / "keys" / f"{key}.key")]
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr.decode()
        built[name] = out / name
    return built


def root_digest(release: Path) -> str:
    return json.loads((release / "release.json").read_bytes())["root"]["digest"]


def root_file(release: Path, path: str) -> tuple[bytes, int]:
    """A file of the release's root image: its bytes (inline or from the object store), mode."""
    node = load_image(release / "images" / "root.cfs").root.lookup(path.encode())
    assert node is not None, f"{path} is not in the root image"
    data = node.content if node.content is not None else (release / "objects" / node.payload.decode()).read_bytes()
    return (data or b""), node.mode & 0o7777


def extract_module_root(release: Path, dest: Path) -> Path:
    """The parts of the root image that dracut's module install reads, under dest."""
    root = load_image(release / "images" / "root.cfs").root
    wanted = [f"{MODULE_DIR}/{n}" for n in initramfs.TEMPLATES] + [initramfs.BOOT_CONF, PROGRAM]
    keys = root.lookup(b"/usr/lib/bootimg/keys")
    if keys is not None:
        wanted += [f"/usr/lib/bootimg/keys/{k.decode()}" for k in keys.children]
    for path in wanted:
        data, mode = root_file(release, path)
        target = dest / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.chmod(target, mode)
    return dest


def run_module_setup(sysroot: Path, initdir: Path, log: Path, calls: str,
                     dracut_modules: str = "base systemd") -> subprocess.CompletedProcess:
    """Source module-setup.sh (from sysroot) in bash, as dracut does, with stub dracut functions
    (``dracut_modules``: the dracut modules of this initramfs)."""
    script = (DRACUT_STUBS + f'moddir="{sysroot}{MODULE_DIR}"\n'
              f'. "$moddir/module-setup.sh"\n{calls}\n')
    env = {"PATH": os.environ["PATH"], "LOG": str(log), "initdir": str(initdir),
           "systemdsystemunitdir": UNIT_DIR, "dracutsysrootdir": str(sysroot), "DRACUT_MODULES": dracut_modules}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


# -- one run of the hook ---------------------------------------------------------------------------

@dataclass
class Outcome:
    rc: int
    stderr: str
    kmsg: str
    mounts: list[dict]            # mounts under the scenario directory, in mountinfo order
    booted: dict | None
    out: Path
    verity_calls: list[str] = field(default_factory=list)

    def fatal_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("bootimg: FATAL:")]

    def read(self, name: str) -> str:
        p = self.out / name
        return p.read_text(errors="replace") if p.exists() else ""


class Scenario:
    """A physical root holding a release, an initramfs made by module-setup.sh, and a kernel
    command line; run() runs the program on it in a private mount namespace.

    layout "releases" (boot contract 2): the release at /bootimg/releases/VERSION without its
    objects, which are the shared store /bootimg/objects, and bootimg.release= on the command
    line. layout "single": one release at /bootimg/release with its objects/, and a boot.conf
    without BOOTIMG_RELEASES and BOOTIMG_OBJECTS, as releases made before contract 2 have."""

    def __init__(self, top: Path, release: Path, program: Path, *, provisioned: bool = True,
                 keyids: dict[str, str] | None = None, layout: str = "single"):
        self.top = top
        self.program = program
        self.keyids = keyids or {}
        self.release_src = release
        self.layout = layout
        for d in ("sysroot", "run", "out", "shim-state"):
            (top / d).mkdir(parents=True)
        self.phys = top / "phys"
        self.version = json.loads((release / "release.json").read_bytes())["version"]
        self.state = self.phys / "bootimg" / "state"
        if layout == "single":
            self.rel = self.phys / "bootimg" / "release"
            self.objects = self.rel / "objects"
            shutil.copytree(release, self.rel)
        else:
            self.rel = self.phys / "bootimg" / "releases" / self.version
            self.objects = self.phys / "bootimg" / "objects"
            shutil.copytree(release, self.rel, ignore=lambda d, names: ["objects"] if Path(d) == release else [])
            shutil.copytree(release / "objects", self.objects)
        (self.state / "var").mkdir(parents=True)
        if provisioned:
            (self.state / ".provisioned").touch()
        self.initrd = top / "initrd"
        res = run_module_setup(extract_module_root(release, top / "root"), self.initrd, top / "module-setup.log",
                               "install || exit $?")
        assert res.returncode == 0, res.stdout + res.stderr
        conf = self.conf.read_text()
        assert f"BOOTIMG_RELEASES={initramfs.RELEASES_PATH}\n" in conf and f"BOOTIMG_OBJECTS={initramfs.OBJECTS_PATH}\n" in conf
        if layout == "single":
            self.conf.write_text("".join(ln for ln in conf.splitlines(keepends=True)
                                         if not ln.startswith(("BOOTIMG_RELEASES=", "BOOTIMG_OBJECTS="))))
        (top / "harness.sh").write_text(HARNESS)
        self.base_cmdline = "quiet rw" + (f" bootimg.release={self.release_path}" if layout == "releases" else "")
        self.cmdline = self.base_cmdline
        self.digest = root_digest(release)

    @property
    def release_path(self) -> str:
        """The release directory on the partition, e.g. /bootimg/releases/1.4.0."""
        return "/" + str(self.rel.relative_to(self.phys))

    @property
    def keys(self) -> Path:
        return self.initrd / "etc" / "bootimg" / "keys"

    @property
    def conf(self) -> Path:
        return self.initrd / "etc" / "bootimg" / "boot.conf"

    def seal(self, digest: str | None = None) -> None:
        self.cmdline = f"composefs.digest=v1-sha256-12:{digest or self.digest} {self.base_cmdline}"

    def run(self, *, verity: str = "enabled", phys_ro: bool = False, env: dict[str, str] | None = None) -> Outcome:
        t = self.top
        (t / "cmdline").write_text(self.cmdline + "\n")
        (t / "out" / "kmsg").write_text("")
        (t / "out" / "verity.log").unlink(missing_ok=True)
        run_env = {
            "PATH": os.environ["PATH"], "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
            "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98:print_stacktrace=1",
            "BOOTIMG_CONF": str(self.conf), "BOOTIMG_SYSROOT": str(t / "sysroot"), "BOOTIMG_RUN": str(t / "run"),
            "BOOTIMG_CMDLINE": str(t / "cmdline"), "BOOTIMG_KEYS_DIR": str(self.keys),
            "BOOTIMG_KMSG": str(t / "out" / "kmsg"),
            "BOOTIMG_TEST_VERITY": verity, "BOOTIMG_TEST_VERITY_STATE": str(t / "shim-state"),
            "BOOTIMG_TEST_LOG": str(t / "out" / "verity.log"), "BOOTIMG_TEST_TPM": "none",
            "BOOTIMG_VOLATILE_ROOT": str(t / "run" / "systemd" / "volatile-root"),
        }
        if phys_ro:
            run_env["PHYS_RO"] = "1"
        run_env.update(env or {})
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", str(t / "harness.sh"), str(t),
                              str(self.program)], env=run_env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"harness failed ({res.returncode}): {res.stdout}{res.stderr}"
        leftover = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert str(t) not in leftover, f"loop device left behind: {leftover}"
        out = t / "out"
        booted = t / "run" / "booted.json"
        return Outcome(rc=int((out / "rc").read_text()), stderr=(out / "stderr").read_text(),
                       kmsg=(out / "kmsg").read_text(), mounts=self._mounts(out / "mountinfo"),
                       booted=json.loads(booted.read_text()) if booted.exists() else None, out=out,
                       verity_calls=(out / "verity.log").read_text().splitlines() if (out / "verity.log").exists() else [])

    def after_switch_root(self, *args: str, phys_ro: bool = False, env: dict[str, str] | None = None
                          ) -> tuple[int, list[str], list[dict]]:
        """Run the program with ARGS as the booted system does (the physical root at /sysroot,
        booted.json in /run/bootimg): exit status, output lines, the mounts it left."""
        t = self.top
        (t / "after.sh").write_text(AFTER_SWITCH_ROOT)
        run_env = {"PATH": os.environ["PATH"], "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
                   "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98:print_stacktrace=1", "BOOTIMG_RUN": str(t / "run"),
                   "BOOTIMG_TEST_ROOT": str(t / "newroot"), "BOOTIMG_TEST_TPM": "none",
                   "BOOTIMG_TEST_LOG": str(t / "out" / "verity.log"), **({"PHYS_RO": "1"} if phys_ro else {}),
                   **(env or {})}
        (t / "out" / "verity.log").unlink(missing_ok=True)
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", str(t / "after.sh"), str(t),
                              str(self.program), *args], env=run_env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"harness failed ({res.returncode}): {res.stdout}{res.stderr}"
        out = t / "out"
        lines = ((out / "after.stdout").read_text() + (out / "after.stderr").read_text()).splitlines()
        return int((out / "after.rc").read_text()), lines, self._mounts(out / "after.mountinfo")

    def bless(self, **kw) -> tuple[int, list[str]]:
        rc, lines, _ = self.after_switch_root("bless", **kw)
        return rc, lines

    def _mounts(self, mountinfo: Path) -> list[dict]:
        mounts = []
        for line in mountinfo.read_text().splitlines():
            left, right = line.split(" - ", 1)
            f, r = left.split(), right.split()
            if f[4] == str(self.top) or f[4].startswith(str(self.top) + "/"):
                mounts.append({"root": f[3], "at": f[4][len(str(self.top)):], "mount_opts": f[5],
                               "fstype": r[0], "source": r[1], "super_opts": r[2] if len(r) > 2 else ""})
        return mounts


@pytest.fixture
def scenario(releases, keyids, tmp_path, test_program, workspace):
    made = []

    def make(kind: str = "signed", **kw) -> Scenario:
        s = Scenario(tmp_path / f"s{len(made) or ''}", releases[kind], test_program, keyids=keyids, **kw)
        s.workspace = workspace
        made.append(s)
        return s
    return make


def assert_failed_closed(o: Outcome, reason: str) -> None:
    """Exit 1, exactly one FATAL line (stderr and kmsg agree), nothing but the physical root
    mounted where the hook works, no booted.json."""
    assert o.rc == 1, o.stderr
    fatal = o.fatal_lines()
    assert len(fatal) == 1, o.stderr
    assert reason in fatal[0], fatal[0]
    kmsg = [ln for ln in o.kmsg.splitlines() if "FATAL" in ln]
    assert kmsg == [f"<2>{fatal[0]}"], o.kmsg
    assert [(m["at"], m["fstype"], m["source"], m["root"]) for m in o.mounts] == \
        [("/sysroot", "tmpfs", "phys", "/")], o.mounts
    assert o.booted is None


def assert_verified_root(o: Outcome, digest: str) -> dict[str, dict]:
    assert o.rc == 0, o.stderr
    assert o.fatal_lines() == [] and "FATAL" not in o.kmsg
    at = {m["at"]: m for m in o.mounts}          # the topmost mount at each place
    root = at["/sysroot"]
    assert root["fstype"] == "overlay" and root["source"] == "composefs"
    opts = root["super_opts"].split(",")
    assert "ro" in opts and "metacopy=on" in opts and "redirect_dir=on" in opts
    assert "verity=require" in opts
    assert o.booted["objects"].startswith("/sysroot/")
    meta, store = str(o.out.parent / "run/meta"), str(o.out.parent / "run/phys") + o.booted["objects"][len("/sysroot"):]
    # the store is the data-only layer: "::" in mount(2)'s syntax, datadir+ in fsconfig's
    assert f"lowerdir={meta}::{store}" in opts or (f"lowerdir+={meta}" in opts and f"datadir+={store}" in opts), opts
    assert at["/run/meta"]["fstype"] == "erofs" and at["/run/meta"]["source"].startswith("/dev/loop")
    assert "ro" in at["/run/meta"]["mount_opts"].split(",")
    phys = at["/sysroot/sysroot"]
    assert (phys["fstype"], phys["source"], phys["root"]) == ("tmpfs", "phys", "/")
    assert "/run/phys" not in at
    # Inline file content comes from the image itself; external files come through the
    # verity=require overlay and the objects have no fs-verity here: EIO proves it is enforced.
    assert o.read("inline.rc").strip() == "0" and "ID=bootimg-demo" in o.read("inline")
    assert o.read("external.rc").strip() != "0"
    assert "Input/output error" in o.read("external.err")
    # The physical root (release and state) is reachable at /sysroot/sysroot.
    listing = o.read("physical").split()
    assert "state" in listing and o.booted["release"].split("/")[2] in listing
    assert o.booted["digest"] == digest and o.booted["verity"] == "require"
    return at


# -- static checks -------------------------------------------------------------------------------

def rendered(name: str, manifest_file: str) -> str:
    return initramfs.render(name, load_manifest(REPO / "manifests" / manifest_file))


@pytest.mark.skipif(not have("shellcheck"), reason="needs shellcheck (tools/setup-host.sh)")
@pytest.mark.parametrize("manifest", ["ivi-demo.yaml", "minimal.yaml"])
def test_module_setup_is_posix_and_shellcheck_clean(manifest, tmp_path):
    p = tmp_path / "module-setup.sh"
    p.write_text(rendered("module-setup.sh", manifest))
    for sh in (["sh", "-n"], ["bash", "-n"], ["bash", "--posix", "-n"]):
        res = subprocess.run([*sh, str(p)], capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(sh)}: {res.stderr}"
    # sourced by dracut's bash, written in POSIX sh: clean for both
    for dialect in ("sh", "bash"):
        res = subprocess.run(["shellcheck", "-s", dialect, str(p)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


def test_templates_render_without_placeholders():
    for manifest in ("ivi-demo.yaml", "minimal.yaml"):
        for name in initramfs.TEMPLATES:
            text = rendered(name, manifest)
            assert not re.search(r"@[A-Z_]+@", text), (name, manifest)
            assert text == rendered(name, manifest)     # deterministic
    assert "BOOTIMG_TRUST=signed" in rendered("module-setup.sh", "ivi-demo.yaml")
    assert "BOOTIMG_TRUST=sealed" in rendered("module-setup.sh", "minimal.yaml")


def unit_keys(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(f"{section}.{k}", []).append(v)
    return keys


def test_unit_reboot_policy():
    u = unit_keys(rendered("bootimg-root.service", "ivi-demo.yaml"))
    expected = {
        "Unit.DefaultDependencies": ["no"], "Unit.ConditionPathExists": ["/etc/initrd-release"],
        "Unit.Requires": ["sysroot.mount"], "Unit.After": ["sysroot.mount"],
        "Unit.Before": ["initrd-root-fs.target"], "Unit.FailureAction": ["reboot-force"],
        "Service.Type": ["oneshot"], "Service.RemainAfterExit": ["yes"],
        "Service.ExecStart": [PROGRAM],
        "Service.StandardOutput": ["journal+console"], "Service.StandardError": ["journal+console"],
        "Install.RequiredBy": ["initrd-root-fs.target"],
    }
    for k, v in expected.items():
        assert u.get(k) == v, k
    assert "Unit.OnFailure" not in u
    # Only the initrd condition: a skipped unit would let an unverified root boot.
    assert [k for k in u if k.startswith("Unit.Condition")] == ["Unit.ConditionPathExists"]
    # The program reads no environment; the loader's variables cannot come from systemd.setenv=.
    unset = u["Service.UnsetEnvironment"][0].split()
    assert {"LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT"} <= set(unset)


def test_unit_emergency_policy(workspace):
    m = load_manifest(workspace / "manifests" / "dev.yaml")
    u = unit_keys(initramfs.render("bootimg-root.service", m))
    assert u["Unit.OnFailure"] == ["emergency.target"]
    assert u["Unit.OnFailureJobMode"] == ["replace-irreversibly"]
    assert "Unit.FailureAction" not in u


def test_root_image_carries_the_module(releases, keyids):
    rel = releases["signed"]
    for name, mode in initramfs.TEMPLATES.items():
        data, got = root_file(rel, f"{MODULE_DIR}/{name}")
        assert got == mode, name
        assert data.decode() == rendered(name, "ivi-demo.yaml")
    conf, _ = root_file(rel, "/usr/lib/bootimg/boot.conf")
    lines = [ln for ln in conf.decode().splitlines() if not ln.startswith("#")]
    assert lines == ["BOOTIMG_TRUST=signed", "BOOTIMG_FSVERITY=required", "BOOTIMG_ETC=transient",
                     "BOOTIMG_VAR=persistent", "BOOTIMG_ON_FAILURE=reboot", "BOOTIMG_RELEASE=/bootimg/release",
                     "BOOTIMG_STATE=/bootimg/state", "BOOTIMG_RELEASES=/bootimg/releases", "BOOTIMG_OBJECTS=/bootimg/objects",
                     "BOOTIMG_ROLLBACK_NV=0x01500016"]
    # shell-sourceable
    res = subprocess.run(["sh", "-c", '. "$1" && echo "$BOOTIMG_TRUST $BOOTIMG_VAR"', "sh", "/dev/stdin"],
                         input=conf.decode(), capture_output=True, text=True)
    assert res.stdout.strip() == "signed persistent"
    dracut, _ = root_file(rel, "/etc/dracut.conf.d/90-bootimg.conf")
    assert 'add_dracutmodules+=" bootimg "' in dracut.decode()
    program, mode = root_file(rel, PROGRAM)
    assert mode == 0o755 and program == setup_root.build().read_bytes()    # the release build, no test hooks
    root = load_image(rel / "images" / "root.cfs").root
    assert root.lookup(b"/sysroot").is_dir()
    assert sorted(root.lookup(b"/usr/lib/bootimg/keys").children) == sorted(f"{k}.pub".encode() for k in keyids.values())
    sealed_conf, _ = root_file(releases["dev"], "/usr/lib/bootimg/boot.conf")
    assert "BOOTIMG_TRUST=sealed\nBOOTIMG_FSVERITY=optional\nBOOTIMG_ETC=readonly\nBOOTIMG_VAR=transient\n" \
           "BOOTIMG_ON_FAILURE=emergency\n" in sealed_conf.decode()


@pytest.mark.skipif(not have("fsverity"), reason="needs fsverity-utils")
def test_fsverity_tool_agrees_with_release_digest(releases):
    """The program's simulation measures with its own user-space digest; fsverity-utils and
    release.json (our Python digest) agree with it on every image of every release."""
    for rel in releases.values():
        for image in sorted((rel / "images").glob("*.cfs")):
            out = subprocess.run(["fsverity", "digest", "--hash-alg=sha256", "--block-size=4096", str(image)],
                                 capture_output=True, text=True, check=True).stdout
            assert out.split()[0] == "sha256:" + fsverity.digest(image.read_bytes()).hex()
        assert fsverity.digest((rel / "images" / "root.cfs").read_bytes()).hex() == root_digest(rel)


# -- module-setup.sh -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["signed", "sealed"])
def test_module_setup(releases, keyids, tmp_path, kind):
    sysroot = extract_module_root(releases[kind], tmp_path / "root")
    log = tmp_path / "calls"
    res = run_module_setup(sysroot, tmp_path / "initdir", log,
                           'check; echo "check=$?"; depends; installkernel; install; echo "install=$?"')
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines == ["check=255", "systemd", "install=0"]
    calls = log.read_text().splitlines()
    mod = f"{sysroot}{MODULE_DIR}"
    expected = [
        "instmods erofs overlay loop",
        "instmods tpm_tis tpm_crb",
        f"inst_binary {PROGRAM}",
        f"inst_simple {mod}/bootimg-root.service {UNIT_DIR}/bootimg-root.service",
        "inst_simple /usr/lib/bootimg/boot.conf /etc/bootimg/boot.conf",
    ]
    if kind == "signed":
        expected += [f"inst_simple /usr/lib/bootimg/keys/{k}.pub /etc/bootimg/keys/{k}.pub" for k in sorted(keyids.values())]
    expected.append(f"ln_r {UNIT_DIR}/bootimg-root.service {UNIT_DIR}/initrd-root-fs.target.requires/bootimg-root.service")
    assert calls == expected
    initdir = tmp_path / "initdir"
    link = initdir / UNIT_DIR.lstrip("/") / "initrd-root-fs.target.requires" / "bootimg-root.service"
    assert os.readlink(link) == f"{UNIT_DIR}/bootimg-root.service"
    assert os.access(initdir / PROGRAM.lstrip("/"), os.X_OK)
    assert (initdir / PROGRAM.lstrip("/")).read_bytes() == (sysroot / PROGRAM.lstrip("/")).read_bytes()
    assert (initdir / "etc/bootimg/boot.conf").read_bytes() == (sysroot / "usr/lib/bootimg/boot.conf").read_bytes()
    # One program, no shell tools: nothing else is installed into the initramfs.
    assert not [c for c in calls if c.startswith("inst_multiple")]
    # A lean initramfs without dracut's base module: systemd needs /etc/initrd-release to run
    # as the initrd's, which base would have written; the root's os-release stands in.
    lean_log = tmp_path / "lean-calls"
    res = run_module_setup(sysroot, tmp_path / "lean", lean_log, "install", dracut_modules="systemd systemd-initrd")
    assert res.returncode == 0, res.stderr
    assert lean_log.read_text().splitlines() == [c for c in expected if not c.startswith("instmods")] + [
        "inst_simple /usr/lib/os-release /usr/lib/initrd-release", "ln_r /usr/lib/initrd-release /etc/initrd-release"]


def test_module_setup_refuses_signed_without_keys(releases, tmp_path):
    sysroot = extract_module_root(releases["signed"], tmp_path / "root")
    shutil.rmtree(sysroot / "usr/lib/bootimg/keys")
    log = tmp_path / "calls"
    res = run_module_setup(sysroot, tmp_path / "initdir", log, 'install; echo "install=$?"')
    assert res.stdout.strip() == "install=1"
    assert any(c.startswith("dfatal bootimg: trust profile 'signed' but no keys") for c in log.read_text().splitlines())


# -- the program, for real ---------------------------------------------------------------------------

@kernel_test
@pytest.mark.parametrize("paths", MOUNT_PATHS)
@pytest.mark.parametrize("layout", ["releases", "single"])
def test_signed_root_mounts_with_verity_required(scenario, paths, layout):
    s = scenario("signed", layout=layout)
    o = s.run(env=paths)
    at = assert_verified_root(o, s.digest)
    # /etc transient: an overlay with a tmpfs upper; /var persistent: the partition's state/var.
    assert at["/sysroot/etc"]["fstype"] == "overlay" and at["/run/etc"]["fstype"] == "tmpfs"
    assert "upperdir=" + str(s.top / "run/etc/upper") in at["/sysroot/etc"]["super_opts"].split(",")
    assert (at["/sysroot/var"]["fstype"], at["/sysroot/var"]["root"]) == ("tmpfs", "/bootimg/state/var")
    assert o.read("etc-write.rc").strip() == "0" and o.read("var-write.rc").strip() == "0"
    assert (o.out / "state-after" / "var" / "bootimg-probe").read_text() == "probe\n"   # persisted
    release, objects = {"releases": ("/bootimg/releases/1.4.0", "/bootimg/objects"),
                        "single": ("/bootimg/release", "/bootimg/release/objects")}[layout]
    assert o.booted == {
        "digest": s.digest, "trust": "signed", "key": s.keyids["release-2026"], "verity": "require",
        "fsverity": "required", "release": release, "image": f"{release}/images/root.cfs",
        "provisioned_now": False, "on_failure": "reboot",
        "mounts": {"/": "composefs", "/etc": "transient", "/var": "persistent", "/tmp": "tmpfs", "/sysroot": "physical"},
        "release_dir": f"/sysroot{release}", "objects": f"/sysroot{objects}", "version": "1.4.0",
        "security_version": 0, "rollback_minimum": 0, "rollback_store": "file", "rollback_nv": "0x01500016",
        "rollback_file": "/sysroot/bootimg/state/rollback"}
    # /tmp: a tmpfs over the image's (the build gave this root with containers one), writable by anyone
    assert (at["/sysroot/tmp"]["fstype"], at["/sysroot/tmp"]["source"]) == ("tmpfs", "bootimg-tmp")
    assert {"nosuid", "nodev"} <= set(at["/sysroot/tmp"]["mount_opts"].split(","))
    assert o.read("tmp-mode").strip() == "1777" and o.read("tmp-write.rc").strip() == "0"
    # The verified copies the digest was read from.
    assert (s.top / "run/release.json").read_bytes() == (s.rel / "release.json").read_bytes()
    assert any(c.startswith("measure ") for c in o.verity_calls)
    erofs = at["/run/meta"]["source"]      # file-backed where the kernel has it, else a loop device
    assert erofs.startswith("/dev/loop") or (not paths and erofs.startswith("/proc/self/fd/")), erofs
    assert ("erofs on a loop device" in o.stderr) == erofs.startswith("/dev/loop"), o.stderr
    # Its own time and the rollback check's, for the KPI record and the device test's figures.
    m = re.search(r"mounted \(.*\) in (\d+\.\d) ms, the rollback check \(file\) (\d+\.\d\d) ms of it", o.stderr)
    assert m and 0 < float(m.group(2)) <= float(m.group(1)), o.stderr
    # The physical root here is a tmpfs (no block device): no volatile-root link for gpt-auto.
    assert not (s.top / "run" / "systemd" / "volatile-root").is_symlink()


@kernel_test
def test_one_machine_id_per_device_kept_on_the_data_partition(scenario):
    """/etc transient, /var persistent, no machine ID in the image: the first boot makes one and
    keeps it in the state directory; every later boot has the same one in /etc (journald files
    the persistent journal under it)."""
    s = scenario("signed")
    o = s.run()
    assert o.rc == 0, o.stderr
    made = o.read("machine-id")
    assert re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}\n", made), made
    assert (o.out / "state-after" / "machine-id").read_text() == made
    assert "machine ID made for this device" in o.stderr
    kept = s.phys / "bootimg" / "state"
    kept.mkdir(parents=True, exist_ok=True)
    (kept / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    again = s.run()
    assert again.rc == 0 and again.read("machine-id") == "0123456789abcdef0123456789abcdef\n"
    assert "machine ID made" not in again.stderr


@kernel_test
def test_a_physical_root_on_a_block_device_is_linked_for_gpt_auto(scenario):
    """The root is an overlay: /run/systemd/volatile-root names the physical root's device, so
    systemd's gpt-auto generator finds the boot disk and mounts its ESP at /efi."""
    s = scenario("signed")
    o = s.run(env={"PHYS_EXT4": "1"})
    assert o.rc == 0 and o.fatal_lines() == [], o.stderr
    assert {m["at"]: m for m in o.mounts}["/sysroot"]["source"] == "composefs"
    dev = int(o.read("phys-dev"))
    link = s.top / "run" / "systemd" / "volatile-root"
    assert os.readlink(link) == f"/dev/block/{os.major(dev)}:{os.minor(dev)}"


@kernel_test
def test_signed_with_matching_cmdline_digest_and_second_key(scenario, workspace):
    s = scenario("signed")
    s.seal()                                            # the argument may be present too if it agrees
    (s.keys / f"{s.keyids['release-2026']}.pub").unlink()   # only the next key is trusted ...
    secret = SecretKey.from_file(workspace / "build" / "keys" / "release-2027.key")  # ... and signed it
    data = (s.rel / "release.json").read_bytes()
    (s.rel / "release.json.minisig").write_bytes(
        sign(secret, data, make_trusted_comment(file="release.json", keyid=secret.keyid, timestamp=1)))
    o = s.run()
    assert_verified_root(o, s.digest)
    assert o.booted["key"] == s.keyids["release-2027"]


@kernel_test
def test_sealed_root_from_cmdline(scenario):
    s = scenario("sealed")
    s.seal()
    o = s.run()
    assert_verified_root(o, s.digest)
    assert o.booted["trust"] == "sealed" and o.booted["key"] is None
    assert not (s.top / "run/release.json").exists()     # sealed: release.json is not consulted


@kernel_test
def test_release_path_from_cmdline(scenario):
    s = scenario("sealed")
    s.rel.rename(s.phys / "bootimg" / "r2")
    s.seal()
    s.cmdline += " bootimg.release=/bootimg/r2"
    o = s.run()
    assert_verified_root(o, s.digest)
    assert o.booted["release"] == "/bootimg/r2"


@kernel_test
def test_object_store_apart_from_the_release(scenario):
    """BOOTIMG_OBJECTS puts the store elsewhere on the partition (one store for several
    releases): it is the data-only layer and what provisioning covers."""
    s = scenario("sealed", provisioned=False)
    s.seal()
    (s.rel / "objects").rename(s.phys / "bootimg" / "objects")
    s.conf.write_text(s.conf.read_text() + "BOOTIMG_OBJECTS=/bootimg/objects\n")
    o = s.run(verity="track")
    assert o.rc == 0, o.stderr
    at = {m["at"]: m for m in o.mounts}
    opts = at["/sysroot"]["super_opts"].split(",")
    store = f"{s.top}/run/phys/bootimg/objects"
    assert f"datadir+={store}" in opts or any(x.startswith("lowerdir=") and x.endswith(f"::{store}") for x in opts), opts
    files = sum(1 for d in (s.phys / "bootimg" / "objects", s.rel / "images") for p in d.rglob("*") if p.is_file())
    assert any(f"fs-verity enabled on {files} files" in ln for ln in o.stderr.splitlines()), o.stderr
    s.conf.write_text(s.conf.read_text() + "BOOTIMG_OBJECTS=/bootimg/../objects\n")
    assert_failed_closed(s.run(verity="track"), "unsafe BOOTIMG_OBJECTS '/bootimg/../objects'")


@kernel_test
def test_first_boot_provisions_a_readonly_root(scenario):
    """No marker: every image and object gets fs-verity (the physical root is remounted rw for
    it and ro again), the marker is created, then the root mounts with verity=require."""
    s = scenario("dev", provisioned=False)
    s.seal()
    files = sorted(str(p.relative_to(s.phys)) for sub in ("images", "objects") for p in (s.rel / sub).rglob("*")
                   if p.is_file())
    o = s.run(verity="track", phys_ro=True)
    assert_verified_root(o, s.digest)
    enabled = sorted(str(p.relative_to(s.top / "shim-state" / str(s.top / "sysroot").lstrip("/")))
                     for p in (s.top / "shim-state").rglob("*") if p.is_file())
    assert enabled == files and len(files) > 3
    assert (o.out / "state-after" / ".provisioned").exists()
    assert o.booted["provisioned_now"] is True
    at = {m["at"]: m for m in o.mounts}
    assert "ro" in at["/sysroot/sysroot"]["mount_opts"].split(",")        # back to read-only
    # dev profile: /etc read-only (the image's), /var a tmpfs
    assert "/sysroot/etc" not in at and "/run/etc" not in at
    assert (at["/sysroot/var"]["fstype"], at["/sysroot/var"]["source"]) == ("tmpfs", "bootimg-var")
    assert o.read("etc-write.rc").strip() != "0" and o.read("var-write.rc").strip() == "0"
    # a root image without /tmp (minimal, no containers) keeps none: nothing to mount over
    assert "/sysroot/tmp" not in at and o.booted["mounts"]["/tmp"] == "image"


@kernel_test
def test_provisioning_treats_already_enabled_files_as_done(scenario):
    s = scenario("sealed", provisioned=False)
    s.seal()
    o = s.run(verity="enabled")      # every file already has fs-verity: enabling answers EEXIST
    assert_verified_root(o, s.digest)
    files = sorted(str(p).replace(str(s.phys), str(s.top / "sysroot")) for sub in ("images", "objects")
                   for p in (s.rel / sub).rglob("*") if p.is_file())
    # one enable attempt per file, in one process (no measure needed), then the root image's measure
    enables = sorted(c.split(" ", 1)[1] for c in o.verity_calls if c.startswith("enable "))
    assert enables == files
    assert [c for c in o.verity_calls if c.startswith("measure ")] == [f"measure {s.top}/sysroot/bootimg/release/images/root.cfs"]
    assert f"fs-verity enabled on 0 files; all {len(files)} files of" in o.stderr
    assert (o.out / "state-after" / ".provisioned").exists()


@kernel_test
def test_reprovisioning_enables_only_the_files_that_lack_fsverity(scenario):
    """A provisioned release with one new file (an update, or an attacker's): only it is enabled."""
    s = scenario("sealed", provisioned=False)
    s.seal()
    files = sorted(p for sub in ("images", "objects") for p in (s.rel / sub).rglob("*") if p.is_file())
    new = files[len(files) // 2]
    for p in files:
        if p != new:
            mark = s.top / "shim-state" / str(s.top / "sysroot" / p.relative_to(s.phys)).lstrip("/")
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
    o = s.run(verity="track")
    assert_verified_root(o, s.digest)
    assert f"fs-verity enabled on 1 files; all {len(files)} files of" in o.stderr
    assert len([c for c in o.verity_calls if c.startswith("enable ")]) == len(files)


@kernel_test
def test_provisioning_on_a_readonly_store_measures(scenario, tmp_path, test_program):
    """`provision` on a read-only filesystem (the kernel answers EROFS to enabling) measures
    instead: provisioned files pass, and the one without fs-verity is named."""
    s = scenario("sealed")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f'mount --bind "{s.rel}" "{ro}" && mount -o remount,bind,ro "{ro}" && '
              f'"{test_program}" provision "{ro}"; echo "rc=$?"')
    env = {"PATH": os.environ["PATH"], "ASAN_OPTIONS": "detect_leaks=0", "BOOTIMG_TEST_VERITY": "enabled"}
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=env,
                         capture_output=True, text=True, timeout=120)
    assert "rc=0" in res.stdout, res.stderr
    assert "fs-verity enabled on 0 files; all" in res.stderr
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         env={**env, "BOOTIMG_TEST_VERITY": "none"}, capture_output=True, text=True, timeout=120)
    assert "rc=1" in res.stdout
    assert "bootimg-provision: cannot enable fs-verity on " in res.stderr and "Operation not supported" in res.stderr


@kernel_test
def test_optional_without_fsverity_mounts_loudly_without_verity(scenario):
    s = scenario("dev", provisioned=False)
    s.seal()
    o = s.run(verity="none")
    assert o.rc == 0, o.stderr
    assert o.fatal_lines() == []
    warnings = [ln for ln in o.stderr.splitlines() if ln.startswith("bootimg: WARNING:")]
    assert len(warnings) >= 3 and any("WITHOUT verity=require" in w for w in warnings)
    assert sum("<3>bootimg: WARNING:" in ln for ln in o.kmsg.splitlines()) == len(warnings)
    at = {m["at"]: m for m in o.mounts}
    assert "verity=require" not in at["/sysroot"]["super_opts"].split(",")
    assert o.read("external.rc").strip() == "0"
    assert (o.out / "external").read_bytes() == Path("/bin/dash").read_bytes()
    assert o.booted["verity"] == "none" and o.booted["fsverity"] == "optional"
    assert not (o.out / "state-after" / ".provisioned").exists()     # retried next boot


@kernel_test
def test_readonly_physical_root_becomes_writable_for_persistent_var(scenario):
    s = scenario("signed")
    o = s.run(phys_ro=True)
    at = assert_verified_root(o, s.digest)
    assert "remounting the physical root read-write for the persistent /var" in o.stderr
    assert "rw" in at["/sysroot/sysroot"]["mount_opts"].split(",")
    assert o.read("var-write.rc").strip() == "0"


@kernel_test
def test_a_signal_fails_closed_too(scenario):
    """SIGTERM (systemd stopping the unit) is held back and ends the run at the next step: one
    FATAL line, everything undone."""
    s = scenario("signed")
    o = s.run(verity="term")
    assert_failed_closed(o, "interrupted by signal 15 (Terminated) in step 4 (measure the root image)")


@kernel_test
def test_optional_still_refuses_a_wrong_image(scenario, releases):
    s = scenario("dev")
    s.seal()
    shutil.copyfile(releases["sealed"] / "images" / "root.cfs", s.rel / "images" / "root.cfs")
    assert_failed_closed(s.run(verity="none"), "has digest 'sha256:")


# -- failing closed -----------------------------------------------------------------------------------

def _modify_release(s: Scenario) -> None:
    p = s.rel / "release.json"
    p.write_bytes(p.read_bytes().replace(b'"version": "1.4.0"', b'"version": "1.4.1"'))


def _untrusted_signature(s: Scenario) -> None:
    secret, _ = generate_keypair("rogue")
    data = (s.rel / "release.json").read_bytes()
    (s.rel / "release.json.minisig").write_bytes(
        sign(secret, data, make_trusted_comment(file="release.json", keyid=secret.keyid, timestamp=1)))


def _replace_root_image(s: Scenario, releases) -> None:
    shutil.copyfile(releases["sealed"] / "images" / "root.cfs", s.rel / "images" / "root.cfs")


def _resign(s: Scenario, data: bytes) -> None:
    """Sign data with the trusted release-2026 key (what a compromised build could produce)."""
    secret = SecretKey.from_file(s.workspace / "build" / "keys" / "release-2026.key")
    (s.rel / "release.json").write_bytes(data)
    (s.rel / "release.json.minisig").write_bytes(
        sign(secret, data, make_trusted_comment(file="release.json", keyid=secret.keyid, timestamp=1)))


def _edit_trusted_comment(s: Scenario) -> None:
    p = s.rel / "release.json.minisig"
    p.write_bytes(p.read_bytes().replace(b"timestamp:", b"timestamp:9"))


def _misnamed_key(s: Scenario) -> None:
    keyid = s.keyids["release-2026"]
    other = s.keyids["release-2027"]
    (s.keys / f"{other}.pub").unlink()
    (s.keys / f"{keyid}.pub").rename(s.keys / f"{other}.pub")


def _unparsable_but_signed(s: Scenario) -> None:
    _resign(s, (s.rel / "release.json").read_bytes() + b"}")


def _two_kernel_arguments(s: Scenario) -> None:
    data = json.loads((s.rel / "release.json").read_bytes())
    text = json.dumps(data, indent=2).replace('"kernel_argument":', '"kernel_argument": "x", "kernel_argument":', 1)
    _resign(s, text.encode())


def _var_is_a_file(s: Scenario) -> None:
    shutil.rmtree(s.phys / "bootimg" / "state" / "var")
    (s.phys / "bootimg" / "state" / "var").write_text("not a directory\n")


def _bad_conf(s: Scenario) -> None:
    s.conf.write_text(s.conf.read_text().replace("BOOTIMG_TRUST=signed", "BOOTIMG_TRUST=maybe"))


SIGNED_FAILURES = {
    "release-json-modified": (_modify_release, "enabled", "is not signed by a trusted key"),
    "untrusted-key": (_untrusted_signature, "enabled", "is not signed by a trusted key"),
    "signing-key-not-in-initramfs": (lambda s: (s.keys / f"{s.keyids['release-2026']}.pub").unlink(), "enabled",
                                     "is not signed by a trusted key (1 tried)"),
    "missing-signature": (lambda s: (s.rel / "release.json.minisig").unlink(), "enabled", "is not signed (no release.json.minisig)"),
    "no-keys": (lambda s: shutil.rmtree(s.keys), "enabled", "no trusted keys"),
    "cmdline-disagrees": (lambda s: s.seal("ab" * 32), "enabled", "disagrees with the signed release.json"),
    "root-image-replaced": (None, "enabled", "has fs-verity digest 'sha256:"),
    "image-without-fsverity": (lambda s: None, "none", "has no fs-verity"),
    "no-release": (lambda s: shutil.rmtree(s.rel), "enabled", "no release directory /bootimg/release"),
    "no-root-image": (lambda s: (s.rel / "images" / "root.cfs").unlink(), "enabled", "has no root image"),
    "bad-config": (_bad_conf, "enabled", "BOOTIMG_TRUST is 'maybe'"),
    "unsafe-release-path": (lambda s: setattr(s, "cmdline", "rw bootimg.release=/bootimg/../etc"), "enabled",
                            "unsafe release path"),
    "failure-after-mounting": (_var_is_a_file, "enabled", "cannot create /bootimg/state/var"),
    "malformed-signature": (lambda s: (s.rel / "release.json.minisig").write_text("untrusted comment: x\nRWQ=\n"),
                            "enabled", "release.json.minisig of /bootimg/release: malformed signature file"),
    "edited-trusted-comment": (_edit_trusted_comment, "enabled", "is not signed by a trusted key"),
    "key-named-wrongly": (_misnamed_key, "enabled", "is not signed by a trusted key (1 tried)"),
    "release-json-not-json": (_unparsable_but_signed, "enabled", "signed release.json is not valid JSON"),
    "two-kernel-arguments": (_two_kernel_arguments, "enabled", "has 2 root kernel arguments, expected 1"),
}


@kernel_test
@pytest.mark.parametrize("case", list(SIGNED_FAILURES))
def test_signed_fails_closed(scenario, releases, case):
    s = scenario("signed")
    change, mode, reason = SIGNED_FAILURES[case]
    if change is None:
        _replace_root_image(s, releases)
    else:
        change(s)
    o = s.run(verity=mode, env=getattr(s, "env", None))
    assert_failed_closed(o, reason)


SEALED_FAILURES = {
    "no-digest-argument": ("rw quiet", "no composefs.digest= on the kernel command line"),
    "wrong-prefix": ("composefs.digest=sha256:{d} rw", "malformed kernel argument"),
    "short-digest": ("composefs.digest=v1-sha256-12:{s} rw", "malformed kernel argument"),
    "upper-case-digest": ("composefs.digest=v1-sha256-12:{u} rw", "malformed kernel argument"),
    "empty-digest": ("composefs.digest= rw", "malformed kernel argument"),
    "two-digests": ("composefs.digest=v1-sha256-12:{d} composefs.digest=v1-sha256-12:{d}", "given 2 times"),
    "other-digest": ("composefs.digest=v1-sha256-12:{o} rw", "has fs-verity digest 'sha256:{d}', expected sha256:{o}"),
    "huge-argument": ("composefs.digest=v1-sha256-12:" + "a" * 70000, "cannot read"),
    "digest-with-nul-bytes": ("composefs.digest=v1-sha256-12:{d}\0 rw", "contains a NUL byte"),
}


@kernel_test
@pytest.mark.parametrize("case", list(SEALED_FAILURES))
def test_sealed_fails_closed(scenario, case):
    s = scenario("sealed")
    cmdline, reason = SEALED_FAILURES[case]
    other = "0123456789abcdef" * 4
    fmt = {"d": s.digest, "s": s.digest[:63], "u": s.digest.upper(), "o": other}
    s.cmdline = cmdline.format(**fmt)
    assert_failed_closed(s.run(), reason.format(**fmt))


@kernel_test
def test_sealed_fails_closed_on_replaced_image(scenario, releases):
    s = scenario("sealed")
    s.seal()
    shutil.copyfile(releases["dev"] / "images" / "root.cfs", s.rel / "images" / "root.cfs")
    assert_failed_closed(s.run(), "expected sha256:" + s.digest)


@kernel_test
def test_required_provisioning_failure_is_fatal(scenario):
    s = scenario("sealed", provisioned=False)
    s.seal()
    o = s.run(verity="none")
    assert_failed_closed(o, "cannot enable fs-verity on release /bootimg/release")
    assert "bootimg-provision: cannot enable fs-verity on" in o.stderr
    assert not (s.phys / "bootimg" / "state" / ".provisioned").exists()



# -- boot contract 2: releases side by side over one object store -------------------------------------

def _objects(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


@kernel_test
def test_releases_side_by_side_over_one_store(scenario, releases):
    """Two releases under /bootimg/releases and one object store: the first boot provisions every
    release's images and the store (not a hidden directory, an installer's temporary), then boots
    the release the command line names, with the shared store as the data-only layer."""
    s = scenario("signed", layout="releases", provisioned=False)
    other = s.phys / "bootimg" / "releases" / "1.3.0"
    shutil.copytree(s.rel, other)
    shutil.copyfile(releases["dev"] / "images" / "root.cfs", other / "images" / "root.cfs")
    for name in _objects(releases["dev"] / "objects") - _objects(s.objects):
        (s.objects / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(releases["dev"] / "objects" / name, s.objects / name)
    temp = s.phys / "bootimg" / "releases" / ".1.5.0.tmp" / "images"
    temp.mkdir(parents=True)
    (temp / "root.cfs").write_bytes(b"half written")
    assert not (s.rel / "objects").exists() and not (other / "objects").exists()
    o = s.run(verity="track")
    at = assert_verified_root(o, s.digest)
    prefix = s.top / "shim-state" / str(s.top / "sysroot").lstrip("/")
    enabled = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.is_file())
    expected = sorted(str(p.relative_to(s.phys)) for d in (s.rel / "images", other / "images", s.objects)
                      for p in d.rglob("*") if p.is_file())
    assert enabled == expected
    assert f"fs-verity enabled on {len(expected)} files; all {len(expected)} files of" in o.stderr
    assert o.booted["release"] == "/bootimg/releases/1.4.0" and o.booted["provisioned_now"] is True
    assert (o.booted["release_dir"], o.booted["objects"]) == ("/sysroot/bootimg/releases/1.4.0", "/sysroot/bootimg/objects")
    store = f"{s.top}/run/phys/bootimg/objects"
    opts = at["/sysroot"]["super_opts"].split(",")
    assert f"datadir+={store}" in opts or any(x.startswith("lowerdir=") and x.endswith(f"::{store}") for x in opts), opts
    # the other release, by the command line: its own root image (here one the signed release.json
    # does not describe: refused), over the same store
    s.cmdline = "quiet rw bootimg.release=/bootimg/releases/1.3.0"
    o = s.run(verity="track")
    assert_failed_closed(o, "root image /bootimg/releases/1.3.0/images/root.cfs has fs-verity digest")
    shutil.copyfile(s.rel / "images" / "root.cfs", other / "images" / "root.cfs")
    (s.top / "shim-state").joinpath(str(s.top / "sysroot" / other.relative_to(s.phys) / "images/root.cfs").lstrip("/")).touch()
    o = s.run(verity="track")
    assert_verified_root(o, s.digest)
    assert o.booted["release_dir"] == "/sysroot/bootimg/releases/1.3.0"
    assert f"measure {s.top}/sysroot/bootimg/releases/1.3.0/images/root.cfs" in o.verity_calls


V2_REFUSALS = {
    "no-release-argument": ("quiet rw", "no bootimg.release= on the kernel command line (which release of /bootimg/releases to boot)"),
    "dot-dot": ("bootimg.release=/bootimg/releases/..", "unsafe release path '/bootimg/releases/..'"),
    "escape": ("bootimg.release=/bootimg/releases/../release", "unsafe release path '/bootimg/releases/../release'"),
    "the-single-release": ("bootimg.release=/bootimg/release",
                           "bootimg.release=/bootimg/release is not a release of /bootimg/releases"),
    "nested": ("bootimg.release=/bootimg/releases/1.4.0/images", "is not a release of /bootimg/releases"),
    "hidden": ("bootimg.release=/bootimg/releases/.1.4.0.tmp", "bootimg.release=/bootimg/releases/.1.4.0.tmp is not a release of"),
    "the-releases-directory": ("bootimg.release=/bootimg/releases", "is not a release of /bootimg/releases"),
    "sibling-prefix": ("bootimg.release=/bootimg/releases2/1.4.0", "is not a release of /bootimg/releases"),
    "trailing-slash": ("bootimg.release=/bootimg/releases/1.4.0/", "unsafe release path"),
}


@kernel_test
@pytest.mark.parametrize("case", list(V2_REFUSALS))
def test_release_outside_the_releases_is_refused(scenario, case):
    """Only a direct child of BOOTIMG_RELEASES boots, even where a complete release sits."""
    s = scenario("signed", layout="releases")
    for decoy in (s.phys / "bootimg" / "release", s.phys / "bootimg" / "releases" / ".1.4.0.tmp",
                  s.phys / "bootimg" / "releases2" / "1.4.0"):
        shutil.copytree(s.rel, decoy)
    cmdline, reason = V2_REFUSALS[case]
    s.cmdline = f"quiet {cmdline} rw"
    assert_failed_closed(s.run(), reason)


# -- anti-rollback ----------------------------------------------------------------------------------------

def _set_security_version(s: Scenario, sv: int) -> None:
    """release.json with this security_version, signed again with the trusted key."""
    data = json.loads((s.rel / "release.json").read_bytes())
    data["security_version"] = sv
    _resign(s, canonical_json(data))


@kernel_test
@pytest.mark.parametrize("minimum", [None, 0, 2, 3, 4, 4294967295])
def test_rollback_minimum_from_the_state_file(scenario, minimum):
    s = scenario("signed", layout="releases")
    _set_security_version(s, 3)
    if minimum is not None:
        (s.state / "rollback").write_text(f"{minimum}\n")
    o = s.run()
    if minimum is not None and minimum > 3:
        assert_failed_closed(o, "")
        assert o.fatal_lines() == [f"bootimg: FATAL: release 1.4.0 has security_version 3, below this device's "
                                   f"minimum {minimum} (state file /bootimg/state/rollback)"]
        return
    assert_verified_root(o, s.digest)        # equal is fine
    assert (o.booted["security_version"], o.booted["rollback_minimum"]) == (3, minimum or 0)
    assert o.booted["rollback_store"] == "file" and o.booted["rollback_file"] == "/sysroot/bootimg/state/rollback"
    assert (s.state / "rollback").exists() == (minimum is not None)         # the initramfs never raises it


ROLLBACK_FAILURES = {
    "cmdline-disagrees": (lambda s: setattr(s, "cmdline", s.cmdline + " bootimg.security_version=2"),
                          "bootimg.security_version=2 on the kernel command line disagrees with the signed release.json (3)"),
    "cmdline-higher": (lambda s: setattr(s, "cmdline", s.cmdline + " bootimg.security_version=4"),
                       "bootimg.security_version=4 on the kernel command line disagrees with the signed release.json (3)"),
    "cmdline-malformed": (lambda s: setattr(s, "cmdline", s.cmdline + " bootimg.security_version=3x"),
                          "malformed kernel argument bootimg.security_version=3x (expected a decimal number 0..4294967295)"),
    "cmdline-too-big": (lambda s: setattr(s, "cmdline", s.cmdline + " bootimg.security_version=4294967296"),
                        "malformed kernel argument bootimg.security_version=4294967296"),
    "cmdline-twice": (lambda s: setattr(s, "cmdline", s.cmdline + " bootimg.security_version=3 bootimg.security_version=3"),
                      "bootimg.security_version= is given 2 times on the kernel command line"),
    "state-file-malformed": (lambda s: (s.state / "rollback").write_text("three\n"),
                             "cannot read this device's rollback minimum: the state file /bootimg/state/rollback is malformed"),
    "state-file-negative": (lambda s: (s.state / "rollback").write_text("-1\n"),
                            "the state file /bootimg/state/rollback is malformed"),
    "state-file-a-directory": (lambda s: (s.state / "rollback").mkdir(),
                               "cannot read the state file /bootimg/state/rollback: Is a directory"),
    "state-file-a-fifo": (lambda s: os.mkfifo(s.state / "rollback"),
                          "cannot read the state file /bootimg/state/rollback: Invalid argument"),
    "nv-index-malformed": (lambda s: s.conf.write_text(s.conf.read_text() + "BOOTIMG_ROLLBACK_NV=0x81000001\n"),
                           "BOOTIMG_ROLLBACK_NV '0x81000001' is not an NV index (0x01xxxxxx)"),
    "tpm-unreachable": (lambda s: setattr(s, "env", {"BOOTIMG_TEST_TPM": "unix:/nonexistent/tpm"}),
                        "cannot read this device's rollback minimum: cannot connect to unix:/nonexistent/tpm"),
    "tpm-answers-nothing": (lambda s: setattr(s, "env", {"BOOTIMG_TEST_TPM": "/dev/null"}),
                            "cannot read this device's rollback minimum: malformed TPM response (short"),
}


@kernel_test
@pytest.mark.parametrize("case", list(ROLLBACK_FAILURES))
def test_rollback_fails_closed(scenario, case):
    s = scenario("signed", layout="releases")
    _set_security_version(s, 3)
    ROLLBACK_FAILURES[case][0](s)
    assert_failed_closed(s.run(env=getattr(s, "env", None)), ROLLBACK_FAILURES[case][1])


@kernel_test
def test_signed_security_version_on_the_command_line_may_agree(scenario):
    s = scenario("signed", layout="releases")
    _set_security_version(s, 3)
    s.cmdline += " bootimg.security_version=3"
    assert_verified_root(s.run(), s.digest)


@kernel_test
def test_sealed_security_version_comes_from_the_command_line(scenario):
    """sealed: the (sealed UKI's) command line carries it; without it, 0."""
    s = scenario("sealed", layout="releases")
    s.seal()
    (s.state / "rollback").write_text("5\n")
    assert_failed_closed(s.run(), f"release {s.version} has security_version 0, below this device's minimum 5 "
                                  "(state file /bootimg/state/rollback)")
    s.cmdline += " bootimg.security_version=4"
    assert_failed_closed(s.run(), f"release {s.version} has security_version 4, below this device's minimum 5")
    s.seal()
    s.cmdline += " bootimg.security_version=5"
    o = s.run()
    assert_verified_root(o, s.digest)
    assert (o.booted["security_version"], o.booted["rollback_minimum"], o.booted["version"]) == (5, 5, s.version)


# -- bless ----------------------------------------------------------------------------------------------------

@kernel_test
@pytest.mark.parametrize("phys_ro", [False, True], ids=["rw", "ro"])
def test_bless_raises_the_minimum_and_never_lowers_it(scenario, phys_ro):
    """After a good boot: the state file goes to the booted security_version (atomically, the
    physical root made writable for it if it is read-only, and read-only again); again: nothing
    changes; a higher minimum stays; and the release below it is refused from then on."""
    s = scenario("dev" if phys_ro else "signed", layout="releases")
    if phys_ro:                                 # dev: sealed, /var transient (the physical root stays ro)
        s.seal()
        s.cmdline += " bootimg.security_version=3"
    else:
        _set_security_version(s, 3)
    o = s.run(phys_ro=phys_ro)
    assert o.rc == 0, o.stderr
    assert not (s.state / "rollback").exists()
    rc, lines, mounts = s.after_switch_root("bless", phys_ro=phys_ro)
    assert (rc, lines) == (0, [f"bootimg: bless: rollback minimum 3 (release {s.version}): state file "
                               "/sysroot/bootimg/state/rollback 0 -> 3, no TPM"])
    assert (s.state / "rollback").read_text() == "3\n"
    assert sorted(p.name for p in s.state.iterdir()) == [".provisioned", "rollback", "var"]     # no temporary left
    phys = next(m for m in mounts if m["at"] == "/newroot/sysroot")
    assert ("ro" in phys["mount_opts"].split(",")) == phys_ro
    inode = (s.state / "rollback").stat().st_ino
    rc, lines = s.bless()
    assert (rc, lines[0].endswith("state file /sysroot/bootimg/state/rollback 3 -> 3, no TPM")) == (0, True), lines
    (s.state / "rollback").write_text("7\n")
    rc, lines = s.bless()
    assert rc == 0 and lines[0].endswith("7 -> 7, no TPM") and (s.state / "rollback").read_text() == "7\n"
    assert inode and len(lines) == 1


@kernel_test
def test_a_blessed_minimum_refuses_the_older_release(scenario):
    s = scenario("signed", layout="releases")
    _set_security_version(s, 3)
    assert s.run().rc == 0
    assert s.bless()[0] == 0
    _set_security_version(s, 2)                   # the previous release, still installed
    assert_failed_closed(s.run(), "release 1.4.0 has security_version 2, below this device's minimum 3 "
                                  "(state file /bootimg/state/rollback)")


BLESS_FAILURES = {
    "not-booted-by-bootimg": (lambda s: (s.top / "run" / "booted.json").unlink(),
                              "bootimg: bless failed: cannot read {run}/booted.json: No such file or directory (the root "
                              "was not set up by bootimg-setup-root)"),
    "old-booted-json": (lambda s: _edit_booted(s, lambda b: b.pop("security_version")),
                        "bootimg: bless failed: {run}/booted.json has no security_version, rollback_file or rollback_nv"),
    "booted-json-malformed": (lambda s: (s.top / "run" / "booted.json").write_text("{"),
                              "bootimg: bless failed: {run}/booted.json: line 1 column 2: expected a member name"),
    "unsafe-rollback-file": (lambda s: _edit_booted(s, lambda b: b.update(rollback_file="/sysroot/../etc/x")),
                             "bootimg: bless failed: {run}/booted.json: unsafe rollback_file '/sysroot/../etc/x'"),
    "rollback-file-off-the-partition": (lambda s: _edit_booted(s, lambda b: b.update(rollback_file="/etc/rollback")),
                                        "bootimg: bless failed: {run}/booted.json: unsafe rollback_file '/etc/rollback'"),
    "state-file-malformed": (lambda s: (s.state / "rollback").write_text("x\n"),
                             "bootimg: bless failed: the state file /sysroot/bootimg/state/rollback is malformed"),
    "tpm-unreachable": (lambda s: setattr(s, "env", {"BOOTIMG_TEST_TPM": "unix:/nonexistent/tpm"}),
                        "bootimg: bless failed: cannot connect to unix:/nonexistent/tpm"),
    "usage": (lambda s: setattr(s, "args", ["bless", "now"]), "bootimg: bless failed: usage: bootimg-setup-root bless"),
}


def _edit_booted(s: Scenario, change) -> None:
    p = s.top / "run" / "booted.json"
    data = json.loads(p.read_text())
    change(data)
    p.write_text(json.dumps(data))


@kernel_test
@pytest.mark.parametrize("case", list(BLESS_FAILURES))
def test_bless_fails_in_one_line(scenario, case):
    s = scenario("signed", layout="releases")
    _set_security_version(s, 3)
    assert s.run().rc == 0
    change, message = BLESS_FAILURES[case]
    change(s)
    rc, lines, _ = s.after_switch_root(*getattr(s, "args", ["bless"]), env=getattr(s, "env", None))
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith(message.format(run=s.top / "run")), lines
    # the state file is raised before the TPM is asked: a TPM that does not answer leaves it raised
    assert (s.state / "rollback").exists() == (case in ("state-file-malformed", "tpm-unreachable"))


# -- container images: release and store from booted.json ---------------------------------------------------

@kernel_test
def test_container_image_comes_from_the_booted_release(scenario, releases):
    """mount-image takes the release directory and the object store from booted.json: a decoy
    release elsewhere on the partition (and whatever the kernel command line says) does not matter."""
    s = scenario("signed", layout="releases")
    decoy = s.phys / "bootimg" / "releases" / "1.3.0"
    shutil.copytree(s.rel, decoy)
    (decoy / "images" / "rear-camera.cfs").write_bytes(b"not this one")
    assert s.run().rc == 0
    digest = json.loads((s.rel / "release.json").read_bytes())["images"]["rear-camera"]["digest"]
    rc, lines, mounts = s.after_switch_root("mount-image", "rear-camera", digest, env={"BOOTIMG_TEST_VERITY": "enabled"})
    assert (rc, lines) == (0, [])
    assert (s.top / "out" / "verity.log").read_text().splitlines() == [
        f"measure {s.top}/newroot/sysroot/bootimg/releases/1.4.0/images/rear-camera.cfs"]
    at = {m["at"]: m for m in mounts}
    opts = at["/run/containers/rear-camera"]["super_opts"].split(",")
    store = f"{s.top}/newroot/sysroot/bootimg/objects"
    assert "verity=require" in opts
    assert f"datadir+={store}" in opts or any(x.startswith("lowerdir=") and x.endswith(f"::{store}") for x in opts), opts
    # no booted.json: refused in one line, nothing mounted
    (s.top / "run" / "booted.json").unlink()
    rc, lines, mounts = s.after_switch_root("mount-image", "rear-camera", digest, env={"BOOTIMG_TEST_VERITY": "enabled"})
    assert rc == 1 and lines == [f"bootimg: FATAL: container rear-camera: cannot read {s.top}/run/booted.json: No such "
                                 "file or directory (the root was not set up by bootimg-setup-root)"]
    assert not [m for m in mounts if m["at"].startswith("/run/")]
