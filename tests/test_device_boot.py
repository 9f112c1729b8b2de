"""A device's life through releases, on the QEMU board (UEFI, systemd-boot, a TPM 2.0 from
swtpm), the way a car lives it:

    bootimg disk r1                  the factory disk: release 1.0 (security_version 1)
    bootimg install http://host/2.0  on the device, over HTTP: only what the store lacks
    reboot                           2.0 is tried (boot counting), reaches boot-complete: blessed,
                                     the rollback minimum goes to 2 (TPM NV counter + state file)
    bootimg install .../3.0          its essential container fails: 3 tries, then 2.0 again
    downgrades                       1.0 by its entry, 1.0's signed files over 2.0's, the state
                                     file deleted: refused; 2.5 (same index 2) boots
    keys                             an untrusted signer is refused by install and by the boot;
                                     2.5 rotates the keys: 4.0 signed by the next key installs
    power loss                       QEMU killed at 10 points of an install: the running release
                                     boots every time, a re-run completes
    gc                               frees exactly what no installed release references

Each step checks `bootimg status` (what the loader's entries say) on the device. Real QEMU
under TCG, marked vm; the tests of this module run in order on one disk.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import random
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import board_rootfs_yaml, is_root, run_cli

pytestmark = [pytest.mark.vm, pytest.mark.skipif(not is_root(), reason="builds and boots a root: needs root")]

NAME = "fleet-ecu"
CONTAINER = "telemetry"
POWER_CUTS = 10
HOST = "10.0.2.2"                         # the host, from inside QEMU's user network

MANIFEST = """\
apiVersion: bootimg/v1
identity: {{name: {name}, version: "{version}", source_date_epoch: 1767225600, security_version: {sv}}}
{rootfs}containers:
  - name: {container}
    image: {{type: directory, path: {image}}}
    command: {command}
    network: host
    restart: on-failure
    essential: reboot
integrity:
  trust: signed
  fsverity: required
  trusted_keys: [{keys}]
boot:
  kernel_args: ["console=ttyS0,115200"]
  var: persistent
  on_verification_failure: reboot
  assessment: {{tries: 3}}
"""

TELEMETRY = '["/usr/bin/telemetryd", "--config", "/etc/telemetry.toml"]'


@dataclass
class Release:
    version: str
    security_version: int
    path: Path
    signed_by: str

    @property
    def json(self) -> dict:
        return json.loads((self.path / "release.json").read_text())

    @property
    def entry(self) -> str:
        return f"bootimg-{NAME}-{self.version}"


@dataclass
class Fleet:
    top: Path
    releases: dict[str, Release]
    disk: Path                     # the device: provisioned 1.0, then every step of the tests
    tpm: Path                      # its TPM's state (swtpm)
    factory: Path                  # a copy of the disk after its first boot (the power-loss runs)
    factory_tpm: Path
    figures: dict = field(default_factory=dict)

    def r(self, version: str) -> Release:
        return self.releases[version]


def cli(*args: str) -> subprocess.CompletedProcess:
    r = run_cli(*args)
    assert r.returncode == 0, (args, r.stderr.decode()[-3000:])
    return r


def build_release(top: Path, version: str, sv: int, *, key: str, trusted: tuple[str, ...] = ("release-2026",),
                  image: str = "build/images/telemetry", command: str = TELEMETRY) -> Release:
    manifest = top / f"m-{version}.yaml"
    keys = ", ".join(f"build/keys/{k}.pub" for k in trusted)
    manifest.write_text(MANIFEST.format(name=NAME, rootfs=board_rootfs_yaml(NAME), version=version, sv=sv,
                                        container=CONTAINER, image=image, command=command, keys=keys))
    out = top / "releases" / version
    cli("build", str(manifest), "-o", str(out), "--key", str(top / "build" / "keys" / f"{key}.key"))
    cli("initramfs", str(out), "-o", str(out / "boot"))
    return Release(version, sv, out, key)


def machine(disk: Path, tpm: Path, *, reboot: bool = True, **kw):
    """The device: its disk, its TPM and its UEFI variables (next to the disk) kept across runs."""
    from bootimg.vm.qemu import Machine

    return Machine(disk=disk, snapshot=False, tpm_state=tpm, efi_vars=disk.with_suffix(".vars"), reboot=reboot, **kw)


@contextlib.contextmanager
def device(disk: Path, tpm: Path, *, log: Path | None = None, reboot: bool = True, timeout: float = 1500):
    """The device running (ssh ready), powered off at the end of the block."""
    from bootimg.board import BOARD_MARKER
    from bootimg.vm.session import running

    with running(machine(disk, tpm, reboot=reboot), marker=BOARD_MARKER, timeout=timeout, serial_log=log) as vm:
        assert vm.result.ok, vm.result.summary()
        yield vm


def sh(vm, command: str, timeout: float = 600) -> str:
    proc = vm.run(command, check=False, timeout=timeout)
    assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.stdout


def booted(vm) -> dict:
    return json.loads(sh(vm, "cat /run/bootimg/booted.json"))


def status(vm) -> dict:
    return json.loads(sh(vm, "bootimg status --json", timeout=300))


def entries(st: dict) -> dict[str, dict]:
    return {r["version"]: r for r in st["releases"]}


def boot_id(vm) -> str | None:
    try:
        proc = vm.run("cat /proc/sys/kernel/random/boot_id", check=False, timeout=20)
    except Exception:            # ssh not answering (rebooting): no boot id yet
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def reboot(vm, *, timeout: float = 2400) -> int:
    """Reboot the device (in the same QEMU) and wait until a new boot answers and has finished
    starting; returns how many kernels started on the way (failed boots included)."""
    old = boot_id(vm)
    start = len(vm.console_since(0))
    vm.run("systemctl --no-block reboot", check=False, timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(5)
        assert vm.qemu_running, "QEMU exited during the reboot"
        new = boot_id(vm)
        if new and new != old:
            vm.run("systemctl is-system-running --wait", check=False, timeout=600)
            return sum(1 for _t, line in vm.console_since(start) if "Linux version" in line)
    raise AssertionError(f"no new boot within {timeout:.0f} s")


def wait_blessed(vm, timeout: float = 300) -> None:
    """bootimg-bless.service has run (boot-complete.target was reached)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.run("systemctl is-active bootimg-bless.service", check=False).stdout.strip() == "active":
            return
        time.sleep(3)
    raise AssertionError(sh(vm, "systemctl status bootimg-bless.service boot-complete.target --no-pager || true"))


def push_keys(vm, fleet: Fleet) -> None:
    """The public release keys at /run/KEY.pub on the device, for `bootimg verify --key`."""
    for k in ("release-2026", "release-2027"):
        vm.run(f"cat > /run/{k}.pub", input=(fleet.top / "build" / "keys" / f"{k}.pub").read_text())


def kpi_record(vm) -> dict:
    r = cli("kpi", "collect", "--ssh", vm.host_alias, "--ssh-config", str(vm.ssh_config), "--json")
    return json.loads(r.stdout)["boots"][0]


@contextlib.contextmanager
def serving(directory: Path):
    """A static HTTP server of ``directory`` (python's http.server), reachable from the guest."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def copy_disk(src: Path, src_tpm: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the device: disk, TPM state and UEFI variables."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    if src.with_suffix(".vars").is_file():
        shutil.copyfile(src.with_suffix(".vars"), dest.with_suffix(".vars"))
    tpm = dest.with_suffix(".tpm")
    shutil.rmtree(tpm, ignore_errors=True)
    shutil.copytree(src_tpm, tpm)
    return dest, tpm


def refused_boot(disk: Path, tpm: Path, log: Path, *, kernel=None, initrd=None, append: str = "") -> str:
    """Boot once without rebooting (QEMU's -no-reboot: a refused boot ends the run); the console."""
    from bootimg.board import BOARD_MARKER
    from bootimg.vm.qemu import boot

    m = machine(disk, tpm, reboot=False, kernel=kernel, initrd=initrd, append=append)
    result = boot(m, marker=BOARD_MARKER, timeout=1200, serial_log=log)
    console = log.read_text(errors="replace")
    assert not result.ok, "the boot was not refused: " + console[-2000:]
    return console


# -- the releases and the factory disk -------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    from conftest import example_workspace

    from bootimg.board import prepare
    from bootimg.board.system import ensure_tree

    top = example_workspace(tmp_path_factory.mktemp("fleet"))
    ensure_tree(prepare(), top / "build")
    changed = top / "build" / "images" / "telemetry-2"          # 2.0: one container changed
    shutil.copytree(top / "build" / "images" / "telemetry", changed, symlinks=True)
    (changed / "etc" / "telemetry.toml").write_text('endpoint = "https://telemetry.example.com/v2"\nbatch = 128\n')
    t0 = time.monotonic()
    rels = [
        build_release(top, "1.0", 1, key="release-2026"),
        build_release(top, "2.0", 2, key="release-2026", image="build/images/telemetry-2"),
        # 3.0: its essential container exits at once (after restarts, the board reboots)
        build_release(top, "3.0", 3, key="release-2026", image="build/images/telemetry-2",
                      command='["/usr/bin/sh", "-c", "echo telemetry 3.0 cannot start; exit 3"]'),
        # 2.5: the same index as 2.0; it adds the next key (release-2027); 4.0 drops the old one
        build_release(top, "2.5", 2, key="release-2026", trusted=("release-2026", "release-2027"),
                      image="build/images/telemetry-2"),
        build_release(top, "4.0", 4, key="release-2027", trusted=("release-2027",), image="build/images/telemetry-2"),
    ]
    build_seconds = time.monotonic() - t0
    disk = top / "device.raw"
    # The ESP keeps a kernel and initramfs per installed release (46 MB each with dracut's generic
    # initramfs): room for the five releases these tests install, none retired.
    cli("disk", str(rels[0].path), "-o", str(disk), "--boot", str(rels[0].path / "boot"), "--esp-size", "320M")
    tpm = top / "device.tpm"
    # The first boot provisions fs-verity on the fresh data partition.
    with device(disk, tpm, log=top / "first-boot.log") as vm:
        assert booted(vm)["version"] == "1.0"
        st = status(vm)
    assert [(r["version"], r["state"]) for r in st["releases"]] == [("1.0", "good")]
    factory, factory_tpm = copy_disk(disk, tpm, top / "factory.raw")
    fleet = Fleet(top, {r.version: r for r in rels}, disk, tpm, factory, factory_tpm)
    fleet.figures["build_seconds"] = round(build_seconds, 1)
    return fleet


def _print(label: str, data) -> None:
    print(f"\n[device figures] {label}: {json.dumps(data, sort_keys=True)}")


# -- 1. an update --------------------------------------------------------------------------------------

def test_update_transfers_only_what_changed_then_boots_and_is_blessed(fleet):
    r1, r2 = fleet.r("1.0"), fleet.r("2.0")
    with serving(fleet.top / "releases") as url, device(fleet.disk, fleet.tpm, log=fleet.top / "update.log") as vm:
        t0 = time.monotonic()
        res = json.loads(sh(vm, f"bootimg install {url}/2.0/ --json"))
        wall = time.monotonic() - t0
        full = json.loads(sh(vm, f"bootimg install {url}/2.0/ --json"))       # again: nothing to do
        assert full["already_installed"] is True and full["objects_transferred"] == 0
        st = status(vm)
        by = entries(st)
        assert by["2.0"]["state"] == "trying" and by["2.0"]["tries_left"] == 3
        assert st["next_boot"] == by["2.0"]["entry"] and by["1.0"]["state"] == "good"
        assert st["booted"]["release"] == "/bootimg/releases/1.0"
        assert st["rollback"]["minimum"] == 1      # raised only by a blessed boot, never by install
        boots = reboot(vm)
        assert boots == 1
        assert booted(vm)["version"] == "2.0"
        wait_blessed(vm)
        st = status(vm)
        by = entries(st)
        assert (by["2.0"]["state"], by["2.0"]["tries_left"]) == ("good", None)
        assert by["1.0"]["state"] == "good"                   # still in the loader's menu
        assert st["rollback"]["minimum"] == 2
        nv = sh(vm, "tpm2_nvread 0x01500016 | od -An -tx1 | tr -d ' \\n'")
        assert int(nv, 16) == 2                                # the TPM's own counter, read by tpm2-tools
        record = kpi_record(vm)
        hook_line = sh(vm, "journalctl -b -o cat --no-pager | grep -m1 'the rollback check'")
        # Both releases are intact in the shared store.
        push_keys(vm, fleet)
        for v in ("1.0", "2.0"):
            sh(vm, f"bootimg verify /sysroot/bootimg/releases/{v} --objects /sysroot/bootimg/objects "
                   "--key /run/release-2026.pub >/dev/null")
    entry = record["system"]["boot_entry"]
    assert entry["id"] == r2.entry and entry["tries_left"] == 2 and entry["tries_done"] == 1
    # The delta: one container's image and its changed file, against a full copy of 2.0.
    r2_objects = sum(p.stat().st_size for p in (r2.path / "objects").glob("??/*"))
    r2_images = sum(p.stat().st_size for p in (r2.path / "images").glob("*.cfs"))
    assert res["objects_transferred"] >= 1 and res["objects_present"] > 100 * res["objects_transferred"]
    assert res["bytes_transferred"] < r2_objects / 100
    # The hook's own time and its rollback check's (the TPM's NV counter read by raw commands).
    m = re.search(r"in (\d+\.\d) ms, the rollback check \(TPM\) (\d+\.\d\d) ms of it", hook_line)
    assert m, hook_line
    hook_ms, rollback_ms = float(m.group(1)), float(m.group(2))
    assert 0 < rollback_ms < hook_ms
    _print("rollback check", {"hook ms": hook_ms, "rollback check ms (TPM)": rollback_ms,
                              "share of the hook": round(rollback_ms / hook_ms, 4)})
    fleet.figures["install_seconds"] = res["seconds"]
    fleet.figures["install_wall"] = round(wall, 1)
    _print("update 1.0 -> 2.0", {
        "objects transferred": res["objects_transferred"], "objects present": res["objects_present"],
        "bytes transferred": res["bytes_transferred"], "bytes present": res["bytes_present"],
        "images bytes": res["images_bytes"], "kernel+initramfs bytes": res["boot_bytes"],
        "full copy bytes (objects + images)": r2_objects + r2_images, "install seconds (guest)": res["seconds"],
        "install wall seconds (ssh)": round(wall, 1), "release builds seconds": fleet.figures["build_seconds"],
        "r1 objects": len(list((r1.path / "objects").glob("??/*")))})


# -- 2. a bad update falls back by itself ----------------------------------------------------------------

def test_bad_update_is_tried_then_the_previous_release_boots_by_itself(fleet):
    with serving(fleet.top / "releases") as url, device(fleet.disk, fleet.tpm, log=fleet.top / "bad.log") as vm:
        assert booted(vm)["version"] == "2.0"
        sh(vm, f"bootimg install {url}/3.0/")
        assert status(vm)["next_boot"] == f"{fleet.r('3.0').entry}+3.conf"
        t0 = time.monotonic()
        boots = reboot(vm)
        fallback_seconds = time.monotonic() - t0
        assert booted(vm)["version"] == "2.0"
        st = status(vm)
        record = kpi_record(vm)
        failed = sh(vm, "journalctl -b -1 -u telemetry.service --no-pager -o cat | tail -20")
    by = entries(st)
    assert (by["3.0"]["state"], by["3.0"]["tries_left"], by["3.0"]["tries_done"]) == ("bad", 0, 3)
    assert "tries were used up" in by["3.0"]["reason"] and "telemetry.service" in by["3.0"]["reason"]
    assert by["2.0"]["state"] == "good" and st["booted"]["release"] == "/bootimg/releases/2.0"
    assert boots == 4                                       # three tries of 3.0, then 2.0
    entry = record["system"]["boot_entry"]
    assert entry["id"] == fleet.r("2.0").entry and entry["tries_left"] is None
    assert {e["id"]: e["state"] for e in entry["entries"]}[fleet.r("3.0").entry] == "bad"
    assert "telemetry 3.0 cannot start" in failed           # the persistent journal says why
    _print("automatic fallback 3.0 -> 2.0", {"kernels started": boots, "seconds from reboot to 2.0 up":
                                            round(fallback_seconds, 1)})


# -- 3. downgrades are refused ------------------------------------------------------------------------

def test_downgrade_by_picking_the_old_entry_is_refused(fleet, tmp_path):
    disk, tpm = copy_disk(fleet.disk, fleet.tpm, tmp_path / "d.raw")
    with device(disk, tpm, reboot=False) as vm:
        sh(vm, f"bootctl set-oneshot {fleet.r('1.0').entry}.conf")      # the loader's menu, as a person picks
        vm.run("systemctl --no-block reboot", check=False)
        deadline = time.monotonic() + 600
        while vm.qemu_running and time.monotonic() < deadline:           # -no-reboot: QEMU exits
            time.sleep(2)
    console = refused_boot(disk, tpm, tmp_path / "oneshot.log")
    assert "bootimg: FATAL: release 1.0 has security_version 1, below this device's minimum 2 (TPM NV 0x01500016)" \
        in console, console[-3000:]
    assert "mounted (trust" not in console


def test_downgrade_by_copying_the_old_signed_release_over_is_refused(fleet, tmp_path):
    from bootimg.board import diskedit

    disk, tpm = copy_disk(fleet.disk, fleet.tpm, tmp_path / "d.raw")
    r1 = fleet.r("1.0").path
    for name in ("release.json", "release.json.minisig"):
        diskedit.replace_file(disk, f"/bootimg/releases/2.0/{name}", (r1 / name).read_bytes())
    # 1.0's signed files under 2.0's name: 2.0's entry carries 2.0's digest
    console = refused_boot(disk, tpm, tmp_path / "copied.log")
    assert "mounted (trust" not in console
    assert "bootimg: FATAL: composefs.digest= on the kernel command line disagrees with the signed release.json" \
        in console, console[-3000:]
    # ... and with the entry edited to 1.0's digest and index too (root on the device; nothing on
    # the ESP is signed without Secure Boot): the device's minimum refuses it
    disk, tpm = copy_disk(fleet.disk, fleet.tpm, tmp_path / "e.raw")
    old = json.loads((r1 / "release.json").read_text())["root"]["kernel_argument"]
    entry = f"/efi/loader/entries/{fleet.r('2.0').entry}.conf"
    with device(disk, tpm, reboot=False) as vm:
        for name in ("release.json", "release.json.minisig"):
            sh(vm, f"cp /sysroot/bootimg/releases/1.0/{name} /sysroot/bootimg/releases/2.0/{name}")
        sh(vm, f"sed -i -e 's/composefs.digest=[^ ]*/{old}/' -e 's/bootimg.security_version=[0-9]*/"
               f"bootimg.security_version=1/' {entry} && grep -q '{old}' {entry} && sync")
        vm.run("systemctl --no-block reboot", check=False)
        deadline = time.monotonic() + 600
        while vm.qemu_running and time.monotonic() < deadline:           # -no-reboot: QEMU exits
            time.sleep(2)
    console = refused_boot(disk, tpm, tmp_path / "copied-and-edited.log")
    assert "mounted (trust" not in console
    assert "bootimg: FATAL: release 1.0 has security_version 1, below this device's minimum 2 (TPM NV 0x01500016)" \
        in console, console[-3000:]


def test_downgrade_with_the_state_file_deleted_is_refused_by_the_tpm(fleet, tmp_path):
    from bootimg.board import diskedit

    disk, tpm = copy_disk(fleet.disk, fleet.tpm, tmp_path / "d.raw")
    diskedit.remove(disk, "/bootimg/state/rollback")
    boot_dir = tmp_path / "esp"
    esp = esp_files(disk, boot_dir)
    entry = (esp / "loader" / "entries" / f"{fleet.r('1.0').entry}.conf").read_text()
    options = re.search(r"^options (.*)$", entry, re.M).group(1)
    kernel, initrd = (esp / f"bootimg/{NAME}/1.0/vmlinuz"), (esp / f"bootimg/{NAME}/1.0/initrd.img")
    console = refused_boot(disk, tpm, tmp_path / "nofile.log", kernel=kernel, initrd=initrd, append=options)
    assert "bootimg: FATAL: release 1.0 has security_version 1, below this device's minimum 2 (TPM NV 0x01500016)" \
        in console, console[-3000:]


def esp_files(disk: Path, dest: Path) -> Path:
    from bootimg.disk.gpt import ESP_TYPE, partitions

    esp = next(p for p in partitions(disk).values() if p.type == ESP_TYPE)
    dest.mkdir(parents=True)
    subprocess.run(["mcopy", "-s", "-n", "-i", f"{disk}@@{esp.offset}", "::/*", str(dest)], check=True,
                   capture_output=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    return dest


# -- 4. keys: who the device trusts -----------------------------------------------------------------

def test_untrusted_signer_is_refused_by_install_and_by_the_boot(fleet, tmp_path):
    from bootimg.board import diskedit
    from bootimg.release.description import canonical_json
    from bootimg.signing import generate_keypair, make_trusted_comment, sign

    evil_key, evil_pub = generate_keypair("someone else")
    forged = tmp_path / "releases" / "9.0"
    shutil.copytree(fleet.r("2.0").path, forged, symlinks=True)
    rel = json.loads((forged / "release.json").read_text())
    rel["version"], rel["security_version"] = "9.0", 9
    body = canonical_json(rel)
    (forged / "release.json").write_bytes(body)
    (forged / "release.json.minisig").write_bytes(
        sign(evil_key, body, make_trusted_comment(file="release.json", keyid=evil_key.keyid, timestamp=1767225600)))
    with serving(tmp_path / "releases") as url, device(fleet.disk, fleet.tpm) as vm:
        proc = vm.run(f"bootimg install {url}/9.0/", check=False, timeout=600)
        st = status(vm)
    assert proc.returncode == 1 and "not signed by a key this system trusts" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "9.0" not in entries(st)
    # The same files written over the installed 2.0 by someone with the disk: the boot refuses them.
    disk, tpm = copy_disk(fleet.disk, fleet.tpm, tmp_path / "d.raw")
    for name in ("release.json", "release.json.minisig"):
        diskedit.replace_file(disk, f"/bootimg/releases/2.0/{name}", (forged / name).read_bytes())
    console = refused_boot(disk, tpm, tmp_path / "forged.log")
    assert re.search(r"bootimg: FATAL: .*(signature|signed|key)", console, re.I), console[-3000:]


def test_same_index_boots_and_a_release_rotates_the_keys(fleet):
    with serving(fleet.top / "releases") as url, device(fleet.disk, fleet.tpm, log=fleet.top / "rotate.log") as vm:
        # 4.0 is signed by the next key only: this system does not trust it yet.
        proc = vm.run(f"bootimg install {url}/4.0/", check=False, timeout=600)
        assert proc.returncode == 1 and "not signed by a key this system trusts" in proc.stderr, proc.stderr
        sh(vm, f"bootimg install {url}/2.5/")            # index 2, like the blessed 2.0; trusts release-2027
        reboot(vm)
        assert booted(vm)["version"] == "2.5" and booted(vm)["security_version"] == 2
        wait_blessed(vm)
        sh(vm, f"bootimg install {url}/4.0/")            # now trusted: the running release rotated the keys
        st = status(vm)
    by = entries(st)
    assert by["2.5"]["state"] == "good" and by["4.0"]["state"] == "trying"
    assert st["rollback"]["minimum"] == 2


# -- 5. power loss during an install -------------------------------------------------------------------

def test_power_loss_during_an_install_never_stops_the_running_release(fleet):
    """QEMU killed at POWER_CUTS points spread over an install of 2.0 on the factory disk (1.0);
    each next boot is the running release (or 2.0 when the install had finished), and a re-run
    of the install completes."""
    disk, tpm = fleet.factory, fleet.factory_tpm
    span = max(fleet.figures.get("install_wall", 20.0), 5.0) * 1.2
    rng = random.Random(15)
    cuts = sorted(round(span * (i + rng.random()) / POWER_CUTS, 2) for i in range(POWER_CUTS))
    seen = []
    with serving(fleet.top / "releases") as url:
        for i, at in enumerate(cuts):
            with device(disk, tpm, log=fleet.top / f"cut-{i}.log") as vm:
                b = booted(vm)
                st = status(vm)
                by = entries(st)
                finished = "2.0" in by
                assert b["version"] == ("2.0" if finished and by["2.0"]["state"] != "bad" else "1.0"), (b, st)
                assert by["1.0"]["state"] == "good"
                push_keys(vm, fleet)
                sh(vm, "bootimg verify /sysroot/bootimg/releases/1.0 --objects /sysroot/bootimg/objects "
                       "--key /run/release-2026.pub >/dev/null")
                installer = subprocess.Popen(vm.ssh_argv(f"bootimg install {url}/2.0/"), stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
                time.sleep(at)
                vm.power_cut()
                installer.kill()
                installer.wait()
                seen.append((at, "installed" if finished else "not installed", b["version"]))
        with device(disk, tpm, log=fleet.top / "after-cuts.log") as vm:
            leftovers = status(vm)["store"]["unreferenced_objects"]
            gc = json.loads(sh(vm, "bootimg gc --json"))
            res = json.loads(sh(vm, f"bootimg install {url}/2.0/ --json"))
            st = status(vm)
            # A power cut during a boot of 2.0 cost it a try (it was never blessed): with its tries
            # used up the loader stays on 1.0, and a re-run of the install leaves the bad entry as is.
            on_new = sum(1 for s in seen if s[2] == "2.0")
            state = entries(st)["2.0"]["state"]
            assert (state == "bad") == (on_new >= 3), (on_new, st)
            reboot(vm)
            assert booted(vm)["version"] == ("1.0" if state == "bad" else "2.0")
    assert gc["objects_removed"] == leftovers
    fleet.figures["power_cuts"] = seen
    _print("power cuts (seconds into the install)", {"cuts": cuts, "before each next boot": [s[1] for s in seen],
                                                     "each boot ran": [s[2] for s in seen],
                                                     "objects left by cut installs": leftovers,
                                                     "re-run": {k: res[k] for k in ("objects_transferred",
                                                                                    "objects_present", "seconds")}})


# -- 6. garbage collection --------------------------------------------------------------------------------

def test_gc_frees_exactly_the_unreferenced_objects_and_keeps_every_installed_release(fleet):
    """On the device after the updates: every release an entry points at stays verifiable; an
    object no installed image references (an interrupted install's) is what goes, and nothing else."""
    from bootimg.signing import PublicKey

    next_key = PublicKey.from_file(fleet.top / "build" / "keys" / "release-2027.pub")
    with device(fleet.disk, fleet.tpm, log=fleet.top / "gc.log") as vm:
        # 4.0 booted: it trusts the next key only (the old one is dropped)
        assert booted(vm)["version"] == "4.0"
        assert sh(vm, "ls /usr/lib/bootimg/keys").split() == [f"{next_key.keyid}.pub"]
        push_keys(vm, fleet)
        before = status(vm)
        sh(vm, "mkdir -p /sysroot/bootimg/objects/ab && printf 'left by a cut install\\n' > "
               "/sysroot/bootimg/objects/ab/$(printf '%062d' 0)")
        dry = json.loads(sh(vm, "bootimg gc --dry-run --json"))
        gc = json.loads(sh(vm, "bootimg gc --json"))
        after = status(vm)
        for r in after["releases"]:
            sh(vm, f"bootimg verify /sysroot/bootimg/releases/{r['version']} --objects /sysroot/bootimg/objects "
                   "--key /run/release-2026.pub --key /run/release-2027.pub >/dev/null")
        again = json.loads(sh(vm, "bootimg gc --json"))
    assert dry["objects_removed"] == gc["objects_removed"] == before["store"]["unreferenced_objects"] + 1
    assert [r["entry"] for r in after["releases"]] == [r["entry"] for r in before["releases"]]
    assert after["store"]["objects"] == before["store"]["objects"] - before["store"]["unreferenced_objects"]
    assert after["store"]["unreferenced_objects"] == 0 and again["objects_removed"] == 0
    _print("gc", {"removed": gc["objects_removed"], "bytes freed": gc["bytes_freed"], "kept": gc["objects_kept"],
                  "store": after["store"]})
