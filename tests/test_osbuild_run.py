"""bootimg's stages in upstream osbuild, for real: osbuild from ../shared/osbuild (a libdir
copy with osbuild/org.bootimg.* added, tools/osbuild_libdir.py), bubblewrap and
python3-jsonschema from Debian, the host as the build root with bootimg installed into its
system Python (tools/install-buildroot.sh; Debian 12's python3 3.11 and its own cryptography,
zstandard, xxhash, jsonschema and yaml: the lowest versions bootimg supports).

- osbuild/example-manifest.json: a signed release with two containers comes out of --export,
  verifies, and is byte-identical to `bootimg build` on the same inputs; its disk (upstream
  truncate, sfdisk, write-device, mkfs.ext4 and copy stages around org.bootimg.disk-tree) holds
  what `bootimg disk` puts on one.
- osbuild itself refuses bad stage options (a bad name, a host path) before running anything.
- A signing key the manifest's trusted keys do not list, an input location naming no input,
  bootimg missing from the build root or too old: the stage fails with one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, have, is_root, run_cli

sys.path.insert(0, str(REPO / "tools"))
import osbuild_example  # noqa: E402
import osbuild_libdir  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"
CHECKPOINTS = ("os", "telemetry-image")

pytestmark = pytest.mark.skipif(not is_root(), reason="osbuild needs root")


class Osbuild:
    """Upstream osbuild run the way a user runs it, with one store for the module's runs."""

    def __init__(self, top: Path):
        self.top = top
        self.libdir = osbuild_libdir.make_libdir(top / "lib")
        self.store = top / "store"
        self.runs = 0

    def run(self, manifest: dict, *exports: str, prelude: str = "") -> tuple[subprocess.CompletedProcess, dict, Path]:
        """osbuild --json on ``manifest``, exporting ``exports``; ``prelude`` (shell) runs first in
        a private mount namespace. Returns the process, osbuild's JSON result and the output dir."""
        self.runs += 1
        path = self.top / f"manifest-{self.runs}.json"
        path.write_text(json.dumps(manifest, indent=1))
        out = self.top / f"out-{self.runs}"
        argv = [SYSTEM_PYTHON, "-m", "osbuild", "--libdir", str(self.libdir), "--store", str(self.store), "--json",
                *[a for c in CHECKPOINTS for a in ("--checkpoint", c)],
                *[a for e in exports for a in ("--export", e)], "--output-directory", str(out), str(path)]
        if prelude:
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", f'{prelude}\nexec "$@"', "sh", *argv]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(self.libdir), "LC_ALL": "C.UTF-8"}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1200, cwd=self.top)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert lines, f"osbuild printed no JSON result (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc, json.loads(lines[-1]), out


@pytest.fixture(scope="module")
def osbuild(tmp_path_factory) -> Osbuild:
    missing = [tool for tool in ("bwrap", "unshare", "sfdisk", "debugfs", "mcopy") if not have(tool)]
    if missing or not (osbuild_libdir.SNAPSHOT / "osbuild").is_dir() or not Path("/etc/containers").is_dir():
        pytest.fail(f"osbuild cannot run here (missing: {missing or 'the snapshot or /etc/containers'}); run make setup")
    subprocess.run(["sh", str(REPO / "tools" / "install-buildroot.sh")], check=True)
    return Osbuild(tmp_path_factory.mktemp("osbuild"))


# What osbuild's Debian runner (org.osbuild.debian) prints before any stage: systemd-tmpfiles
# notes on the host's tmpfiles.d in the sandbox.
RUNNER_NOTE = re.compile(r"^/usr/lib/tmpfiles\.d/\S+:\d+: |^Failed to parse ACL \"[^\"]*\": .*Ignoring$")


def stage_failure(proc: subprocess.CompletedProcess, result: dict, stage: str) -> str:
    """The one line a failed stage printed (its output has no other line, and no traceback)."""
    assert proc.returncode != 0 and result["success"] is False, proc.stdout
    failed = result["error"]["details"]["stage"]
    assert failed["type"] == stage, failed
    lines = [line for line in failed["output"].splitlines() if line.strip() and not RUNNER_NOTE.match(line)]
    assert "Traceback" not in failed["output"], failed["output"]
    assert len(lines) == 1 and lines[0].startswith(f"{stage}: "), failed["output"]
    return lines[0]


@pytest.fixture(scope="module")
def example_run(osbuild) -> tuple[Path, dict]:
    """The example manifest as committed, run with its release and its disk exported."""
    manifest = json.loads((REPO / "osbuild" / "example-manifest.json").read_text())
    proc, result, out = osbuild.run(manifest, "release", "image")
    assert proc.returncode == 0 and result["success"], proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def example(example_run) -> Path:
    return example_run[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The example's inputs as files, and bootimg.yaml: the same release for `bootimg build`."""
    top = tmp_path_factory.mktemp("example-inputs")
    osbuild_example.write_inputs(top)
    return top


def no_boot_check() -> list[str]:
    """``--no-boot-check`` where `bootimg build` has a pre-flight boot check (the example's root
    cannot boot)."""
    return ["--no-boot-check"] if "--no-boot-check" in run_cli("build", "--help").stdout.decode() else []


def tree(top: Path) -> dict[str, tuple]:
    """Every entry under ``top``: kind, mode, owner, content or link target."""
    out = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        rel = path.relative_to(top).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path), st.st_uid, st.st_gid)
        elif path.is_dir():
            out[rel] = ("dir", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid)
        else:
            out[rel] = ("file", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, path.read_bytes())
    return out


def test_example_release_verifies_and_equals_bootimg_build(example_run, inputs, tmp_path):
    example, result = example_run
    release = example / "release" / "composefs"
    res = run_cli("verify", str(release), "--key", str(inputs / "release-2026.pub"))
    assert res.returncode == 0, res.stderr.decode()
    described = json.loads((release / "release.json").read_text())
    assert sorted(described["images"]) == ["rear-camera", "root", "telemetry"]
    metadata = result["metadata"]["release"]["org.bootimg.build"]       # the stage's osbuild metadata
    assert metadata["composefs-digest"] == described["root"]["digest"]
    assert metadata["images"] == {name: e["digest"] for name, e in described["images"].items()}
    assert (release / "release.json.minisig").is_file()

    host = tmp_path / "host"
    res = run_cli("build", str(inputs / "bootimg.yaml"), "-o", str(host), "--key", str(inputs / "release-2026.key"),
                  *no_boot_check())
    assert res.returncode == 0, res.stderr.decode()
    assert tree(release) == tree(host)     # every file, byte for byte, and the same modes


def test_root_tarball_as_a_files_input(osbuild, example):
    """The root tarball itself (type tar, an org.osbuild.files input) instead of the untarred
    tree: the same release (the example's root has no xattrs or hardlinks untar would lose)."""
    manifest = variant(os=None)
    stage = next(p for p in manifest["pipelines"] if p["name"] == "release")["stages"][0]
    untar = manifest["pipelines"][0]["stages"][0]
    stage["inputs"] = {k: v for k, v in stage["inputs"].items() if v is not None}
    stage["inputs"]["root"] = untar["inputs"]["file"]
    stage["options"]["manifest"]["rootfs"]["source"] = {"type": "tar", "path": "input://root"}
    proc, result, out = osbuild.run(manifest, "release")
    assert proc.returncode == 0 and result["success"], proc.stdout[-3000:]
    assert tree(out / "release" / "composefs") == tree(example / "release" / "composefs")


def partitions(disk: Path) -> list[dict]:
    out = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]["partitions"]


def esp_files(disk: Path, dest: Path) -> Path:
    esp = partitions(disk)[0]
    dest.mkdir()
    subprocess.run(["mcopy", "-s", "-n", "-i", f"{disk}@@{esp['start'] * 512}", "::/*", str(dest)], check=True,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, capture_output=True)
    return dest


def data_files(disk: Path, dest: Path) -> Path:
    data = partitions(disk)[1]
    dest.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump /bootimg {dest}", f"{disk}?offset={data['start'] * 512}"], check=True,
                   capture_output=True)
    return dest / "bootimg"


def test_example_disk_holds_what_bootimg_disk_puts_there(example, inputs, tmp_path):
    disk = example / "image" / "disk.raw"
    parts = partitions(disk)
    assert [(p["name"], p["uuid"].lower()) for p in parts] == [
        ("esp", osbuild_example.ESP_UUID), ("bootimg-data", osbuild_example.DATA_UUID)]
    release = example / "release" / "composefs"
    digest = json.loads((release / "release.json").read_text())["root"]["kernel_argument"]

    # The release on the data partition verifies; the root's /var is the initial state.
    data = data_files(disk, tmp_path / "data")
    version = json.loads((release / "release.json").read_text())["version"]
    res = run_cli("verify", str(data / "releases" / version), "--objects", str(data / "objects"),
                  "--key", str(inputs / "release-2026.pub"))
    assert res.returncode == 0, res.stderr.decode()
    state = data / "state" / "var" / "lib" / "example" / "state"
    assert state.read_bytes() == b"the initial persistent /var\n"
    assert (state.stat().st_uid, oct(state.stat().st_mode & 0o777)) == (1000, "0o640")
    assert not (data / "state" / "var" / "cache" / "example").exists()      # excluded from the root image
    stats = subprocess.run(["debugfs", "-R", "stats", f"{disk}?offset={parts[1]['start'] * 512}"],
                           capture_output=True, text=True, check=True).stdout
    assert "verity" in next(line for line in stats.splitlines() if line.startswith("Filesystem features:"))

    # `bootimg disk` of the same release, kernel and initramfs: the same ESP files (the entry
    # names the data partition by its own PARTUUID) and the same data partition.
    boot = tmp_path / "boot"
    boot.mkdir()
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy(inputs / name, boot / name)
    (boot / "info.json").write_text(json.dumps({"kver": "example", "arch": "amd64"}))
    own = tmp_path / "own.raw"
    res = run_cli("disk", str(release), "-o", str(own), "--boot", str(boot), "--esp-size", "64M")
    assert res.returncode == 0, res.stderr.decode()
    ours, theirs = tree(esp_files(disk, tmp_path / "esp")), tree(esp_files(own, tmp_path / "own-esp"))
    entry = "loader/entries/bootimg-osbuild-example-1.0.conf"
    own_uuid = partitions(own)[1]["uuid"].lower()
    assert f"root=PARTUUID={osbuild_example.DATA_UUID} rw {digest}" in ours[entry][4].decode()
    theirs[entry] = theirs[entry][:4] + (theirs[entry][4].replace(own_uuid.encode(),
                                                                  osbuild_example.DATA_UUID.encode()),)
    assert ours == theirs
    assert ours["bootimg/osbuild-example/1.0/vmlinuz"][4] == (inputs / "vmlinuz").read_bytes()
    assert tree(data) == tree(data_files(own, tmp_path / "own-data"))


def variant(**inputs: dict) -> dict:
    """The example manifest with the release stage's inputs changed."""
    manifest = json.loads((REPO / "osbuild" / "example-manifest.json").read_text())
    stage = next(p for p in manifest["pipelines"] if p["name"] == "release")["stages"][0]
    stage["inputs"].update(inputs)
    return manifest


def release_options(manifest: dict) -> dict:
    return next(p for p in manifest["pipelines"] if p["name"] == "release")["stages"][0]["options"]


@pytest.mark.parametrize("change,where", [
    (lambda o: o["manifest"]["containers"][1].update(name="Rear_Camera"), ["name"]),
    (lambda o: o["manifest"]["integrity"]["trusted_keys"].append("/etc/bootimg/release-2028.pub"), ["integrity"]),
    (lambda o: o["manifest"]["rootfs"].update(source={"type": "directory", "path": "/srv/rootfs"}), ["rootfs"]),
])
def test_osbuild_refuses_bad_options_before_running(osbuild, change, where):
    manifest = variant()
    change(release_options(manifest))
    proc, result, out = osbuild.run(manifest, "release")
    assert proc.returncode == 2 and result["success"] is False
    errors = result["errors"]
    assert errors and all(e["path"][:4] == ["pipelines", 2, "stages", 0] for e in errors), errors
    assert any(set(where) <= set(map(str, e["path"])) for e in errors), errors
    assert "log" not in result and not out.exists()        # refused before any pipeline ran


def test_unlisted_signing_key_fails_the_stage_in_one_line(osbuild, tmp_path):
    """The key comes through org.osbuild.curl from a file:// URL, as a test's files do."""
    key = tmp_path / "release-2030.key"
    key.write_bytes(osbuild_example.key("release-2030").to_bytes())
    checksum = osbuild_example.checksum(key.read_bytes())
    manifest = variant(**{"signing-key": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                                          "references": {checksum: {}}}})
    manifest["sources"]["org.osbuild.curl"] = {"items": {checksum: {"url": f"file://{key}"}}}
    proc, result, out = osbuild.run(manifest, "release")
    line = stage_failure(proc, result, "org.bootimg.build")
    trusted = sorted(osbuild_example.key(n).keyid for n in ("release-2026", "release-2027"))
    assert line == (f"org.bootimg.build: options.manifest: signing key {osbuild_example.key('release-2030').keyid} is "
                    f"not among the manifest's trusted keys ({', '.join(trusted)}): the initramfs would refuse this "
                    "release")
    assert not out.exists()


def test_location_naming_no_input_fails_the_stage_in_one_line(osbuild):
    manifest = variant()
    release_options(manifest)["manifest"]["rootfs"]["add_files"][1]["source_path"] = "input://banner"
    proc, result, _ = osbuild.run(manifest, "release")
    assert stage_failure(proc, result, "org.bootimg.build") == (
        "org.bootimg.build: options.manifest: rootfs.add_files[1].source_path: input://banner: the stage has no "
        "input named 'banner' (its inputs: camera, keys, motd, os, signing-key, telemetry)")


def site_packages() -> str:
    """Where the build root's python3 has bootimg (/usr/local/lib/python3.X/dist-packages)."""
    return subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import bootimg, os; print(os.path.dirname(os.path.dirname("
                           "bootimg.__file__)))"], capture_output=True, text=True, check=True, cwd="/").stdout.strip()


def test_bootimg_missing_from_the_build_root_is_one_line(osbuild):
    """The same run, with the build root's site-packages hidden (a private mount namespace)."""
    proc, result, _ = osbuild.run(variant(), "release", prelude=f"mount -t tmpfs tmpfs {site_packages()}")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert stage_failure(proc, result, "org.bootimg.build") == (
        f"org.bootimg.build: bootimg is not installed in the build root: {SYSTEM_PYTHON} (Python {version}) "
        "cannot import it")


def test_bootimg_too_old_in_the_build_root_is_one_line(osbuild):
    """A bootimg without the stages' package (as before them) in the build root."""
    site = site_packages()
    prelude = (f"mount -t tmpfs tmpfs {site}\nmkdir {site}/bootimg\n"
               f"echo '__version__ = \"0.0.9\"' > {site}/bootimg/__init__.py")
    proc, result, _ = osbuild.run(variant(), "release", prelude=prelude)
    assert stage_failure(proc, result, "org.bootimg.build") == (
        "org.bootimg.build: bootimg 0.0.9 in the build root is too old for this stage (No module named "
        "'bootimg.stages')")
