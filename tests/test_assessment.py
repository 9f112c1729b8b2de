"""Boot assessment in the root image: boot-complete.target requires the manifest's units (default:
the essential containers), bootimg-bless.service runs after it, /efi is there for the ESP; and
systemd 252's own `systemd-analyze verify` accepts the units."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import have

from bootimg.boot import assessment, systemd_check
from bootimg.composefs.reader import load_image
from bootimg.manifest import load_manifest
from bootimg.manifest.model import Assessment
from bootimg.manifest.reserved import ASSESSMENT_DROPIN_NAME, BLESS_UNIT, SETUP_ROOT, UNIT_DIR
from bootimg.release.layout import ReleaseDir


@pytest.fixture(scope="module")
def manifest():
    from conftest import REPO

    return load_manifest(REPO / "manifests" / "ivi-demo.yaml", check_inputs=False, on_warning=None)


def test_good_boot_needs_the_essential_containers_by_default(manifest):
    assert manifest.good_boot_units() == ("vehicle-bus.service", "rear-camera.service")
    dropin = assessment.boot_complete_dropin(manifest)
    assert "Requires=vehicle-bus.service rear-camera.service" in dropin
    assert "After=vehicle-bus.service rear-camera.service" in dropin
    chosen = dataclasses.replace(manifest, boot=dataclasses.replace(
        manifest.boot, assessment=Assessment(tries=2, requires=("cluster", "ssh.service"))))
    assert "Requires=cluster.service ssh.service" in assessment.boot_complete_dropin(chosen)
    none = dataclasses.replace(manifest, boot=dataclasses.replace(manifest.boot, assessment=Assessment(tries=2,
                                                                                                   requires=())))
    assert "Requires=" not in assessment.boot_complete_dropin(none)


@pytest.mark.skipif(not have("systemd-analyze"), reason="needs systemd-analyze")
def test_systemd_accepts_the_assessment_units(manifest, tmp_path):
    files = {f"{UNIT_DIR}/{BLESS_UNIT}": assessment.bless_unit(manifest).encode(),
             f"{UNIT_DIR}/boot-complete.target.d/{ASSESSMENT_DROPIN_NAME}": assessment.boot_complete_dropin(
                 dataclasses.replace(manifest, boot=dataclasses.replace(
                     manifest.boot, assessment=Assessment(tries=3, requires=("systemd-journald.service",))))).encode(),
             f"{UNIT_DIR}/multi-user.target.d/{ASSESSMENT_DROPIN_NAME}": assessment.wants_bless(manifest).encode()}
    proc = systemd_check.systemd_verify(files, executables=[SETUP_ROOT], units=[BLESS_UNIT, "boot-complete.target"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = dict(files)
    broken[f"{UNIT_DIR}/{BLESS_UNIT}"] = assessment.bless_unit(manifest).replace("After=", "Aftr=").encode()
    proc = systemd_check.systemd_verify(broken, executables=[SETUP_ROOT], units=[BLESS_UNIT])
    assert "Unknown key 'Aftr'" in proc.stdout + proc.stderr


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
    assert f"ExecStart={SETUP_ROOT} bless" in bless.decode() and "After=boot-complete.target" in bless.decode()
    dropin = rel.read_file(root.lookup(f"{UNIT_DIR}/boot-complete.target.d/{ASSESSMENT_DROPIN_NAME}".lstrip("/").encode()))
    assert "Requires=vehicle-bus.service rear-camera.service" in dropin.decode()
