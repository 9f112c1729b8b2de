"""bootimg's osbuild stages without running osbuild: their .meta.json is what the generator
writes from the manifest schema, the options schema (Draft 4, osbuild's Draft4Validator) takes
input:// locations and no host path anywhere, input locations resolve the way osbuild hands a
stage its inputs, and the stage files give one line on a Python too old for bootimg.
tests/test_osbuild_run.py runs them in upstream osbuild."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from conftest import REPO, example_workspace

from bootimg.manifest import validate_text
from bootimg.manifest.normalize import map_host_paths
from bootimg.stages import locations

sys.path.insert(0, str(REPO / "tools"))
import gen_osbuild_meta  # noqa: E402
import osbuild_example  # noqa: E402

STAGES = {name: REPO / "osbuild" / name for name in gen_osbuild_meta.METAS}
EXAMPLE = REPO / "osbuild" / "example-manifest.json"


def stage_validator(name: str) -> jsonschema.Draft4Validator:
    """The validator osbuild makes for a stage's options (its schema_2.options, definitions
    hoisted to the top the way osbuild.meta does)."""
    options = json.loads(json.dumps(json.loads((STAGES[name].parent / f"{name}.meta.json").read_text())
                                    ["schema_2"]["options"]))
    schema = {"type": "object", "definitions": options.pop("definitions", {}), **options}
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return example_workspace(tmp_path_factory.mktemp("osb"))


def example_stage(kind: str) -> dict:
    manifest = json.loads(EXAMPLE.read_text())
    return next(s for p in manifest["pipelines"] for s in p["stages"] if s["type"] == kind)


def test_meta_and_example_are_generated():
    for name, stage in STAGES.items():
        assert (stage.parent / f"{name}.meta.json").read_text() == gen_osbuild_meta.render(name), \
            "run tools/gen_osbuild_meta.py"
        assert stage.stat().st_mode & 0o111, f"{stage} must be executable"
    assert EXAMPLE.read_text() == osbuild_example.render(), "run tools/osbuild_example.py"


def test_stage_files_share_their_import_check():
    """Each stage file checks bootimg the same way; only the names differ."""
    texts = [p.read_text() for p in STAGES.values()]
    bodies = {t[t.index('NEEDS_PYTHON = '):] for t in texts}
    assert len(bodies) == 1
    assert all("import bootimg" not in t[:t.index("def load_bootimg")] for t in texts)


def test_example_options_validate():
    for name in STAGES:
        assert list(stage_validator(name).iter_errors(example_stage(name)["options"])) == []


def host_paths_everywhere(workspace: Path) -> dict:
    """The ivi-demo manifest as osbuild options, its host paths left as they are."""
    path = workspace / "manifests" / "ivi-demo.yaml"
    result = validate_text(path.read_text(), str(path), path.parent)
    assert result.valid
    return {"manifest": result.normalized}


def test_no_host_path_is_accepted(workspace):
    """Every place the manifest has a host path, the stage schema wants an input location:
    the options are valid with input:// locations and invalid with any one host path."""
    options = host_paths_everywhere(workspace)
    places = []
    map_host_paths(options["manifest"], lambda v, p: places.append(p) or v)
    assert len(places) == 7          # rootfs, four container images, two trusted keys
    validator = stage_validator("org.bootimg.build")
    assert list(validator.iter_errors(options))
    as_inputs = map_host_paths(options["manifest"], lambda v, p: f"input://in{len(p)}/{Path(v).name}")
    assert list(validator.iter_errors({"manifest": as_inputs})) == []
    for place in places:
        one_host_path = map_host_paths(as_inputs, lambda v, p: "/srv/host/path" if p == place else v)
        assert list(validator.iter_errors({"manifest": one_host_path})), place


@pytest.mark.parametrize("mutate,expected", [
    (lambda o: o.update(bogus=1), "Additional properties"),
    (lambda o: o["manifest"]["containers"][1].update(name="Rear_Camera"), "does not match"),
    (lambda o: o["manifest"]["integrity"]["trusted_keys"].append("/srv/keys/release-2028.pub"), "is not valid under"),
    (lambda o: o["manifest"]["rootfs"]["source"].update(path="/srv/rootfs"), "is not valid under"),
    (lambda o: o["manifest"]["rootfs"]["add_files"][1].update(source_path="input://motd/../../etc/shadow"),
     "does not match"),
    (lambda o: o["manifest"]["containers"][0].update(phase="sometime"), "is not one of"),
    (lambda o: o.update({"boot-check": "no"}), "is not of type"),
    (lambda o: o.pop("manifest"), "'manifest' is a required property"),
    (lambda o: o.update(output={"repository": "../escape"}), "does not match"),
])
def test_bad_build_options_are_rejected(mutate, expected):
    options = json.loads(json.dumps(example_stage("org.bootimg.build")["options"]))
    mutate(options)
    errors = [e.message for e in stage_validator("org.bootimg.build").iter_errors(options)]
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("mutate,expected", [
    (lambda o: o.update(release="/srv/release"), "does not match"),
    (lambda o: o.update({"data-partuuid": "not-a-uuid"}), "does not match"),
    (lambda o: o.update({"esp-size": 1000}), "is less than the minimum"),
    (lambda o: o.pop("kernel"), "'kernel' is a required property"),
])
def test_bad_disk_tree_options_are_rejected(mutate, expected):
    options = json.loads(json.dumps(example_stage("org.bootimg.disk-tree")["options"]))
    mutate(options)
    errors = [e.message for e in stage_validator("org.bootimg.disk-tree").iter_errors(options)]
    assert any(expected in e for e in errors), errors


# -- input locations, on inputs shaped the way osbuild's input services hand them to a stage --

INPUTS = {
    "os": {"path": "/run/osbuild/inputs/os", "data": {}},
    "key": {"path": "/run/osbuild/inputs/key", "data": {"files": {"sha256:aa": {}}}},
    "keys": {"path": "/run/osbuild/inputs/keys", "data": {"files": {"sha256:bb": {}, "sha256:cc": {}}}},
    "app": {"path": "/run/osbuild/inputs/app",
            "data": {"archives": {"app.oci.tar": {"format": "oci-archive", "name": "app"}}}},
    "pulled": {"path": "/run/osbuild/inputs/pulled",
               "data": {"archives": {"sha256:dd": {"format": "dir", "name": "registry/app"}}}},
}


@pytest.mark.parametrize("location,path", [
    ("input://os", "/run/osbuild/inputs/os"),
    ("input://os/", "/run/osbuild/inputs/os"),
    ("input://os/usr/lib", "/run/osbuild/inputs/os/usr/lib"),
    ("input://key", "/run/osbuild/inputs/key/sha256:aa"),
    ("input://keys/sha256:cc", "/run/osbuild/inputs/keys/sha256:cc"),
    ("input://app", "/run/osbuild/inputs/app/app.oci.tar"),
])
def test_locations_resolve(location, path):
    assert locations.resolve(location, INPUTS) == path


@pytest.mark.parametrize("location,message", [
    ("input://nope/x", "input://nope/x: the stage has no input named 'nope' (its inputs: app, key, keys, os, pulled)"),
    ("input://keys", "input://keys: the input holds 2 files; name one: input://keys/sha256:bb"),
    ("input://pulled", "a container image in 'dir' format (the org.osbuild.skopeo source's)"),
    ("/srv/x", "'/srv/x' is not an input location"),
])
def test_location_errors_are_one_line(location, message):
    with pytest.raises(locations.LocationError) as err:
        locations.resolve(location, INPUTS)
    assert message in str(err.value) and "\n" not in str(err.value)


# -- the stage files on a build root whose Python is too old for bootimg --------------------

OLD_PYTHONS = sorted(Path("/root/.pyenv/versions").glob("3.[6-9].*/bin/python3")) + \
    sorted(Path("/root/.pyenv/versions").glob("3.10.*/bin/python3"))


@pytest.mark.skipif(not OLD_PYTHONS, reason="no Python older than 3.11 here (pyenv)")
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_old_python_gets_one_line(stage):
    """The stage file parses on Python 3.6 and, run by a Python older than 3.11, says so."""
    for python in OLD_PYTHONS:
        code = (f"import sys; src = open({str(STAGES[stage])!r}).read(); "
                "exec(compile(src.split(\"if __name__\")[0], 'stage', 'exec')); sys.exit(main({}))")
        proc = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=60)
        version = python.parent.parent.name.rsplit(".", 1)[0]
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == f"{stage}: bootimg needs Python >= 3.11; the build root has {python} (Python {version})\n"
