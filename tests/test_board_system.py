"""The example system (manifests/board.yaml) on the QEMU board: it boots from its verified
composefs root, starts its boot-time containers in order, and refuses what was not signed.

The disk is the one ``bootimg disk`` makes (GPT: ESP with systemd-boot, ext4 data partition);
every boot here is UEFI firmware -> systemd-boot -> a real 6.12 kernel under QEMU (TCG) with the
dracut initramfs built in the release's own root, unless a test needs other kernel arguments or
another initramfs (then QEMU loads the kernel directly with the entry's command line). The disk
is provisioned once (fs-verity enabled on every image and object by the hook, on a boot whose
writes are kept); each test boots a private copy, or the original with ``-snapshot``. The attacks
are offline edits of a copy with debugfs (``bootimg.board.diskedit``), as someone with write
access to the data partition could make.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import example_workspace, is_root

vm = pytest.mark.vm
pytestmark = [pytest.mark.vm, pytest.mark.skipif(not is_root(), reason="the board needs root")]

CONTAINERS_IN_ORDER = ["vehicle-bus", "rear-camera"]      # rear-camera: After=/Requires= vehicle-bus
ALL_CONTAINERS = ["vehicle-bus", "rear-camera", "cluster", "telemetry"]
FATAL = re.compile(r"bootimg: FATAL: (.*)")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    from bootimg.board.system import prepare_system
    from bootimg.vm.qemu import check_qemu

    check_qemu()
    top = example_workspace(tmp_path_factory.mktemp("board-system"))
    return prepare_system(top / "manifests" / "board.yaml", build_dir=top / "build",
                          key=top / "build" / "keys" / "release-2026.key")


@pytest.fixture(scope="module")
def keys(system):
    from bootimg.signing import PublicKey, SecretKey

    kdir = system.tree.parent.parent / "keys"
    return {name: (SecretKey.from_file(kdir / f"{name}.key"), PublicKey.from_file(kdir / f"{name}.pub"))
            for name in ("release-2026", "release-2027")}


def disk_copy(system, tmp_path: Path) -> Path:
    from bootimg.board.system import copy_disk

    return copy_disk(system, tmp_path / "disk.img")


def fatal_lines(console: str) -> list[str]:
    return [m.group(1).strip() for m in FATAL.finditer(console)]


def assert_refused(result, reason: str) -> None:
    """Fail closed: no marker, the boot ended in the initramfs, ONE clear FATAL reason."""
    assert not result.ok, result.summary()
    assert result.marker is None
    assert result.stage == "initramfs", result.summary()
    fatal = sorted(set(fatal_lines(result.console)))
    assert len(fatal) == 1, fatal
    assert reason in fatal[0], fatal[0]
    # on_verification_failure: reboot -> the initrd reboots, which ends QEMU (-no-reboot)
    assert result.exit_reason == "exited", result.summary()
    assert "Switching root" not in result.console


def object_of(system, path: str, image: str = "root") -> str:
    """The object (relative to objects/) holding ``path`` of one of the release's images."""
    from bootimg.composefs.reader import load_image

    node = load_image(system.release_dir / "images" / f"{image}.cfs").root.lookup(path.encode())
    assert node is not None and node.payload, path
    return node.payload.decode()


def sign_release(system, secret) -> bytes:
    from bootimg.signing import make_trusted_comment, sign

    data = (system.release_dir / "release.json").read_bytes()
    return sign(secret, data, make_trusted_comment(file="release.json", keyid=secret.keyid, timestamp=1767225600))


def boot(system, disk=None, initrd=None, extra="", **kw):
    """A UEFI boot of the disk (or, with another initramfs or extra kernel arguments, a direct
    kernel boot of it)."""
    from bootimg.board import BOARD_MARKER
    from bootimg.vm.qemu import boot as qemu_boot

    machine = system.direct(extra, disk=disk, initrd=initrd) if (initrd or extra) else system.machine(disk)
    return qemu_boot(machine, marker=BOARD_MARKER, timeout=kw.pop("timeout", 400), **kw)


def running(system, disk=None, **kw):
    from bootimg.board import BOARD_MARKER
    from bootimg.vm.session import running as vm_running

    return vm_running(system.machine(disk), marker=BOARD_MARKER, timeout=kw.pop("timeout", 400), **kw)


# -- 1. the verified boot ----------------------------------------------------------------------

def test_boots_the_verified_root_and_starts_the_containers_in_order(system, keys, tmp_path):
    if system.provisioning is not None:            # None: the provisioned disk came from the cache
        assert system.provisioning.ok and "fs-verity enabled on" in system.provisioning.console
        for line in system.provisioning.console.splitlines():     # the figures, for pytest -s
            if "bootimg-provision:" in line or "bootimg: root " in line:
                print("provisioning boot:", line.strip())
    with running(system, serial_log=tmp_path / "console.log") as vm:
        assert vm.result.ok, vm.result.summary()
        booted = json.loads(vm.run("cat", "/run/bootimg/booted.json").stdout)
        assert booted["digest"] == system.digest
        assert booted["verity"] == "require" and booted["fsverity"] == "required"
        assert booted["trust"] == "signed" and booted["key"] == keys["release-2026"][1].keyid
        assert booted["provisioned_now"] is False          # the provisioning boot did it
        root = vm.run("findmnt", "-no", "FSTYPE,OPTIONS", "/").stdout.split()
        assert root[0] == "overlay" and "verity=require" in root[1].split(","), root
        opts = root[1].split(",")          # the store as data-only layer: fsconfig's datadir+ or mount(2)'s "::"
        assert "lowerdir=/run/bootimg/meta::/run/bootimg/phys/bootimg/objects" in opts or \
            {"lowerdir+=/run/bootimg/meta", "datadir+=/run/bootimg/phys/bootimg/objects"} <= set(opts), opts
        # the kernel itself says the image and an object carry the digests the release names
        meas = vm.run("fsverity", "measure", "/sysroot/bootimg/releases/1.4.0/images/root.cfs").stdout
        assert meas.split()[0] == f"sha256:{system.digest}"
        obj = object_of(system, "/usr/bin/bash")
        meas = vm.run("fsverity", "measure", f"/sysroot/bootimg/objects/{obj}").stdout
        assert meas.split()[0] == "sha256:" + obj.replace("/", "")
        # /etc transient (tmpfs upper), /var persistent (bound from the data partition)
        assert vm.run("findmnt", "-no", "FSTYPE", "/etc").stdout.strip() == "overlay"
        var = vm.run("findmnt", "-no", "SOURCE", "/var").stdout.strip()
        assert var.endswith("[/bootimg/state/var]"), var
        # the containers: active, each from its verified image, in the declared order
        units = vm.unit_properties([f"{c}.service" for c in ALL_CONTAINERS],
                                   "ActiveState,SubState,Result,ActiveEnterTimestampMonotonic")
        state = {u.removesuffix(".service"): p for u, p in units.items()}
        for name in ALL_CONTAINERS:
            assert state[name]["ActiveState"] == "active", state[name]
            mnt = vm.run("findmnt", "-no", "FSTYPE,OPTIONS", f"/run/bootimg/containers/{name}").stdout.split()
            assert mnt[0] == "overlay" and "verity=require" in mnt[1].split(","), (name, mnt)
        t = {n: int(state[n]["ActiveEnterTimestampMonotonic"]) for n in ALL_CONTAINERS}
        assert 0 < t["vehicle-bus"] < t["rear-camera"]
        assert t["vehicle-bus"] < t["cluster"] and t["vehicle-bus"] < t["telemetry"]
        # sd_notify readiness really came from inside the container (Type=notify)
        status = vm.run("systemctl", "show", "-p", "Type,StatusText", "vehicle-bus.service").stdout
        assert "Type=notify" in status and "StatusText=vehicle-bus running" in status
        # the container runs in its own root, as the declared user
        pid = vm.unit_properties(["vehicle-bus.service"], "MainPID")["vehicle-bus.service"]["MainPID"]
        assert "ID=bootimg-demo" in vm.run("cat", f"/proc/{pid}/root/etc/os-release").stdout
        assert vm.run("stat", "-c", "%u", f"/proc/{pid}").stdout.strip() == "1100"
        # each in its sandbox: no capabilities, no_new_privs, a seccomp filter, a user namespace
        # that maps only root and its own user (docs/boot-design.md, "Sandbox")
        main = vm.unit_properties([f"{n}.service" for n in ALL_CONTAINERS], "MainPID")
        pids = {n: main[f"{n}.service"]["MainPID"] for n in ALL_CONTAINERS}
        status = vm.run("grep", "-H", "-E", "'^(CapBnd|CapEff|NoNewPrivs|Seccomp):'",     # quoted for ssh's shell
                        *[f"/proc/{p}/status" for p in pids.values()]).stdout
        for name, p in pids.items():
            got = dict(line.split(":")[1:3] for line in status.splitlines() if line.startswith(f"/proc/{p}/status:"))
            assert {k: v.strip() for k, v in got.items()} == {"CapBnd": "0000000000000000", "CapEff": "0000000000000000",
                                                               "NoNewPrivs": "1", "Seccomp": "2"}, (name, status)
        assert vm.run("cat", f"/proc/{pid}/uid_map").stdout.split() == ["0", "0", "1", "1100", "1100", "1"]
        # the KPI collector (issue 5) on this boot, over ssh: it records which image it measured
        from conftest import run_cli

        r = run_cli("kpi", "collect", "--ssh", vm.host_alias, "--ssh-config", str(vm.ssh_config),
                    "--manifest", str(system.manifest_path), "--json")
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        record = json.loads(r.stdout)["boots"][0]
        assert record["booted"]["digest"] == system.digest
        assert record["milestones"]["switch_root"]["state"] == "ok"
        for name in ALL_CONTAINERS:
            ms = record["milestones"][f"container:{name}"]
            assert ms["state"] == "ok" and ms["usec"] == t[name], (name, ms)
        # over D-Bus "root mounted" is an upper bound (the initrd units are gone after
        # switch-root); the journal (persistent /var, initrd entries flushed) has it exactly
        r = run_cli("kpi", "collect", "--ssh", vm.host_alias, "--ssh-config", str(vm.ssh_config),
                    "--manifest", str(system.manifest_path), "--history", "--json")
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        past = {b["boot_id"]: b for b in json.loads(r.stdout)["boots"]}
        this = past[record["boot_id"]]
        rm = this["milestones"]["root_mounted"]
        assert rm["state"] == "ok" and "bootimg-root.service" in rm["source"], rm
        # journald stamps the hook's "Finished" when it receives it, after the manager's own
        # state change (initrd-root-fs.target follows the hook at once): a TCG guest under load
        # takes some milliseconds for that
        assert rm["usec"] <= record["milestones"]["root_mounted"]["usec"] + 250_000, (rm, record["milestones"])


# -- 2. a tampered object ------------------------------------------------------------------------

def test_tampered_root_object_reads_as_eio(system, tmp_path):
    """An attacker swaps an object for other bytes *with* fs-verity of their own: the kernel
    still refuses it, because the overlay compares it with the digest recorded in the image."""
    from bootimg.board import diskedit

    victim = "/usr/share/common-licenses/GPL-3"
    disk = disk_copy(system, tmp_path)
    # the next boot gives the new file fs-verity
    obj = diskedit.tamper_object(disk, system.release_dir / "images/root.cfs", victim,
                                 lambda data: data.replace(b"GNU", b"GNO", 1))
    path = f"/bootimg/objects/{obj}"
    with running(system, disk, serial_log=tmp_path / "console.log") as vm:
        assert vm.result.ok, vm.result.summary()
        assert "fs-verity enabled on 1 files" in vm.result.console
        phys = vm.run("fsverity", "measure", f"/sysroot{path}").stdout.split()[0]
        assert phys != "sha256:" + obj.replace("/", "")    # it has fs-verity, just not the right digest
        read = vm.run("cat", victim, check=False)
        assert read.returncode != 0 and "Input/output error" in read.stderr, read
        dmesg = vm.run("dmesg").stdout
        assert f"overlayfs: lower file '{obj.split('/')[1]}' has the wrong fs-verity digest" in dmesg, dmesg[-2000:]
        # the rest of the root is fine
        assert vm.run("cat", "/usr/share/common-licenses/GPL-2").returncode == 0


def test_tampered_container_object_fails_the_container_as_essential_says(system, tmp_path):
    """rear-camera's program is swapped: its service cannot start (EIO), and its
    ``essential: emergency`` takes the board to emergency mode."""
    from bootimg.board import diskedit

    disk = disk_copy(system, tmp_path)
    obj = diskedit.tamper_object(disk, system.release_dir / "images/rear-camera.cfs", "/usr/bin/rvc",
                                 lambda data: data + b"# tampered\n", mode=0o755)
    # systemd reports why the container could not start from inside its sandbox, to the journal
    # (the container's private /dev has no /dev/kmsg): its errors go to the console here
    result = boot(system, disk, serial_log=tmp_path / "console.log", timeout=500,
                  extra="systemd.journald.forward_to_console=1 systemd.journald.max_level_console=err")
    assert result.exit_reason == "emergency", result.summary()
    assert result.stage == "root"
    assert re.search(r"rear-camera\.service: .*(Input/output error|exit-code|status=)", result.console) or \
        "Failed to start rear-camera.service" in result.console or \
        re.search(r"Failed to start .*bootimg container rear-camera", result.console), result.console[-3000:]
    assert f"overlayfs: lower file '{obj.split('/')[1]}' has the wrong fs-verity digest" in result.console
    assert "rear-camera.service: Failed to execute /usr/bin/rvc: Input/output error" in result.console


# -- 3. refused boots ----------------------------------------------------------------------------

def test_modified_root_image_is_refused(system, tmp_path):
    from bootimg.board import diskedit

    disk = disk_copy(system, tmp_path)
    image = "/bootimg/releases/1.4.0/images/root.cfs"
    data = bytearray(diskedit.read_file(disk, image))
    data[-1] ^= 0x01                                # one bit, in the last block
    diskedit.replace_file(disk, image, bytes(data))
    diskedit.unprovision(disk)                      # ... and it gets fs-verity of its own
    assert_refused(boot(system, disk, serial_log=tmp_path / "console.log"),
                   f"expected sha256:{system.digest}")


def test_replaced_root_image_without_fsverity_is_refused(system, tmp_path):
    from bootimg.board import diskedit

    disk = disk_copy(system, tmp_path)
    other = (system.release_dir / "images" / "cluster.cfs").read_bytes()
    diskedit.replace_file(disk, "/bootimg/releases/1.4.0/images/root.cfs", other)
    assert_refused(boot(system, disk, serial_log=tmp_path / "console.log"), "has no fs-verity")


def test_release_signed_by_an_untrusted_key_is_refused(system, tmp_path):
    from bootimg.board import diskedit
    from bootimg.signing import generate_keypair

    secret, _public = generate_keypair()
    disk = disk_copy(system, tmp_path)
    diskedit.replace_file(disk, "/bootimg/releases/1.4.0/release.json.minisig", sign_release(system, secret))
    assert_refused(boot(system, disk, serial_log=tmp_path / "console.log"),
                   "is not signed by a trusted key (2 tried)")


def test_unsigned_release_is_refused(system, tmp_path):
    from bootimg.board import diskedit

    disk = disk_copy(system, tmp_path)
    diskedit.remove(disk, "/bootimg/releases/1.4.0/release.json.minisig")
    assert_refused(boot(system, disk, serial_log=tmp_path / "console.log"), "is not signed")


# -- 4. key rotation -------------------------------------------------------------------------------

def test_release_signed_with_the_next_key_boots(system, keys, tmp_path):
    from bootimg.board import diskedit

    disk = disk_copy(system, tmp_path)
    diskedit.replace_file(disk, "/bootimg/releases/1.4.0/release.json.minisig",
                          sign_release(system, keys["release-2027"][0]))
    result = boot(system, disk, serial_log=tmp_path / "console.log")
    assert result.ok, result.summary()
    assert f"key {keys['release-2027'][1].keyid}" in result.console


def test_a_removed_key_no_longer_boots(system, keys, tmp_path):
    """The next release drops release-2026 from trusted_keys; an initramfs built from it refuses
    a release signed with that key."""
    import dataclasses

    from bootimg.disk.initramfs import build_initramfs
    from bootimg.manifest import load_manifest
    from bootimg.pipeline import BuildOptions, build

    m = load_manifest(system.manifest_path, check_inputs=True)
    kept = tuple(k for k in m.integrity.trusted_keys if "release-2027" in str(k))
    assert len(kept) == 1
    m = dataclasses.replace(m, integrity=dataclasses.replace(m.integrity, trusted_keys=kept))
    out = tmp_path / "release-2027-only"
    build(m, BuildOptions(out=out, signing_key=keys["release-2027"][0]))
    boot_files = build_initramfs(out)
    result = boot(system, initrd=boot_files.initrd, serial_log=tmp_path / "console.log")
    assert_refused(result, "is not signed by a trusted key (1 tried)")


# -- 5. the plain baseline -------------------------------------------------------------------------

def test_the_same_root_boots_as_a_plain_ext4_root(system, tmp_path):
    from bootimg.board import BOARD_MARKER
    from bootimg.board.system import baseline_disk, baseline_machine
    from bootimg.vm.qemu import boot as qemu_boot

    disk = baseline_disk(system, tmp_path / "baseline.img", tmp_path / "tree")
    result = qemu_boot(baseline_machine(system, disk.path), marker=BOARD_MARKER, timeout=400,
                       serial_log=tmp_path / "console.log")
    assert result.ok, result.summary()
    assert "bootimg-root" not in result.console and "bootimg:" not in result.console
