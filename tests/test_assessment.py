"""Boot assessment in the root image: boot-complete.target requires the manifest's units (default:
the essential containers), bootimg-bless.service runs after it, /efi is there for the ESP; and
systemd 252's own `systemd-analyze verify` accepts the units."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from conftest import have, nspawn_report

from bootimg.boot import assessment, systemd_check
from bootimg.composefs.reader import load_image
from bootimg.manifest import load_manifest
from bootimg.manifest.model import Assessment
from bootimg.manifest.reserved import (
    ASSESS_PROGRAM,
    ASSESS_UNIT,
    ASSESSMENT_DROPIN_NAME,
    BLESS_GENERATOR_MASK,
    BLESS_TIMER,
    BLESS_UNIT,
    SETUP_ROOT,
    UNIT_DIR,
)
from bootimg.release.layout import ReleaseDir


@pytest.fixture(scope="module")
def manifest():
    from conftest import REPO

    return load_manifest(REPO / "manifests" / "ivi-demo.yaml", check_inputs=False, on_warning=None)


def test_good_boot_needs_the_essential_containers_by_default(manifest):
    assert manifest.good_boot_units() == ("vehicle-bus.service", "rear-camera.service")
    assess = assessment.assess_unit(manifest)
    assert "Requires=vehicle-bus.service rear-camera.service" in assess
    assert "After=vehicle-bus.service rear-camera.service" in assess
    assert f"ExecStart={ASSESS_PROGRAM} vehicle-bus.service rear-camera.service" in assess
    assert f"Requires={ASSESS_UNIT}" in assessment.boot_complete_dropin(manifest)
    timer = assessment.bless_timer(manifest)
    assert "After=vehicle-bus.service rear-camera.service" in timer and "OnActiveSec=10000ms" in timer
    chosen = dataclasses.replace(manifest, boot=dataclasses.replace(
        manifest.boot, assessment=Assessment(tries=2, requires=("cluster", "ssh.service"), settle_ms=500)))
    assert "Requires=cluster.service ssh.service" in assessment.assess_unit(chosen)
    assert "OnActiveSec=500ms" in assessment.bless_timer(chosen)
    none = dataclasses.replace(manifest, boot=dataclasses.replace(manifest.boot, assessment=Assessment(tries=2, settle_ms=10000,
                                                                                                   requires=())))
    assert "Requires=" not in assessment.assess_unit(none) and "After=" not in assessment.bless_timer(none)
    # The rollback minimum is raised only after the loader's entry is good.
    bless = assessment.bless_unit(manifest)
    assert "Requires=boot-complete.target\n" in bless and "Wants=systemd-bless-boot.service" in bless
    assert "ExecCondition=/bin/sh -c '! test -e /sys/firmware/efi/efivars/LoaderBootCountPath-" in bless
    assert "After=local-fs.target boot-complete.target systemd-bless-boot.service" in bless
    # Neither the timer nor the blessing holds up the boot's completion (no default dependencies).
    assert "DefaultDependencies=no" in bless and "DefaultDependencies=no" in timer


@pytest.mark.skipif(not have("systemd-analyze"), reason="needs systemd-analyze")
def test_systemd_accepts_the_assessment_units(manifest, tmp_path):
    from bootimg.release.build import BuildContext

    chosen = dataclasses.replace(manifest, boot=dataclasses.replace(
        manifest.boot, assessment=Assessment(tries=3, settle_ms=10000, requires=("systemd-journald.service",))))
    files = {f.path: (f.content, f.mode) for f in assessment.contribute(BuildContext(manifest=chosen, store=None, out=None))}
    units = [BLESS_UNIT, BLESS_TIMER, ASSESS_UNIT, "boot-complete.target"]
    proc = systemd_check.systemd_verify(files, executables=[SETUP_ROOT, "/bin/sh"], units=units)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = dict(files)
    broken[f"{UNIT_DIR}/{BLESS_TIMER}"] = (assessment.bless_timer(chosen).replace("OnActiveSec=", "OnActivSec=").encode(),
                                           0o644)
    proc = systemd_check.systemd_verify(broken, executables=[SETUP_ROOT], units=[BLESS_TIMER])
    assert "Unknown key 'OnActivSec'" in proc.stdout + proc.stderr


@pytest.mark.skipif(not have("shellcheck"), reason="needs shellcheck")
def test_the_assessment_script_is_posix_and_shellcheck_clean(tmp_path):
    import subprocess

    script = tmp_path / "bootimg-assess"
    script.write_text(assessment.ASSESS_SCRIPT)
    proc = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_the_built_root_carries_them(tmp_path):
    from conftest import example_workspace, run_cli

    ws = example_workspace(tmp_path / "ws")
    r = run_cli("build", str(ws / "manifests" / "ivi-demo.yaml"), "-o", str(tmp_path / "rel"), "--no-boot-check",
                "--key", str(ws / "build" / "keys" / "release-2026.key"))
    assert r.returncode == 0, r.stderr.decode()
    rel = ReleaseDir(tmp_path / "rel")
    root = load_image(rel.image_path("root")).root
    efi = root.lookup(b"efi")
    assert efi is not None and efi.is_dir() and not efi.children
    bless = rel.read_file(root.lookup(f"{UNIT_DIR}/{BLESS_UNIT}".lstrip("/").encode()))
    assert f"ExecStart={SETUP_ROOT} bless" in bless.decode() and "After=local-fs.target boot-complete.target" in bless.decode()
    dropin = rel.read_file(root.lookup(f"{UNIT_DIR}/boot-complete.target.d/{ASSESSMENT_DROPIN_NAME}".lstrip("/").encode()))
    assert f"Requires={ASSESS_UNIT}" in dropin.decode()
    assess = rel.read_file(root.lookup(f"{UNIT_DIR}/{ASSESS_UNIT}".lstrip("/").encode()))
    assert "Requires=vehicle-bus.service rear-camera.service" in assess.decode()
    script = root.lookup(ASSESS_PROGRAM.lstrip("/").encode())
    assert script.mode & 0o777 == 0o755 and rel.read_file(script).decode() == assessment.ASSESS_SCRIPT
    mask = root.lookup(BLESS_GENERATOR_MASK.lstrip("/").encode())
    assert mask.is_symlink() and mask.payload == b"/dev/null"


# -- the assessment in a real systemd 252 (systemd-nspawn) ---------------------------------------------

REPORT = """[Unit]
Description=test report
After=multi-user.target
[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/console
ExecStart=/bin/sh -c 'sleep 7; echo ==REPORT==; for u in bootimg-bless.timer bootimg-assess.service \
boot-complete.target systemd-bless-boot.service bootimg-bless.service; do \
echo "STATE $u $(systemctl show -P ActiveState $u) $(systemctl show -P Result $u)"; done; \
journalctl -q --no-pager -o cat -u bootimg-assess.service | sed "s/^/LOG /"; \
cat /run/blessed 2>/dev/null; echo ==END==; systemctl poweroff'
"""
SERVICES = {
    "good.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    # starts, then fails a moment later, again and again (restart: on-failure)
    "flaky.service": "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sh -c 'sleep 0.5; exit 3'\n"
                     "Restart=on-failure\nRestartSec=100ms\n",
    "booted.service": "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'mkdir -p /run/bootimg; echo {} >/run/bootimg/booted.json'\n",
}


def _boot_assessment(manifest, tmp_path: Path, requires: tuple[str, ...]) -> tuple[list[str], str]:
    """Boot systemd in nspawn with the assessment units of a manifest that needs ``requires``
    (bootimg-setup-root replaced by a script that records the blessing): the report's lines."""

    from bootimg.release.build import BuildContext

    m = dataclasses.replace(manifest, boot=dataclasses.replace(
        manifest.boot, assessment=Assessment(tries=3, requires=requires, settle_ms=2000)))
    ns, usr = tmp_path / "ns", tmp_path / "usr"
    for f in assessment.contribute(BuildContext(manifest=m, store=None, out=None)):
        dest = usr / f.path.removeprefix("/usr/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.content)
        dest.chmod(f.mode)
    fake = usr / SETUP_ROOT.removeprefix("/usr/")
    fake.write_text("#!/bin/sh\necho \"BLESSED $*\" >/run/blessed\n")
    fake.chmod(0o755)
    etc = ns / "etc/systemd/system"
    (etc / "multi-user.target.wants").mkdir(parents=True)
    for name, text in SERVICES.items():
        (etc / name).write_text(text)
        (etc / "multi-user.target.wants" / name).symlink_to(f"../{name}")
    (etc / "booted.service").write_text(SERVICES["booted.service"] + "[Unit]\nBefore=bootimg-bless.service\n")
    (ns / "etc/systemd/system-generators").mkdir(parents=True)
    (ns / "etc/systemd/system-generators/systemd-bless-boot-generator").symlink_to("/dev/null")
    return nspawn_report(ns, usr, REPORT)


@pytest.mark.kernel
@pytest.mark.skipif(not have("systemd-nspawn"), reason="needs systemd-nspawn (Debian: systemd-container)")
def test_a_unit_that_fails_after_it_started_leaves_the_boot_unblessed(manifest, tmp_path):
    """A container that starts and exits a moment later (restarted, failing again) must not make
    its release good: the assessment runs once the units have settled, and the rollback minimum
    is not raised. With the units up and never restarted, the boot is blessed (systemd-bless-boot
    is skipped where the loader counts no tries: no EFI here)."""
    from conftest import is_root

    if not is_root():
        pytest.skip("mounts and boots a container: needs root")
    lines, report = _boot_assessment(manifest, tmp_path / "good", ("good.service",))
    assert "STATE bootimg-assess.service active success" in lines, report
    assert "STATE bootimg-bless.service active success" in lines, report
    assert "STATE systemd-bless-boot.service inactive success" in lines, report     # condition: not counted
    assert "BLESSED bless" in lines, report
    assert "LOG bootimg: this boot is good: good.service up, never restarted" in lines, report

    lines, report = _boot_assessment(manifest, tmp_path / "flaky", ("good.service", "flaky.service"))
    assert "STATE bootimg-assess.service failed exit-code" in lines, report
    assert not any(x.startswith("BLESSED") for x in lines), report
    assert not any(x.startswith("STATE bootimg-bless.service active") for x in lines), report
    assert any(re.match(r"LOG bootimg: this boot is not good: flaky\.service is \w+ after [1-9]\d* restarts", x)
               for x in lines), report
