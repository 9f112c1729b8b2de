"""A device's releases, on the build host: `bootimg install`, `status` and `gc` against a disk
image (its data partition loop-mounted, its ESP through mtools) and against plain directories
standing for a mounted data partition and ESP. What happens at boot with them (boot counting,
fallback, rollback refusals) is tests/test_device_boot.py on the QEMU board."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, example_workspace, is_root, requires_root, run_cli
from test_disk import make_root

from bootimg.composefs.info import list_objects
from bootimg.composefs.reader import load_image

KVER = "6.12.0-test"
PARTUUID = "0f2a4c6e-8b1d-4e3f-a5c7-9d0b2e4f6a81"


def manifest(version: str, security_version: int, telemetry: str) -> str:
    return f"""\
apiVersion: bootimg/v1
identity: {{name: fleet, version: "{version}", source_date_epoch: 1767225600, security_version: {security_version}}}
rootfs:
  source: {{type: directory, path: rootfs}}
containers:
  - name: telemetry
    image: {{type: directory, path: {telemetry}}}
    command: [/usr/bin/telemetryd]
  - name: cluster
    image: {{type: oci, path: build/images/cluster, ref: latest}}
integrity:
  trust: signed
  trusted_keys: [build/keys/release-2026.pub, build/keys/release-2027.pub]
boot: {{kernel_args: ["console=ttyS0,115200"], assessment: {{tries: 3}}}}
"""


def build(top: Path, version: str, sv: int, *, key: str = "release-2026", changed: bool = False) -> Path:
    """A signed release with boot/ (a stand-in kernel + initramfs: booting is the VM test's)."""
    telemetry = "build/images/telemetry"
    if changed:                    # v2: the telemetry container gets a new program
        new = top / "telemetry-v2"
        if not new.exists():
            shutil.copytree(top / telemetry, new, symlinks=True)
            (new / "usr/bin/telemetryd").write_text("#!/bin/sh\necho telemetry 2.0\n" * 200)
        telemetry = "telemetry-v2"
    (top / f"m-{version}.yaml").write_text(manifest(version, sv, telemetry))
    out = top / f"rel-{version}"
    r = run_cli("build", str(top / f"m-{version}.yaml"), "-o", str(out), "--no-boot-check", "--force",
                "--key", str(top / "build" / "keys" / f"{key}.key"))
    assert r.returncode == 0, r.stderr.decode()
    boot = out / "boot"
    boot.mkdir(exist_ok=True)
    (boot / "vmlinuz").write_bytes(b"MZ kernel " * 1000)
    (boot / "initrd.img").write_bytes(f"initramfs of {version} ".encode() * 1000)
    (boot / "info.json").write_text(json.dumps({"kver": KVER, "arch": "amd64", "key": version}))
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    top = example_workspace(tmp_path_factory.mktemp("device"))
    make_root(top)
    return top


@pytest.fixture(scope="module")
def releases(ws) -> dict[str, Path]:
    return {"1.0": build(ws, "1.0", 1), "2.0": build(ws, "2.0", 2, changed=True)}


def objects_of(release: Path) -> dict[str, int]:
    rel = json.loads((release / "release.json").read_text())
    out = {}
    for entry in rel["images"].values():
        for obj in list_objects(load_image(release / entry["path"]).root):
            out[obj.decode()] = (release / "objects" / obj.decode()).stat().st_size
    return out


def dirs_target(top: Path) -> list[str]:
    (top / "data").mkdir(exist_ok=True)
    (top / "esp").mkdir(exist_ok=True)
    return ["--root", str(top / "data"), "--esp", str(top / "esp")]


def cli_json(*args: str) -> dict:
    r = run_cli(*args, "--json")
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def first_install(releases, target: list[str]) -> dict:
    """v1 onto an empty data partition and ESP, as a factory would (trusting the key given),
    then blessed as its first good boot would (systemd-bless-boot drops the counter)."""
    keys = releases["1.0"].parent / "build" / "keys"
    r = cli_json("install", str(releases["1.0"]), *target, "--key", str(keys / "release-2026.pub"),
                 "--data-partuuid", PARTUUID)
    entries = Path(target[target.index("--esp") + 1]) / "loader/entries"
    assert [p.name for p in entries.iterdir()] == ["bootimg-fleet-1.0+3.conf"]
    (entries / "bootimg-fleet-1.0+3.conf").rename(entries / "bootimg-fleet-1.0.conf")
    return r


def test_install_update_status_and_gc_on_directories(ws, releases, tmp_path):
    target = dirs_target(tmp_path)
    r1 = first_install(releases, target)
    v1, v2 = objects_of(releases["1.0"]), objects_of(releases["2.0"])
    assert r1["objects_transferred"] == len(v1) and r1["objects_present"] == 0
    # v2 is checked against the keys the installed v1 carries: no --key now
    r2 = cli_json("install", str(releases["2.0"]), *target)
    new = set(v2) - set(v1)
    assert r2["objects_transferred"] == len(new) and r2["bytes_transferred"] == sum(v2[o] for o in new)
    assert r2["objects_present"] == len(set(v2) & set(v1)) and r2["signed_by"]
    assert 0 < len(new) < len(v2)                   # only what changed (one container) came over
    assert r2["entry"] == "bootimg-fleet-2.0" and r2["release_path"] == "/bootimg/releases/2.0"
    data, esp = tmp_path / "data", tmp_path / "esp"
    entry = (esp / "loader/entries/bootimg-fleet-2.0+3.conf").read_text()
    assert "bootimg.release=/bootimg/releases/2.0" in entry and "bootimg.security_version=2" in entry
    assert (esp / "bootimg/fleet/2.0/initrd.img").read_bytes() == (releases["2.0"] / "boot/initrd.img").read_bytes()
    assert not (data / "bootimg/releases/2.0/objects").exists()
    assert sorted(os.listdir(data / "bootimg/releases")) == ["1.0", "2.0"]
    st = cli_json("status", *target)
    assert [(r["version"], r["state"], r["tries_left"]) for r in st["releases"]] == [("2.0", "trying", 3),
                                                                                     ("1.0", "good", None)]
    assert st["next_boot"] == "bootimg-fleet-2.0+3.conf"
    assert st["store"]["objects"] == len(set(v1) | set(v2)) and st["store"]["unreferenced_objects"] == 0
    assert st["store"]["shared_objects"] == len(set(v1) & set(v2))
    # installing it again changes nothing
    again = cli_json("install", str(releases["2.0"]), *target)
    assert again["already_installed"] and again["objects_transferred"] == 0
    # an entry a power cut left empty (FAT) is rewritten by the re-run, in its counting state
    (esp / "loader/entries/bootimg-fleet-2.0+3.conf").write_bytes(b"")
    cli_json("install", str(releases["2.0"]), *target)
    assert (esp / "loader/entries/bootimg-fleet-2.0+3.conf").read_text() == entry
    # gc with both entries: nothing goes; without v1's entry: v1 and its own objects go
    assert cli_json("gc", *target)["objects_removed"] == 0
    (esp / "loader/entries/bootimg-fleet-1.0.conf").unlink()
    g = cli_json("gc", *target)
    only_v1 = set(v1) - set(v2)
    assert g["removed_releases"] == ["/bootimg/releases/1.0"] and g["removed_kernel_dirs"] == ["bootimg/fleet/1.0"]
    assert g["objects_removed"] == len(only_v1) and g["bytes_freed"] == sum(v1[o] for o in only_v1)
    assert g["objects_kept"] == len(v2)
    assert sorted(os.listdir(data / "bootimg/releases")) == ["2.0"]
    st = cli_json("status", *target)
    assert [r["version"] for r in st["releases"]] == ["2.0"] and st["store"]["objects"] == len(v2)


def test_refusals_leave_the_device_as_it_was(ws, releases, tmp_path):
    target = dirs_target(tmp_path)
    first_install(releases, target)
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*")) + \
        sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "esp").rglob("*"))
    # signed only by a key the installed system does not trust (it trusts 2026 and 2027)
    run_cli("keygen", "--out", str(tmp_path), "--name", "evil")
    evil = build(ws, "3.0", 3)
    (evil / "release.json.minisig").unlink()
    r = run_cli("sign", str(evil / "release.json"), "--key", str(tmp_path / "evil.key"), "-o",
                str(evil / "release.json.minisig"))
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("install", str(evil), *target)
    assert r.returncode == 1 and "not signed by a key this system trusts" in r.stderr.decode()
    assert len(r.stderr.decode().strip().splitlines()) == 1
    # unsigned
    (evil / "release.json.minisig").unlink()
    r = run_cli("install", str(evil), *target)
    assert r.returncode == 1 and "is not signed" in r.stderr.decode()
    # a lower rollback index than the device's minimum (raised by a blessed boot of 2)
    (tmp_path / "data/bootimg/state/rollback").write_text("2\n")
    low = build(ws, "1.5", 1)
    r = run_cli("install", str(low), *target)
    assert r.returncode == 1
    assert "release 1.5 has security_version 1, below this device's minimum 2 (the state file /bootimg/state/rollback)" \
        in r.stderr.decode()
    (tmp_path / "data/bootimg/state/rollback").unlink()
    after = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*")) + \
        sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "esp").rglob("*"))
    assert after == before


def test_killed_installs_leave_the_running_release_and_a_rerun_completes(ws, releases, tmp_path):
    """SIGKILL at random points of an install (a process killed is what a power loss does to it,
    page cache aside): v1 stays whole and bootable, and the next run completes v2."""
    target = dirs_target(tmp_path)
    first_install(releases, target)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    cli_json("install", str(releases["2.0"]), *target)
    full = time.monotonic() - t0
    rng = random.Random(20261206)
    for i in range(10):
        shutil.rmtree(tmp_path / "data/bootimg/releases/2.0", ignore_errors=True)
        for e in (tmp_path / "esp/loader/entries").glob("bootimg-fleet-2.0*"):
            e.unlink()
        shutil.rmtree(tmp_path / "esp/bootimg/fleet/2.0", ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "bootimg", "install", str(releases["2.0"]), *target],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, max(0.1, full)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # v1: its release, its entry and its kernel are whole
        st = cli_json("status", *target)
        v1 = next(r for r in st["releases"] if r["version"] == "1.0")
        assert v1["state"] == "good" and v1["release_present"], st
        two = [r for r in st["releases"] if r["version"] == "2.0"]
        assert not two or two[0]["release_present"], (i, st)     # an entry is never there before its release
        r = cli_json("install", str(releases["2.0"]), *target)
        assert r["entry"] == "bootimg-fleet-2.0"
        assert not [p for p in (tmp_path / "data/bootimg/releases").iterdir() if p.name.startswith(".")]
    r = run_cli("verify", str(tmp_path / "data/bootimg/releases/2.0"), "--json")
    st = cli_json("status", *target)
    assert st["store"]["per_release"]["/bootimg/releases/2.0"]["missing"] == 0


def test_install_over_http_fetches_only_the_missing_objects(ws, releases, tmp_path):
    target = dirs_target(tmp_path)
    first_install(releases, target)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(releases["2.0"])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        r = cli_json("install", f"http://127.0.0.1:{port}/", *target)
    finally:
        server.terminate()
        log = server.communicate()[1].decode()
    v1, v2 = objects_of(releases["1.0"]), objects_of(releases["2.0"])
    new = set(v2) - set(v1)
    assert r["objects_transferred"] == len(new)
    fetched = [line for line in log.splitlines() if '"GET /objects/' in line]
    assert len(fetched) == len(new)                      # nothing the device had was downloaded


def test_install_from_a_tar_zst(ws, releases, tmp_path):
    target = dirs_target(tmp_path)
    first_install(releases, target)
    archive = tmp_path / "rel-2.0.tar.zst"
    subprocess.run(["tar", "--zstd", "-cf", str(archive), "-C", str(releases["2.0"].parent), releases["2.0"].name],
                   check=True)
    r = cli_json("install", str(archive), *target)
    assert r["version"] == "2.0" and r["objects_transferred"] > 0


@pytest.mark.skipif(not is_root(), reason="loop-mounts the disk's data partition")
def test_install_status_gc_on_a_disk_image(ws, releases, tmp_path):
    boot = releases["1.0"] / "boot"
    disk = tmp_path / "disk.raw"
    r = run_cli("disk", str(releases["1.0"]), "-o", str(disk), "--boot", str(boot))
    assert r.returncode == 0, r.stderr.decode()
    st = cli_json("status", "--disk", str(disk))
    assert [(r["version"], r["state"]) for r in st["releases"]] == [("1.0", "good")]
    r2 = cli_json("install", str(releases["2.0"]), "--disk", str(disk))
    new = set(objects_of(releases["2.0"])) - set(objects_of(releases["1.0"]))
    assert r2["objects_transferred"] == len(new) and r2["fsverity"].startswith("not supported here")
    st = cli_json("status", "--disk", str(disk))
    assert [(r["version"], r["state"], r["tries_left"]) for r in st["releases"]] == [("2.0", "trying", 3),
                                                                                     ("1.0", "good", None)]
    assert st["next_boot"] == "bootimg-fleet-2.0+3.conf"
    assert cli_json("gc", "--disk", str(disk))["objects_removed"] == 0
    # nothing stays mounted
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()


@requires_root
def test_a_full_esp_is_one_line_and_retiring_a_release_makes_room(ws, releases, tmp_path):
    """The ESP keeps a kernel and initramfs per installed release: when the next one does not
    fit, install says so in one line and leaves no half-written kernel; removing an entry (the
    loader's truth) and gc make room."""
    import subprocess

    target = dirs_target(tmp_path)
    esp = tmp_path / "esp"
    boot = sum(p.stat().st_size for p in (releases["1.0"] / "boot").iterdir())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={boot + 3 * 4096}", "tinyesp", str(esp)], check=True)
    try:
        first_install(releases, target)
        r = run_cli("install", str(releases["2.0"]), *target)
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode == 1 and lines[-1].startswith(f"bootimg install: {tmp_path / 'data'}: the ESP is full: no "
                                                          "room for the kernel and initramfs of 2.0"), lines
        assert "Traceback" not in r.stderr.decode()
        assert not (esp / "bootimg/fleet/2.0").exists()
        assert sorted(p.name for p in (esp / "loader/entries").iterdir()) == ["bootimg-fleet-1.0.conf"]
        (esp / "loader/entries/bootimg-fleet-1.0.conf").unlink()        # retire 1.0
        cli_json("gc", *target)
        keys = releases["1.0"].parent / "build" / "keys"
        again = cli_json("install", str(releases["2.0"]), *target, "--key", str(keys / "release-2026.pub"),
                         "--data-partuuid", PARTUUID)
        assert again["entry"] == "bootimg-fleet-2.0" and (esp / "bootimg/fleet/2.0/vmlinuz").is_file()
    finally:
        subprocess.run(["umount", str(esp)], check=True)
