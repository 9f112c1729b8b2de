"""`bootimg verify` trusts nothing by accident: who signed a release is only checked against a
key the user gives; every object file is checked, referenced or not; sharing.json is
recomputed; a bad signature is reported first and clearly; odd files (FIFOs, huge sparse
images, deep JSON, paths out of the release) are one line each, never a hang or a traceback."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import example_workspace, run_cli

from bootimg.composefs import fsverity
from bootimg.composefs.reader import load_image
from bootimg.composefs.writer import write_image
from bootimg.release.build import IMAGE_OPTIONS
from bootimg.release.description import canonical_json


def build(manifest: Path, out: Path, key: Path | None = None) -> subprocess.CompletedProcess:
    """`bootimg build` of an example manifest (the one place its command line is made here)."""
    return run_cli("build", str(manifest), "-o", str(out), "--no-boot-check", *(["--key", str(key)] if key else []))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return example_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="module")
def release(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "release"
    res = build(workspace / "manifests" / "ivi-demo.yaml", out, workspace / "build" / "keys" / "release-2026.key")
    assert res.returncode == 0, res.stderr.decode()
    return out


@pytest.fixture
def copy(release, tmp_path) -> Path:
    dst = tmp_path / "rel"
    shutil.copytree(release, dst)
    return dst


def pub(ws: Path, name: str = "release-2026") -> str:
    return str(ws / "build" / "keys" / f"{name}.pub")


def verify(out: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`bootimg verify` in a subprocess that must end within ``timeout`` (a hang fails)."""
    env = dict(os.environ)
    env.pop("CFS_PARSE_STRICT", None)
    return subprocess.run([sys.executable, "-m", "bootimg", "verify", str(out), *args], env=env,
                          capture_output=True, timeout=timeout)


# Runs a command and prints its peak RSS in KiB last: a parent of its own, small, because a child
# this pytest process starts would carry pytest's high-water mark (Linux keeps it across exec).
_RSS_PARENT = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
               "sys.stderr.buffer.write(r.stderr)\n"
               "sys.stdout.buffer.write(r.stdout + b'\\nRSS %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(r.returncode)\n")


def verify_rss(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """verify, and its peak RSS in MB."""
    res = subprocess.run([sys.executable, "-c", _RSS_PARENT, sys.executable, "-m", "bootimg", "verify", str(out), *args],
                         capture_output=True, timeout=120)
    stdout, _, rss = res.stdout.rpartition(b"\nRSS ")
    return subprocess.CompletedProcess(res.args, res.returncode, stdout, res.stderr), int(rss) / 1024


def problems(res: subprocess.CompletedProcess) -> list[str]:
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    return err.strip().splitlines()


def rewrite_release(out: Path, edit) -> None:
    rel = json.loads((out / "release.json").read_bytes())
    edit(rel)
    (out / "release.json").write_bytes(canonical_json(rel))


def set_image(rel: dict, name: str, digest: str, size: int) -> None:
    rel["images"][name]["digest"] = digest
    rel["images"][name]["size"] = size
    if rel["root"]["image"] == name:
        rel["root"]["digest"] = digest
        rel["root"]["kernel_argument"] = f"composefs.digest=v1-sha256-12:{digest}"
        rel["kernel_arguments"][0] = rel["root"]["kernel_argument"]


# -- who signed it -----------------------------------------------------------------------------------

def test_without_key_verify_says_it_proves_nothing_about_the_signer(workspace, release):
    assert (release / "sandbox.json").is_file()      # a report of the build: part of the release
    res = verify(release)
    assert res.returncode == 3, res.stderr.decode()
    assert b"NOT AUTHENTICATED" in res.stdout and b"proves nothing about who signed it" in res.stdout
    doc = json.loads(verify(release, "--json").stdout)
    assert doc["status"] == "consistent" and doc["authenticated"] is False and doc["problems"] == []
    res = verify(release, "--key", pub(workspace))
    assert res.returncode == 0, res.stderr.decode()
    assert b"OK" in res.stdout and b"NOT AUTHENTICATED" not in res.stdout
    doc = json.loads(verify(release, "--key", pub(workspace), "--json").stdout)
    assert doc["status"] == "authenticated" and doc["authenticated"] is True
    assert doc["signed_by"] == json.loads(verify(release, "--json").stdout)["signed_by"]


def test_release_rebuilt_and_signed_by_an_attacker(workspace, tmp_path):
    """The attacker's release is consistent with itself (its root carries the attacker's key),
    so only a key the user gives can tell."""
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, symlinks=True)
    assert run_cli("keygen", "--out", str(tmp_path), "--name", "evil").returncode == 0
    manifest = ws / "manifests" / "ivi-demo.yaml"
    text = manifest.read_text().replace("../build/keys/release-2026.pub", str(tmp_path / "evil.pub"))
    manifest.write_text(text.replace("    - ../build/keys/release-2027.pub", ""))
    out = tmp_path / "evil-release"
    res = build(manifest, out, tmp_path / "evil.key")
    assert res.returncode == 0, res.stderr.decode()
    res = verify(out)
    assert res.returncode == 3 and b"NOT AUTHENTICATED" in res.stdout
    res = verify(out, "--key", pub(workspace), "--key", pub(workspace, "release-2027"))
    assert res.returncode == 1
    lines = problems(res)
    assert lines[0].startswith(f"{out}/release.json: ") and "not signed by a trusted key" in lines[0], lines


def test_sealed_release_signed_with_key_passes_its_own_verify(workspace, tmp_path):
    out = tmp_path / "sealed"
    res = build(workspace / "manifests" / "minimal.yaml", out, workspace / "build" / "keys" / "release-2026.key")
    assert res.returncode == 0, res.stderr.decode()
    assert (out / "release.json.minisig").exists()
    ok = verify(out, "--key", pub(workspace))
    assert ok.returncode == 0, ok.stderr.decode()
    alone = verify(out, "--json")
    assert alone.returncode == 3 and json.loads(alone.stdout)["problems"] == []
    # Unsigned sealed release with keys given: nothing to check them against.
    unsigned = tmp_path / "unsigned"
    assert build(workspace / "manifests" / "minimal.yaml", unsigned).returncode == 0
    res = verify(unsigned, "--key", pub(workspace))
    assert res.returncode == 1 and "release.json.minisig: missing" in problems(res)[0]


def test_changed_root_digest_is_a_signature_problem_not_the_image(workspace, copy):
    rel = json.loads((copy / "release.json").read_bytes())
    other = rel["images"]["cluster"]
    rewrite_release(copy, lambda r: set_image(r, "root", other["digest"], other["size"]))
    for args in ((), ("--key", pub(workspace))):
        res = verify(copy, *args)
        assert res.returncode == 1
        lines = problems(res)
        assert lines[0].startswith(f"{copy}/release.json: the signature does not verify"), lines
        assert "release.json" in lines[0] and "modified" in lines[0]
        assert not any("image modified or replaced" in line for line in lines), lines
        root_lines = [line for line in lines if "images/root.cfs" in line]
        assert root_lines and all("failed its signature check" in line for line in root_lines), lines


# -- every file of the release ---------------------------------------------------------------------

def _some_object(out: Path) -> Path:
    return sorted(p for p in (out / "objects").rglob("*") if p.is_file())[0]


@pytest.mark.parametrize("case", ["wrong-content", "unreferenced", "stray-name", "stray-top", "stray-image"])
def test_every_file_in_the_release_is_checked(workspace, copy, case):
    if case == "wrong-content":
        victim = copy / "objects" / "00" / ("ab" * 31)      # no image references it
        victim.parent.mkdir(exist_ok=True)
        victim.write_bytes(b"not what the name says\n")
        expect = "content does not match its name"
    elif case == "unreferenced":
        data = b"an object no image references\n"
        victim = copy / "objects" / fsverity.object_name(fsverity.digest(data))
        victim.parent.mkdir(exist_ok=True)
        victim.write_bytes(data)
        expect = "not referenced by any image"
    elif case == "stray-name":
        victim = _some_object(copy).with_name("notes.txt")
        victim.write_text("x")
        expect = "not part of the object store"
    elif case == "stray-top":
        victim = copy / "install.sh"
        victim.write_text("#!/bin/sh\n")
        expect = "not part of the release"
    else:
        victim = copy / "images" / "extra.cfs"
        shutil.copy(copy / "images" / "cluster.cfs", victim)
        expect = "not part of the release"
    res = verify(copy, "--key", pub(workspace))
    assert res.returncode == 1
    lines = problems(res)
    assert lines == [f"{copy}/{victim.relative_to(copy)}: {lines[0].split(': ', 1)[1]}", lines[1]], lines
    assert expect in lines[0]


def test_sharing_json_is_recomputed(workspace, copy):
    report = json.loads((copy / "sharing.json").read_bytes())
    report["sharing_ratio"] = 99.0
    (copy / "sharing.json").write_bytes(canonical_json(report))
    res = verify(copy, "--key", pub(workspace))
    assert res.returncode == 1
    assert problems(res)[0].startswith(f"{copy}/sharing.json: differs from what the images share")


def test_object_referenced_by_a_path_outside_the_store(workspace, copy):
    """An image whose file names an 'object' outside the store: reported, never read."""
    image = load_image(copy / "images" / "root.cfs")
    victim = next(n for n in image.root.walk() if n.is_reg() and n.payload is not None)
    victim.payload = b"../../../../../../etc/hostname"
    data = write_image(image.root, IMAGE_OPTIONS)
    (copy / "images" / "root.cfs").write_bytes(data)
    rewrite_release(copy, lambda r: set_image(r, "root", fsverity.digest(data).hex(), len(data)))
    res = verify(copy)
    assert res.returncode == 1
    lines = problems(res)
    assert any("images/root.cfs" in line and "names no object" in line for line in lines), lines
    assert not any("etc/hostname: content" in line for line in lines), lines


# -- odd files: FIFOs, huge sparse images, deep JSON, bad fields ----------------------------------

@pytest.mark.parametrize("target", ["images/cluster.cfs", "release.json.minisig", "release.json", "object",
                                    "sharing.json"])
def test_fifo_in_the_release_is_one_line_not_a_hang(workspace, copy, target):
    path = _some_object(copy) if target == "object" else copy / target
    path.unlink()
    os.mkfifo(path)
    res = verify(copy, "--key", pub(workspace), timeout=30)
    assert res.returncode == 1
    lines = problems(res)
    assert any(str(path.relative_to(copy)) in line and "FIFO" in line for line in lines), lines
    if target == "release.json":
        assert len(lines) == 1


def test_huge_sparse_image_is_not_read_into_memory(workspace, copy):
    """A 1 GiB sparse cluster.cfs: not read at all while its size differs from release.json,
    and streamed (bounded memory) when release.json is edited to claim it."""
    image = copy / "images" / "cluster.cfs"
    with open(image, "r+b") as f:
        f.truncate(1 << 30)
    res, rss = verify_rss(copy, "--key", pub(workspace))
    assert res.returncode == 1
    assert any("images/cluster.cfs: is 1073741824 bytes, release.json says" in line for line in problems(res))
    assert rss < 250, rss
    digest = fsverity.digest_file(image).hex()
    rewrite_release(copy, lambda r: set_image(r, "cluster", digest, 1 << 30))
    res, rss = verify_rss(copy, "--key", pub(workspace))
    assert res.returncode == 1
    assert problems(res)[0].startswith(f"{copy}/release.json: the signature does not verify")
    assert rss < 250, rss


@pytest.mark.parametrize("case", ["deep", "digest", "size", "fsverity", "certificate", "signature-path", "name",
                                  "root-image"])
def test_malformed_release_json_is_one_line(workspace, copy, case):
    rel = json.loads((copy / "release.json").read_bytes())
    if case == "deep":
        (copy / "release.json").write_text("[" * 100000 + "]" * 100000)
    else:
        if case == "digest":
            rel["images"]["cluster"]["digest"] = "zz" * 32
        elif case == "size":
            rel["images"]["cluster"]["size"] = "20480"
        elif case == "fsverity":
            rel["fsverity"] = ["sha256"]
        elif case == "certificate":
            rel["fsverity"]["certificate"] = "../../../../../../etc/passwd"
        elif case == "signature-path":
            rel["images"]["cluster"]["fsverity_signature"] = "/dev/zero"
        elif case == "root-image":
            rel["root"]["image"] = ["root"]
        else:
            rel["images"]["evil\nname"] = rel["images"]["cluster"]
        (copy / "release.json").write_bytes(canonical_json(rel))
    res = verify(copy)
    assert res.returncode == 1
    lines = [line for line in problems(res) if not line.startswith(f"{copy}: NOT OK")]
    # what is malformed, in one line; before it, when the edit broke the signature (the
    # signature covers release.json's bytes), that first
    assert lines[-1].startswith((f"bootimg verify: {copy}/release.json: ", f"{copy}/release.json: ")), lines
    assert len(lines) <= 2, lines
    assert all(line.startswith(f"{copy}/release.json: the signature does not verify") for line in lines[:-1]), lines


def _leaves(doc, path=()):
    yield path
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _leaves(value, path + (key,))


def test_any_field_of_release_json_of_any_type_is_a_report_or_one_line(workspace, copy):
    """60 fields of release.json (fixed seed) each set to a value of another type: verify
    returns a report or raises one line, never anything else."""
    from bootimg.errors import BootimgError
    from bootimg.release.verify import verify_release

    original = json.loads((copy / "release.json").read_bytes())
    fields = [p for p in _leaves(original) if p]
    rng = random.Random(7)
    for path in rng.sample(fields, min(60, len(fields))):
        rel = json.loads(json.dumps(original))
        parent = rel
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = rng.choice([None, [], {}, "x", -1, 1.5, True, "../../x", "/etc/passwd", 10**30])
        (copy / "release.json").write_bytes(canonical_json(rel))
        try:
            report = verify_release(copy)
        except BootimgError as err:
            assert "\n" not in str(err), (path, str(err))
            continue
        assert all("\n" not in problem for problem in report.problems), path


# -- an installed release over a shared store ---------------------------------------------------------

def test_installed_release_verifies_against_a_shared_store(workspace, release, tmp_path):
    """A device's layout: the release's directory without objects/, its objects in a store other
    releases share. Only what it needs is checked; another release's objects are no problem,
    a missing or modified one of its own is."""
    top = tmp_path / "bootimg"
    rel = top / "releases" / "1.0"
    shutil.copytree(release, rel, ignore=shutil.ignore_patterns("objects", "sharing.json", "sandbox.json"))
    shutil.copytree(release / "objects", top / "objects")
    foreign = top / "objects" / "00" / ("0" * 62)           # another release's object
    foreign.parent.mkdir(exist_ok=True)
    foreign.write_bytes(b"another release's file\n")
    res = run_cli("verify", str(rel), "--objects", str(top / "objects"), "--key", pub(workspace))
    assert res.returncode == 0, res.stderr.decode()
    assert "OK:" in res.stdout.decode()
    # Without --objects the same directory is a release without its store: its objects are missing.
    assert run_cli("verify", str(rel), "--key", pub(workspace)).returncode == 1
    victim = sorted(p for p in (top / "objects").glob("??/*") if p != foreign and p.stat().st_size)[0]
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    res = run_cli("verify", str(rel), "--objects", str(top / "objects"), "--key", pub(workspace))
    assert res.returncode == 1
    name = f"{victim.parent.name}/{victim.name}"
    assert problems(res)[0] == f"{rel}/../../objects/{name}: content does not match its name (fs-verity digest " \
                               f"{fsverity.digest(bytes(data)).hex()}): object modified"
    victim.unlink()
    res = run_cli("verify", str(rel), "--objects", str(top / "objects"), "--key", pub(workspace))
    assert res.returncode == 1 and problems(res)[0].startswith(f"{rel}/../../objects/{name}: missing (needed by ")
