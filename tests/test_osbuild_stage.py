"""The osbuild stage org.bootimg.build, tested the way osbuild's own stages are: import the
file and call main() with osbuild-shaped arguments, and validate options with the
Draft4Validator osbuild uses on the stage's .meta.json schema."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import jsonschema
import pytest
from conftest import REPO, example_workspace, run_cli

from bootimg.manifest import validate_text

sys.path.insert(0, str(REPO / "tools"))
import gen_osbuild_meta  # noqa: E402

STAGE = REPO / "osbuild" / "org.bootimg.build"
META = REPO / "osbuild" / "org.bootimg.build.meta.json"
EXAMPLE = REPO / "osbuild" / "example-manifest.json"


def load_stage():
    loader = importlib.machinery.SourceFileLoader("org_bootimg_build", str(STAGE))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads(META.read_text())


@pytest.fixture(scope="module")
def validator(meta):
    schema = meta["schema_2"]["options"]
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return example_workspace(tmp_path_factory.mktemp("osb"))


def normalized(ws: Path, name: str = "ivi-demo.yaml") -> dict:
    path = ws / "manifests" / name
    result = validate_text(path.read_text(), str(path), path.parent)
    assert result.valid, [d.format(str(path)) for d in result.errors]
    return result.normalized


def test_meta_is_generated_from_the_schema(meta):
    assert META.read_text() == gen_osbuild_meta.render(), "run tools/gen_osbuild_meta.py"
    assert STAGE.stat().st_mode & 0o111, "the stage must be executable"
    assert set(meta) >= {"summary", "description", "schema_2"}


def test_good_options_validate(validator, workspace):
    options = {"manifest": normalized(workspace), "output": {"repository": "/composefs"}}
    assert list(validator.iter_errors(options)) == []


@pytest.mark.parametrize("mutate,expected", [
    (lambda o: o.update(bogus=1), "Additional properties"),
    (lambda o: o["manifest"]["rootfs"]["source"].update(path="relative/path"), "is not valid under any"),
    (lambda o: o["manifest"]["containers"][0].update(phase="sometime"), "is not one of"),
    (lambda o: o["manifest"]["identity"].update(source_date_epoch="yesterday"), "is not of type"),
    (lambda o: o.pop("manifest"), "'manifest' is a required property"),
    (lambda o: o.update(output={"repository": "../escape"}), "does not match"),
    (lambda o: o.update({"boot-check": "no"}), "is not of type 'boolean'"),
])
def test_bad_options_are_rejected(validator, workspace, mutate, expected):
    options = {"manifest": normalized(workspace), "output": {"repository": "/composefs"}}
    mutate(options)
    errors = [e.message for e in validator.iter_errors(options)]
    assert any(expected in e for e in errors), errors


def test_main_builds_release_from_input_tree(workspace, tmp_path):
    stage = load_stage()
    tree = tmp_path / "tree"
    tree.mkdir()
    rootfs = tmp_path / "input-os"
    shutil.copytree(workspace / "build" / "ivi-rootfs", rootfs, symlinks=True)
    (rootfs / "etc" / "from-pipeline").write_text("built by osbuild\n")
    args = {
        "tree": str(tree),
        "inputs": {
            "tree": {"path": str(rootfs), "data": {}},
            "signing-key": {"path": str(workspace / "build" / "keys"), "data": {"files": {"release-2026.key": {}}}},
        },
        # The example root has no kernel, systemd or dracut: a release that is never booted.
        "options": {"manifest": normalized(workspace), "output": {"repository": "/composefs"}, "boot-check": False},
        "meta": {"source-epoch": 1767225600},
    }
    assert stage.main(args) == 0
    out = tree / "composefs"
    assert (out / "release.json").exists() and (out / "release.json.minisig").exists()
    res = run_cli("verify", str(out), "--key", str(workspace / "build" / "keys" / "release-2026.pub"))
    assert res.returncode == 0, res.stderr.decode()
    from bootimg.composefs.reader import load_image
    root = load_image(out / "images" / "root.cfs").root
    assert root.lookup(b"/etc/from-pipeline").content == b"built by osbuild\n"
    # Same inputs, same bytes: osbuild's caching relies on it.
    tree2 = tmp_path / "tree2"
    tree2.mkdir()
    assert stage.main({**args, "tree": str(tree2)}) == 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            assert (tree2 / "composefs" / p.relative_to(out)).read_bytes() == p.read_bytes()


def test_main_refuses_a_tree_that_cannot_boot(workspace, tmp_path, capsys):
    """The boot check is on by default, as in bootimg build: every missing piece, one line each."""
    stage = load_stage()
    rootfs = tmp_path / "input-os"
    shutil.copytree(workspace / "build" / "ivi-rootfs", rootfs, symlinks=True)
    tree = tmp_path / "tree"
    tree.mkdir()
    args = {"tree": str(tree), "inputs": {"tree": {"path": str(rootfs), "data": {}}},
            "options": {"manifest": normalized(workspace, "minimal.yaml")}, "meta": {}}
    assert stage.main(args) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(ln.startswith(f"org.bootimg.build: rootfs: {rootfs}: the root") for ln in lines), lines
    assert any("no dracut (/usr/bin/dracut)" in ln for ln in lines) and any("no kernel" in ln for ln in lines)
    assert list(tree.iterdir()) == []


def test_main_reports_invalid_manifest(workspace, tmp_path, capsys):
    stage = load_stage()
    options = {"manifest": normalized(workspace)}
    options["manifest"]["containers"][0]["ordering"]["after"] = ["no-such-container"]
    args = {"tree": str(tmp_path), "inputs": {}, "options": options, "meta": {}}
    assert stage.main(args) == 1
    err = capsys.readouterr().err
    assert "no-such-container" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_example_osbuild_manifest(validator):
    manifest = json.loads(EXAMPLE.read_text())
    assert manifest["version"] == "2"
    names = [p["name"] for p in manifest["pipelines"]]
    stages = [(p["name"], s) for p in manifest["pipelines"] for s in p["stages"] if s["type"] == "org.bootimg.build"]
    assert len(stages) == 1
    _, stage = stages[0]
    assert list(validator.iter_errors(stage["options"])) == []
    ref = stage["inputs"]["tree"]["references"][0]
    assert ref.startswith("name:") and ref[5:] in names and names.index(ref[5:]) < names.index(stages[0][0])
