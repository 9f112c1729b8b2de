"""The manifest: schema (Draft 4), error reporting with lines, semantic checks, model, CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from bootimg.manifest import (
    ManifestError,
    ManifestUnreadable,
    limits,
    load_manifest,
    load_schema,
    model,
    osbuild_options_schema,
    reserved,
    validate_file,
    validate_text,
)
from bootimg.manifest.messages import PATTERN_HINTS
from bootimg.manifest.normalize import map_host_paths
from bootimg.manifest.schema import patterns, resolve, walk_refs
from bootimg.signing import generate_keypair

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
EXAMPLES = [MANIFESTS / "ivi-demo.yaml", MANIFESTS / "minimal.yaml"]

BASE = """\
apiVersion: bootimg/v1
identity: {name: t, version: "1", source_date_epoch: 0}
rootfs:
  source: {type: directory, path: root}
integrity: {trust: sealed}
"""


def check(text: str, base_dir: Path | str = "/base") -> list[tuple[int, int, str, str]]:
    """(line, column, path, message) of every diagnostic for manifest text."""
    result = validate_text(textwrap.dedent(text), "m.yaml", base_dir)
    return [(d.line, d.column, d.format("m.yaml").split(": ", 2)[1], d.message) for d in result.diagnostics]


def messages(text: str) -> list[str]:
    return [f"{path}: {msg}" for _, _, path, msg in check(text)]


def run_validate(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootimg", "validate", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# -- the schema itself --------------------------------------------------------------

FORBIDDEN_IN_DRAFT4 = {"const", "if", "then", "else", "$defs", "contains", "propertyNames", "$id",
                       "unevaluatedProperties", "dependentRequired", "examples"}


def _schemas(node, path=()):
    """Every sub-schema with its path (keys that hold schemas, not data such as enum or default)."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if key in ("properties", "patternProperties", "definitions"):
                for name, sub in value.items():
                    yield from _schemas(sub, path + (key, name))
            elif key in ("items", "not", "additionalProperties") and isinstance(value, dict):
                yield from _schemas(value, path + (key,))
            elif key in ("oneOf", "anyOf", "allOf"):
                for i, sub in enumerate(value):
                    yield from _schemas(sub, path + (key, i))


def test_schema_is_draft4_and_uses_only_its_subset():
    schema = load_schema()
    jsonschema.Draft4Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-04/schema#"
    for path, sub in _schemas(schema):
        assert not FORBIDDEN_IN_DRAFT4 & set(sub), f"{path}: not Draft 4: {FORBIDDEN_IN_DRAFT4 & set(sub)}"
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert not isinstance(sub.get(bound), (int, float)) or isinstance(sub.get(bound), bool), path
        if "$ref" in sub:
            assert set(sub) == {"$ref"}, f"{path}: Draft 4 ignores keywords next to $ref"
        if sub.get("type") == "object" and ("properties" in sub or "patternProperties" in sub):
            assert sub.get("additionalProperties") is False, f"{path}: must set additionalProperties: false"
        if "oneOf" in sub:
            for i, branch in enumerate(sub["oneOf"]):
                if "properties" in branch:
                    assert branch.get("additionalProperties") is False, f"{path}.oneOf[{i}]"


def test_schema_refs_are_local_and_resolve():
    schema = load_schema()
    refs = set(walk_refs(schema))
    assert refs, "expected refs"
    for ref in refs:
        assert ref == "#" or ref.startswith("#/definitions/"), ref
        resolve({"$ref": ref}, schema)


def test_schema_pins_api_version():
    assert load_schema()["properties"]["apiVersion"]["enum"] == ["bootimg/v1"]


def test_every_pattern_has_a_human_hint():
    for pattern in set(patterns(load_schema())) | set(patterns(osbuild_options_schema())):
        assert pattern in PATTERN_HINTS, f"no hint for {pattern!r} in messages.PATTERN_HINTS"
        re.compile(pattern)


def test_model_literals_match_schema_enums():
    """The typed model's Literal types must stay equal to the schema's enums."""
    defs = load_schema()["definitions"]
    container = defs["container"]["properties"]
    boot = defs["boot"]["properties"]
    kpi_measures = [v for b in defs["kpi"]["oneOf"] for v in b["properties"]["measure"]["enum"]]
    expected = {
        model.SourceType: [b["properties"]["type"]["enum"][0] for b in defs["source"]["oneOf"]],
        model.Phase: container["phase"]["enum"],
        model.Readiness: container["readiness"]["enum"],
        model.Essential: container["essential"]["enum"],
        model.Restart: container["restart"]["enum"],
        model.Network: container["network"]["enum"],
        model.DeviceAccess: defs["sandbox_device"]["properties"]["access"]["enum"],
        model.NotifyAccess: defs["sandbox"]["properties"]["notify_access"]["enum"],
        model.FsVerity: defs["fsverity"]["enum"],
        model.Trust: [b["properties"]["trust"]["enum"][0] for b in defs["integrity"]["oneOf"]],
        model.EtcPolicy: boot["etc"]["enum"],
        model.VarPolicy: boot["var"]["enum"],
        model.VerificationFailure: boot["on_verification_failure"]["enum"],
        model.Measure: kpi_measures,
        model.Since: defs["kpi_since"]["enum"],
        model.Statistic: defs["kpi_statistic"]["enum"],
    }
    for literal, enum in expected.items():
        assert list(typing.get_args(literal)) == enum, literal


def test_schema_json_is_package_data():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    assert any(pkg in ("bootimg", "bootimg.manifest") and any(p.endswith("*.json") for p in pats)
               for pkg, pats in data.items())


# -- the examples ---------------------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_valid_under_draft4_and_draft2020(path):
    data = yaml.safe_load(path.read_text())
    schema = load_schema()
    for cls in (jsonschema.Draft4Validator, jsonschema.Draft202012Validator):
        assert list(cls(schema).iter_errors(data)) == [], cls.__name__
    result = validate_file(path)
    assert result.lines() == []
    assert result.manifest is not None
    for cls in (jsonschema.Draft4Validator, jsonschema.Draft202012Validator):
        assert list(cls(schema).iter_errors(result.normalized)) == [], "normalized form must stay valid"


def test_broken_example_is_invalid_under_plain_jsonschema_too():
    data = yaml.safe_load((MANIFESTS / "broken.yaml").read_text())
    assert list(jsonschema.Draft4Validator(load_schema()).iter_errors(data))


# -- the broken example: every error, with its place, in one run -----------------------

BROKEN_EXPECTED = [
    (6, 12, "identity.version", "must be a string, got the number 1.5 (quote the value to make it a string)"),
    (12, 5, "rootfs.source.ref", "unknown key 'ref' (only allowed with type: oci)"),
    (13, 1, "contaners", "unknown key 'contaners' (did you mean 'containers'?)"),
    (15, 11, "containers[0].name", "invalid value 'Vehicle_Bus': use lowercase letters, digits and '-', "
                                   "starting with a letter or digit, at most 63 characters"),
    (17, 12, "containers[0].phase", "must be one of: early, basic, default; got the string 'earyl' "
                                    "(did you mean 'early'?)"),
    (18, 18, "containers[0].deadline_ms", "must be >= 1, got -5"),
    (25, 15, "containers[1].ordering.after[0]", "unknown container 'vehicle-bus' (did you mean 'Vehicle_Bus'?)"),
    (27, 5, "containers[1].restart", "duplicate key 'restart' (first given at line 26)"),
    (28, 5, "containers[2]", "missing required key 'name'"),
    (30, 14, "containers[2].environment.LEVEL", "must be a string, got the integer 3 "
                                                "(quote the value to make it a string)"),
    (31, 1, "integrity", "missing required key 'trusted_keys'"),
    (33, 13, "integrity.fsverity", "fs-verity is OPTIONAL: file contents are not verified and a tampered image "
                                   "still boots; development images only, never ship this"),
    (39, 14, "kpis[0].warn_ms", "warn_ms 3000 is above fail_ms 2000; a KPI warns before it fails"),
]


def test_broken_reports_every_error_with_line_and_column():
    result = validate_file(MANIFESTS / "broken.yaml")
    got = [(d.line, d.column, d.format("x").split(": ", 2)[1], d.message) for d in result.diagnostics]
    assert got == BROKEN_EXPECTED
    assert [d.line for d in result.warnings] == [33]
    assert len(result.errors) == 12
    assert result.manifest is None


def test_broken_via_cli_lists_all_errors_in_one_run():
    proc = run_validate("manifests/broken.yaml")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    located = [line for line in lines if re.match(r"^manifests/broken\.yaml:\d+:\d+: ", line)]
    assert {int(line.split(":")[1]) for line in located} == {e[0] for e in BROKEN_EXPECTED}
    assert located[0] == ("manifests/broken.yaml:6:12: identity.version: must be a string, got the number 1.5 "
                          "(quote the value to make it a string)")
    assert "manifests/broken.yaml:33:13: integrity.fsverity: warning: fs-verity is OPTIONAL" in proc.stderr
    assert lines[-1] == "manifests/broken.yaml: invalid: 12 errors"


# -- single error classes ---------------------------------------------------------------

def test_unknown_key_did_you_mean():
    assert check(BASE + "contaners: []\n") == [
        (6, 1, "contaners", "unknown key 'contaners' (did you mean 'containers'?)")]
    assert messages(BASE + "boot: {kernel_arg: [quiet]}\n") == [
        "boot.kernel_arg: unknown key 'kernel_arg' (did you mean 'kernel_args'?)"]


def test_unknown_key_without_close_match_lists_allowed_keys():
    assert messages(BASE + "boot: {zzz: 1}\n") == [
        "boot.zzz: unknown key 'zzz' (allowed: kernel_args, etc, var, on_verification_failure, assessment, initramfs)"]


def test_missing_required_points_at_parent_key():
    text = BASE.replace('identity: {name: t, version: "1", source_date_epoch: 0}',
                        "identity:\n  name: t\n  version: '1'")
    assert check(text) == [(2, 1, "identity", "missing required key 'source_date_epoch'")]


def test_missing_top_level_keys_point_at_document_start():
    assert check("apiVersion: bootimg/v1\n") == [
        (1, 1, "$", "missing required key 'identity'"),
        (1, 1, "$", "missing required key 'integrity'"),
        (1, 1, "$", "missing required key 'rootfs'"),
    ]


def test_wrong_type_hints_at_yaml_booleans_and_empty_values():
    assert messages(BASE + "containers:\n  - name: a\n    image: {type: oci, path: a, ref: x}\n    restart: no\n") == [
        "containers[0].restart: must be one of: never, on-failure, always; got the boolean false "
        "(YAML reads yes/no/on/off as booleans; quote the value)"]
    assert check(BASE + "boot:\n") == [(6, 1, "boot", "must be a mapping, got nothing (null)")]


def test_mode_must_be_a_quoted_octal_string():
    text = BASE + "  add_files:\n    - {path: /etc/x, text: x, mode: 0644}\n"
    text = text.replace("integrity: {trust: sealed}\n", "") + "integrity: {trust: sealed}\n"
    assert messages(text) == [
        "rootfs.add_files[0].mode: must be a string, got the integer 420 (quote the value to make it a string)"]


def test_source_discriminator():
    def with_source(src: str) -> list[str]:
        return messages(BASE.replace("{type: directory, path: root}", src))

    assert with_source("{path: root}") == [
        "rootfs.source: missing required key 'type' (one of: directory, tar, oci)"]
    assert with_source("{type: docker, path: root}") == [
        "rootfs.source.type: must be one of: directory, tar, oci; got the string 'docker'"]
    assert with_source("{type: oci, path: root}") == ["rootfs.source: missing required key 'ref'"]
    assert with_source("{type: oci, path: root, ref: 'bad ref'}") == [
        "rootfs.source.ref: invalid value 'bad ref': must be an OCI ref name such as 'latest' or a digest "
        "'sha256:<64 hex digits>'"]
    assert with_source("root/") == ["rootfs.source: must be a mapping, got the string 'root/'"]


def test_add_files_need_exactly_one_content():
    text = BASE + textwrap.dedent("""\
        containers: []
        rootfs:
          source: {type: directory, path: root}
          add_files:
            - {path: /etc/a}
            - {path: /etc/b, text: b, source_path: b}
            - {path: etc/c, text: c}
            - {path: /etc/d/../e, text: e}
            - {path: /etc/b, text: again}
        """)
    text = text.replace("rootfs:\n  source: {type: directory, path: root}\n", "", 1)
    assert messages(text) == [
        "rootfs.add_files[0]: missing one of the keys 'text' or 'source_path'",
        "rootfs.add_files[1]: give only one of 'text' or 'source_path'",
        "rootfs.add_files[2].path: invalid value 'etc/c': must be an absolute, normalized path "
        "(no '.', '..', '//' or trailing '/')",
        "rootfs.add_files[3].path: invalid value '/etc/d/../e': must be an absolute, normalized path "
        "(no '.', '..', '//' or trailing '/')",
        "rootfs.add_files[4].path: '/etc/b' is already added (add_files[1])",
    ]


def test_trust_profiles():
    assert messages(BASE.replace("{trust: sealed}", "{trust: sealed, trusted_keys: [k.pub]}")) == [
        "integrity.trusted_keys: unknown key 'trusted_keys' (only allowed with trust: signed)"]
    assert messages(BASE.replace("{trust: sealed}", "{trust: signed, trusted_keys: []}")) == [
        "integrity.trusted_keys: must not be empty"]
    assert messages(BASE.replace("{trust: sealed}", "{trust: signed, trusted_keys: [a.pub, a.pub]}")) == [
        "integrity.trusted_keys[1]: duplicate item 'a.pub' (same as item 0)"]
    assert messages(BASE.replace("{trust: sealed}", "{fsverity: required}")) == [
        "integrity: missing required key 'trust' (one of: sealed, signed)"]


def test_duplicate_keys_are_errors_but_merge_keys_are_not():
    assert check(BASE + "boot:\n  etc: readonly\n  etc: transient\n") == [
        (8, 3, "boot.etc", "duplicate key 'etc' (first given at line 7)")]
    text = BASE + textwrap.dedent("""\
        containers:
          - &common
            name: a
            image: {type: oci, path: a, ref: x}
            restart: always
          - <<: *common
            name: b
        """)
    result = validate_text(text, "m.yaml", "/base")
    assert result.lines() == []
    assert [(c.name, c.restart) for c in result.manifest.containers] == [("a", "always"), ("b", "always")]


def test_yaml_syntax_error_empty_file_and_several_documents():
    assert check("apiVersion: [bootimg/v1\n") == [
        (2, 1, "$", "YAML syntax error: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)")]
    assert check("") == [(1, 1, "$", "the file has no YAML document; expected a mapping starting with "
                                     "'apiVersion: bootimg/v1'")]
    assert check(BASE + "---\n" + BASE) == [(6, 1, "$", "YAML syntax error: expected a single YAML document, "
                                                        "found another one")]
    assert check("- a\n") == [(1, 1, "$", "must be a mapping, got a list")]


def test_unsafe_tags_are_rejected_not_executed():
    assert messages(BASE + "boot: !!python/object:os.system {}\n") == [
        "boot: unsupported YAML tag 'tag:yaml.org,2002:python/object:os.system'"]
    assert messages(BASE + "boot: {kernel_args: [!!python/name:os.system '']}\n") == [
        "boot.kernel_args[0]: cannot read value: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/name:os.system'"]


# -- semantic checks --------------------------------------------------------------------

def containers(yaml_text: str) -> str:
    return BASE + "containers:\n" + textwrap.indent(textwrap.dedent(yaml_text), "  ")


def test_ordering_references_must_exist():
    text = containers("""\
        - name: a
          image: {type: oci, path: a, ref: x}
          ordering: {after: [b, vehcle-bus, a, b.service, dbus.service], wants: [nope]}
        - name: b
          image: {type: oci, path: b, ref: x}
        - name: vehicle-bus
          image: {type: oci, path: b, ref: x}
        """)
    assert messages(text) == [
        "containers[0].ordering.after[1]: unknown container 'vehcle-bus' (did you mean 'vehicle-bus'?)",
        "containers[0].ordering.after[2]: container 'a' cannot be ordered against itself",
        "containers[0].ordering.wants[0]: unknown container 'nope' (a unit outside this manifest needs its "
        "suffix, e.g. 'nope.service')",
    ]


def test_duplicate_container_names():
    text = containers("""\
        - {name: a, image: {type: oci, path: a, ref: x}}
        - {name: a, image: {type: oci, path: a, ref: x}}
        """)
    assert check(text) == [(8, 12, "containers[1].name", "duplicate container name 'a' (first defined at line 7)")]


def test_ordering_cycles_are_reported_once():
    text = containers("""\
        - {name: a, image: {type: oci, path: a, ref: x}, ordering: {after: [c]}}
        - {name: b, image: {type: oci, path: a, ref: x}, ordering: {after: [a.service]}}
        - {name: c, image: {type: oci, path: a, ref: x}, ordering: {before: [a], after: [b]}}
        """)
    assert messages(text) == ["containers[0].ordering.after[0]: ordering cycle: a -> b -> c -> a "
                              "(each must start before the next)"]


def test_phase_order():
    text = containers("""\
        - {name: a, image: {type: oci, path: a, ref: x}, phase: early, ordering: {after: [b]}}
        - {name: b, image: {type: oci, path: a, ref: x}, ordering: {before: [c]}}
        - {name: c, image: {type: oci, path: a, ref: x}, phase: basic}
        - {name: d, image: {type: oci, path: a, ref: x}, phase: basic, ordering: {after: [c], wants: [b]}}
        """)
    assert messages(text) == [
        "containers[0].ordering.after[0]: cannot start after 'b': this container starts in phase early, "
        "'b' only in the later phase default",
        "containers[1].ordering.before[0]: cannot start before 'c': this container starts in phase default, "
        "'c' already in the earlier phase basic",
    ]


def test_deadline_order_is_sane_transitively():
    text = containers("""\
        - {name: a, image: {type: oci, path: a, ref: x}, deadline_ms: 900}
        - {name: b, image: {type: oci, path: a, ref: x}, ordering: {after: [a]}}
        - {name: c, image: {type: oci, path: a, ref: x}, ordering: {after: [b]}, deadline_ms: 500}
        - {name: d, image: {type: oci, path: a, ref: x}, ordering: {after: [a]}, deadline_ms: 900}
        """)
    assert messages(text) == ["containers[2].deadline_ms: deadline 500 ms is earlier than the 900 ms deadline "
                              "of 'a', which must be active first"]


def test_directory_and_tar_images_need_a_command():
    text = containers("""\
        - {name: a, image: {type: tar, path: a.tar}}
        - {name: b, image: {type: directory, path: b}, command: [/bin/b]}
        - {name: c, image: {type: oci, path: c, ref: x}}
        """)
    assert messages(text) == ["containers[0]: missing required key 'command' (a tar image has no default command)"]


def test_container_fields():
    text = containers("""\
        - name: a
          image: {type: oci, path: a, ref: x}
          user: "root user"
          environment: {1BAD: x, GOOD: x}
          resources: {cpu_weight: 0, memory_max: 256M}
          binds: [{source: /a, target: /t}, {source: /b, target: /t}, {source: rel, target: /u}]
          network: bridge
          command: []
        """)
    assert messages(text) == [
        "containers[0].user: invalid value 'root user': must be a user name or UID[:GID], e.g. \"1000:1000\"",
        "containers[0].environment[\"1BAD\"]: invalid key '1BAD': environment variable names use letters, digits "
        "and '_', not starting with a digit",
        "containers[0].resources.cpu_weight: must be >= 1, got 0",
        "containers[0].resources.memory_max: unknown key 'memory_max' (did you mean 'memory_max_mib'?)",
        "containers[0].binds[1].target: '/t' is already a bind target (binds[0])",
        "containers[0].binds[2].source: invalid value 'rel': must be an absolute, normalized path "
        "(no '.', '..', '//' or trailing '/')",
        "containers[0].network: must be one of: none, host; got the string 'bridge'",
        "containers[0].command: must not be empty",
    ]


def test_sandbox_fields():
    text = containers("""\
        - name: a
          image: {type: oci, path: a, ref: x}
          binds: [{source: /dev/video1, target: /dev/video0}]
          sandbox:
            capabilities: [CAP_NET_RAWW]
            system_calls: ["@clocks", sched_setattr, "Bad"]
            address_families: [AF_CAN, AF_CAN]
            devices: [{path: /dev/video0, access: rw}, {path: /etc/passwd, access: r},
                      {path: /dev/ttyS1, access: rwm}, {path: /dev/ttyS1, access: r}]
            namespaces: [network]
            realtime_priority: 100
            notify_access: all
            umask: "22"
            allow: [clocks]
        - name: b
          image: {type: oci, path: a, ref: x}
          sandbox: {}
        """)
    assert messages(text) == [
        "containers[0].sandbox: missing required key 'reason'",
        "containers[0].sandbox.capabilities[0]: must be one of: " + ", ".join(CAPABILITIES)
        + "; got the string 'CAP_NET_RAWW' (did you mean 'CAP_NET_RAW'?)",
        "containers[0].sandbox.system_calls[0]: invalid value '@clocks': must be a system call name such as "
        "'sched_setattr' or a systemd system call group such as '@clock' (systemd-analyze syscall-filter lists them)",
        "containers[0].sandbox.system_calls[2]: invalid value 'Bad': must be a system call name such as "
        "'sched_setattr' or a systemd system call group such as '@clock' (systemd-analyze syscall-filter lists them)",
        "containers[0].sandbox.address_families[1]: duplicate item 'AF_CAN' (same as item 0)",
        "containers[0].sandbox.devices[0].path: binds[0] puts '/dev/video1' at '/dev/video0'; a device is used at "
        "the path it has on the system",
        "containers[0].sandbox.devices[1].path: invalid value '/etc/passwd': must be a device node path under /dev/ "
        "(letters, digits, '_', '.', '+', '@', '-'; no '.', '..' or '//')",
        "containers[0].sandbox.devices[2].access: must be one of: r, w, rw; got the string 'rwm' (did you mean 'rw'?)",
        "containers[0].sandbox.devices[3].path: '/dev/ttyS1' is already listed (devices[2])",
        "containers[0].sandbox.namespaces[0]: must be one of: cgroup, ipc, mnt, net, pid, user, uts; got the string "
        "'network' (did you mean 'net'?)",
        "containers[0].sandbox.realtime_priority: must be <= 99, got 100",
        "containers[0].sandbox.notify_access: notify_access only applies to a container with readiness: notify",
        "containers[0].sandbox.umask: invalid value '22': must be octal permission bits as a string, e.g. \"0644\"",
        "containers[0].sandbox.allow[0]: must be one of: " + ", ".join(ALLOW)
        + "; got the string 'clocks' (did you mean 'clock'?)",
        "containers[1].sandbox: missing required key 'reason'",
    ]


def test_sandbox_allow_values_are_the_units_protections():
    """Every sandbox.allow value switches off exactly one protection of the unit generator."""
    from bootimg.boot import sandbox

    assert set(ALLOW) == {"host_users"} | set(sandbox.FILESYSTEM_PROTECTIONS) | set(sandbox.KERNEL_PROTECTIONS)


def test_boot_checks_and_warnings():
    text = BASE + "boot:\n  kernel_args: [quiet, composefs.digest=abc, 'a b']\n  on_verification_failure: emergency\n"
    result = validate_text(text, "m.yaml", "/base")
    assert result.lines() == [
        "m.yaml:7:24: boot.kernel_args[1]: 'composefs.digest=' is set by the build from the image digest; remove it",
        "m.yaml:7:46: boot.kernel_args[2]: invalid value 'a b': must be one argument without whitespace",
        "m.yaml:8:28: boot.on_verification_failure: warning: a failed verification opens an emergency shell on "
        "an unverified system; development images only (use reboot)",
    ]


def test_fsverity_optional_is_valid_but_loud():
    text = BASE.replace("{trust: sealed}", "{trust: sealed, fsverity: optional}")
    result = validate_text(text, "m.yaml", "/base")
    assert result.valid and result.manifest is not None
    assert [d.severity for d in result.diagnostics] == ["warning"]
    assert "fs-verity is OPTIONAL" in result.lines()[0]


def test_kpi_checks():
    text = containers("- {name: cam, image: {type: oci, path: a, ref: x}}\n") + textwrap.dedent("""\
        kpis:
          - {name: k, measure: unit_active, unit: cma, statistic: p95, warn_ms: 1, fail_ms: 2}
          - {name: k, measure: initrd, since: userspace_start, statistic: p90, warn_ms: 5, fail_ms: 4}
          - {name: k3, measure: userspace, statistic: p99, warn_ms: 1, fail_ms: 5, max_ms: 4}
          - {name: k4, measure: boot_finished, unit: cam, statistic: max, warn_ms: 1, fail_ms: 2}
          - {name: k5, measure: unit_active, statistic: max, warn_ms: 1, fail_ms: 2}
          - {name: k6, measure: unit_active, unit: cam.service, statistic: max, warn_ms: 1, fail_ms: 2}
          - {name: k7, measure: unit_active, unit: weston.service, statistic: max, warn_ms: 1, fail_ms: 2}
        """)
    assert messages(text) == [
        "kpis[0].unit: unknown container 'cma' (did you mean 'cam'?)",
        "kpis[1].name: duplicate KPI name 'k' (first defined at line 9)",
        "kpis[1].since: 'initrd' is reached before userspace starts; measure it since kernel_start",
        "kpis[1].warn_ms: warn_ms 5 is above fail_ms 4; a KPI warns before it fails",
        "kpis[2].statistic: must be one of: median, p90, p95, max; got the string 'p99' (did you mean 'p95'?)",
        "kpis[2].max_ms: max_ms 4 (every boot) is below fail_ms 5 (the statistic); the per-boot limit must be looser",
        "kpis[3].unit: unknown key 'unit' (only allowed with measure: unit_active)",
        "kpis[4]: missing required key 'unit'",
    ]


# -- the typed model ----------------------------------------------------------------------

_SANDBOX = json.loads((REPO / "bootimg" / "manifest" / "schema.json").read_text())["definitions"]["sandbox"]
CAPABILITIES = _SANDBOX["properties"]["capabilities"]["items"]["enum"]
ALLOW = _SANDBOX["properties"]["allow"]["items"]["enum"]


def test_model_fields_from_ivi_demo():
    m = load_manifest(MANIFESTS / "ivi-demo.yaml")
    assert m.api_version == "bootimg/v1"
    assert (m.identity.name, m.identity.version, m.identity.source_date_epoch) == ("ivi-demo", "1.4.0", 1767225600)
    assert m.rootfs.source == model.Source("directory", (REPO / "build" / "ivi-rootfs"))
    assert m.rootfs.source.path.is_absolute()
    assert m.rootfs.add_files[0] == model.AddFile(path="/etc/hostname", mode="0644", text="ivi-demo\n")
    assert [c.name for c in m.containers] == ["vehicle-bus", "rear-camera", "cluster", "telemetry"]
    vbus = m.container("vehicle-bus")
    assert (vbus.phase, vbus.readiness, vbus.deadline_ms, vbus.essential) == ("early", "notify", 800, "reboot")
    assert vbus.image == model.Source("oci", REPO / "build" / "images" / "vehicle-bus", "1.4.0")
    assert vbus.command == ("/usr/bin/vbusd", "--can", "can0", "--someip")
    assert vbus.environment == {"VBUS_LOG_LEVEL": "warning"}
    assert vbus.resources == model.Resources(cpu_weight=1000, memory_max_mib=64)
    assert vbus.binds == (model.Bind("/run/vsomeip", "/run/vsomeip"),)
    cam = m.container("rear-camera")
    assert cam.ordering == model.Ordering(after=("vehicle-bus",), before=(), requires=("vehicle-bus",), wants=())
    assert cam.deadline_ms == 2000 and cam.user is None
    assert vbus.network == "host" and vbus.sandbox == model.Sandbox(
        reason="CAN gateway, reads and writes raw CAN frames on can0 (SocketCAN)", address_families=("AF_CAN",))
    assert m.container("rear-camera").sandbox.devices == (model.SandboxDevice("/dev/video0", "rw"),)
    telemetry = m.container("telemetry")
    assert (telemetry.phase, telemetry.network, telemetry.readiness) == ("default", "host", "started")
    assert telemetry.sandbox is None
    assert m.container("cluster").command is None
    assert m.integrity == model.Integrity(
        trust="signed", fsverity="required",
        trusted_keys=(REPO / "build" / "keys" / "release-2026.pub", REPO / "build" / "keys" / "release-2027.pub"))
    assert m.boot.etc == "transient" and m.boot.on_verification_failure == "reboot"
    assert m.kpis[1] == model.KpiBudget(name="rear-camera-visible", measure="unit_active", since="kernel_start",
                                        statistic="p95", warn_ms=1500, fail_ms=1800, unit="rear-camera", max_ms=2000)
    assert m.source_file == MANIFESTS / "ivi-demo.yaml"
    assert m.unit_name("rear-camera") == "rear-camera.service"
    assert m.unit_name("weston.service") == "weston.service"
    assert [k.name for k in m.deadline_budgets()] == ["vehicle-bus.deadline", "rear-camera.deadline",
                                                      "cluster.deadline"]
    assert len(m.all_budgets()) == len(m.kpis) + 3
    hash(m)  # frozen all the way down


def test_minimal_defaults():
    m = load_manifest(MANIFESTS / "minimal.yaml")
    assert m.containers == () and m.kpis == ()
    assert m.integrity == model.Integrity(trust="sealed", fsverity="required")
    assert m.boot == model.Boot(kernel_args=(), etc="transient", var="persistent", on_verification_failure="reboot",
                                assessment=model.Assessment(tries=3, settle_ms=10000))
    assert m.identity.security_version == 0 and m.good_boot_units() == ()
    assert m.rootfs.source == model.Source("tar", REPO / "build" / "minimal-rootfs.tar")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_model_round_trips_to_the_normalized_form(path):
    result = validate_file(path)
    assert result.manifest.to_dict() == result.normalized
    rebuilt = model.from_dict(model.Manifest, json.loads(json.dumps(result.normalized)))
    assert rebuilt == result.manifest


def test_relative_paths_resolve_against_the_manifest_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.yaml"
    manifest.write_text(BASE.replace("{trust: sealed}", "{trust: signed, trusted_keys: [../k.pub, /abs/k2.pub]}"))
    m = load_manifest(manifest)
    assert m.rootfs.source.path == tmp_path / "sub" / "root"
    assert m.integrity.trusted_keys == (tmp_path / "k.pub", Path("/abs/k2.pub"))


def test_load_manifest_raises_with_every_line_and_reports_warnings(tmp_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(MANIFESTS / "broken.yaml")
    assert len(info.value.lines) == len(BROKEN_EXPECTED)
    assert str(info.value).count("\n") == len(BROKEN_EXPECTED) - 1
    assert info.value.exit_code == 1
    with pytest.raises(ManifestUnreadable) as unreadable:
        load_manifest(tmp_path / "missing.yaml")
    assert unreadable.value.exit_code == 2
    dev = tmp_path / "dev.yaml"
    dev.write_text(BASE.replace("{trust: sealed}", "{trust: sealed, fsverity: optional}"))
    seen: list[str] = []
    assert load_manifest(dev, on_warning=seen.append).integrity.fsverity == "optional"
    assert len(seen) == 1 and seen[0].startswith(f"{dev}:5:") and "warning: fs-verity is OPTIONAL" in seen[0]


# -- osbuild ------------------------------------------------------------------------------

def test_osbuild_options_schema_is_self_contained_draft4():
    schema = osbuild_options_schema()
    jsonschema.Draft4Validator.check_schema(schema)
    for ref in walk_refs(schema):
        assert ref.startswith("#/definitions/"), ref
        assert ref.removeprefix("#/definitions/") in schema["definitions"], ref
    assert "osbuild_stage_options" not in schema["definitions"]
    assert json.loads(json.dumps(schema)) == schema


def as_input_locations(manifest: dict) -> dict:
    """A manifest with each host path turned into an input location of the osbuild stage."""
    return map_host_paths(manifest, lambda value, path: f"input://in{len(path)}/{os.path.basename(value)}")


def test_osbuild_options_schema_accepts_input_locations_and_rejects_bad_options():
    validator = jsonschema.Draft4Validator(osbuild_options_schema())
    normalized = load_manifest(MANIFESTS / "ivi-demo.yaml").to_dict()
    staged = as_input_locations(normalized)
    assert list(validator.iter_errors({"manifest": staged})) == []
    assert list(validator.iter_errors({"manifest": staged, "output": {"repository": "/composefs"},
                                       "boot-check": False})) == []
    relative = json.loads(json.dumps(staged))
    relative["rootfs"]["source"]["path"] = "build/rootfs"
    bad = [{}, {"manifest": staged, "bogus": 1}, {"manifest": relative}, {"manifest": normalized},
           {"manifest": staged, "output": {"repository": "composefs"}},
           {"manifest": {**staged, "apiVersion": "bootimg/v0"}}]
    for options in bad:
        assert list(validator.iter_errors(options)), options


def test_osbuild_options_schema_survives_osbuilds_wrapping():
    """osbuild wraps schema_2.options in its stage schema and hoists 'definitions' to the root."""
    options = osbuild_options_schema()
    definitions = options.pop("definitions")
    stage_schema = {
        "title": "Pipeline Stage", "type": "object", "additionalProperties": False,
        "properties": {"type": {"enum": ["org.bootimg.build"]}, "options": options, "mounts": {"type": "array"}},
        "required": ["type"], "definitions": definitions,
    }
    jsonschema.Draft4Validator.check_schema(stage_schema)
    validator = jsonschema.Draft4Validator(stage_schema)
    staged = as_input_locations(load_manifest(MANIFESTS / "minimal.yaml").to_dict())
    assert list(validator.iter_errors({"type": "org.bootimg.build", "options": {"manifest": staged}})) == []
    assert list(validator.iter_errors({"type": "org.bootimg.build", "options": {"manifest": {"apiVersion": 1}}}))


# -- the CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,summary", [
    ("ivi-demo.yaml", "manifests/ivi-demo.yaml: valid: ivi-demo 1.4.0, 4 containers (2 early, 1 basic, 1 default), "
                      "5 KPI budgets + 3 deadlines, trust signed (2 keys), fs-verity required"),
    ("minimal.yaml", "manifests/minimal.yaml: valid: minimal 1.0, 0 containers, 0 KPI budgets, trust sealed, "
                     "fs-verity required"),
])
def test_cli_valid_exit_0(name, summary):
    proc = run_validate(f"manifests/{name}")
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, summary, "")


def test_cli_json_prints_normalized_manifest_sorted():
    proc = run_validate("manifests/ivi-demo.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data == load_manifest(MANIFESTS / "ivi-demo.yaml").to_dict()
    assert proc.stdout == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert data["rootfs"]["source"]["path"] == str(REPO / "build" / "ivi-rootfs")


def test_cli_exit_codes_and_no_traceback(tmp_path):
    cases = {
        "missing.yaml": (2, f"{tmp_path}/missing.yaml: cannot read: No such file or directory"),
        "syntax.yaml": (1, f"{tmp_path}/syntax.yaml:2:1: $: YAML syntax error: "),
        "empty.yaml": (1, f"{tmp_path}/empty.yaml:1:1: $: the file has no YAML document"),
        "binary.yaml": (2, f"{tmp_path}/binary.yaml: cannot read: not UTF-8 text"),
        "": (2, f"{tmp_path}/: cannot read: is a directory"),
    }
    (tmp_path / "syntax.yaml").write_text("a: [1\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\xfa\x00garbage")
    for name, (code, first) in cases.items():
        proc = run_validate(f"{tmp_path}/{name}")
        assert proc.returncode == code, (name, proc.stderr)
        assert proc.stderr.startswith(first), (name, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_cli_json_on_invalid_prints_nothing_to_stdout():
    proc = run_validate("manifests/broken.yaml", "--json")
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr


def test_a_duplicate_key_with_a_bad_value_reports_both():
    assert messages(BASE + "boot:\n  etc: readonly\n  etc: writable\n") == [
        "boot.etc: duplicate key 'etc' (first given at line 7)",
        "boot.etc: must be one of: transient, readonly; got the string 'writable'",
    ]


def test_recursive_alias_is_an_error_not_a_hang():
    assert messages(BASE + "boot: &b {kernel_args: [*b]}\n") == [
        "boot.kernel_args[0]: recursive alias: a node cannot contain itself"]


def test_alias_bomb_is_bounded():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    diagnostics = check("\n".join(lines) + "\n")
    assert len(diagnostics) == 1 and "after expanding aliases" in diagnostics[0][3]


def test_yaml_reader_errors_have_positions():
    assert check("apiVersion: b\x07\n") == [(1, 14, "$", "YAML syntax error: character U+0007 is not allowed")]
    assert check("a: 1\n\tb: 2\n")[0][:2] == (2, 1)
    assert check("[" * 5000 + "]" * 5000) == [(1, 1, "$", "YAML nested too deeply")]


def test_check_inputs_reports_missing_inputs_at_their_lines(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(textwrap.dedent("""\
        apiVersion: bootimg/v1
        identity: {name: t, version: "1", source_date_epoch: 0}
        rootfs:
          source: {type: directory, path: root}
          add_files:
            - {path: /etc/x, source_path: files/x}
        containers:
          - {name: a, image: {type: oci, path: images/a, ref: latest}}
          - {name: b, image: {type: tar, path: images/b.tar}, command: [/b]}
        integrity: {trust: signed, trusted_keys: [keys/k.pub]}
        """))
    assert validate_file(manifest).lines() == []  # existence is not checked by default
    result = validate_file(manifest, check_inputs=True)
    assert [(d.line, d.message.split(":")[0]) for d in result.diagnostics] == [
        (4, "no such directory"), (6, "no such file"), (8, "not an OCI image layout (no index.json) or archive"),
        (9, "no such file"), (10, "no such file")]
    for directory in ("root", "files", "images/a", "keys"):
        (tmp_path / directory).mkdir(parents=True)
    for file in ("files/x", "images/a/index.json", "images/b.tar", "keys/k.pub"):
        (tmp_path / file).write_text("")
    # A trusted key must be a minisign public key (the build puts it in the root).
    assert [(d.line, d.message.split(":")[0]) for d in validate_file(manifest, check_inputs=True).diagnostics] == [
        (10, "malformed public key file")]
    (tmp_path / "keys" / "k.pub").write_bytes(generate_keypair()[1].to_bytes())
    assert validate_file(manifest, check_inputs=True).lines() == []
    # A FIFO is no file to read.
    (tmp_path / "files" / "x").unlink()
    os.mkfifo(tmp_path / "files" / "x")
    assert [d.message for d in validate_file(manifest, check_inputs=True).diagnostics] == [
        f"not a regular file: {tmp_path}/files/x"]
    (tmp_path / "files" / "x").unlink()
    (tmp_path / "files" / "x").write_text("")
    assert load_manifest(manifest, check_inputs=True).container("b").image.path == tmp_path / "images" / "b.tar"


def test_paths_are_relative_to_the_manifest_as_named_not_a_symlink_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "m.yaml").write_text(BASE)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "m.yaml").symlink_to(tmp_path / "real" / "m.yaml")
    m = load_manifest(tmp_path / "link" / "m.yaml")
    assert m.rootfs.source.path == tmp_path / "link" / "root"
    assert m.source_file == tmp_path / "link" / "m.yaml"


# -- what the target cannot use: reserved names, limits of systemd 252 and the kernel -----------

def test_reserved_container_names_are_refused_at_their_line():
    names = ["root", "bootimg", "bootimg-image-a", "systemd-journald", "dbus", "ssh", "emergency", "default",
             "multi-user", "rooty", "cluster", "journald"]
    text = containers("".join(f"- {{name: {n}, image: {{type: oci, path: a, ref: x}}}}\n" for n in names))
    got = check(text)
    assert [(line, col, path) for line, col, path, _ in got] == [(7 + i, 12, f"containers[{i}].name") for i in range(9)]
    assert [m for *_, m in got][:5] == [
        "container name 'root' is reserved: the root image is images/root.cfs",
        "container name 'bootimg' is reserved: bootimg names its own units bootimg-* "
        "(bootimg-image-NAME.service, bootimg-containers.target)",
        "container name 'bootimg-image-a' is reserved: bootimg names its own units bootimg-* "
        "(bootimg-image-NAME.service, bootimg-containers.target)",
        "container name 'systemd-journald' is reserved: systemd-* units are systemd's own",
        "container name 'dbus' is reserved: it names a system unit (dbus.*), which the container's dbus.service "
        "would replace or shadow",
    ]


def test_reserved_names_cover_the_units_of_the_installed_systemd():
    """Every unit the systemd package ships (Debian bookworm: systemd 252, as on the target) whose name a
    container could take is reserved."""
    listing = subprocess.run(["dpkg", "-L", "systemd", "dbus"], capture_output=True, text=True)
    if listing.returncode != 0 and "systemd" not in listing.stdout:
        pytest.skip("no dpkg database with systemd")
    units = {Path(p).name for p in listing.stdout.splitlines()
             if re.search(r"/lib/systemd/system/[^/]+\.(service|socket|target|mount|automount|swap|path|timer|slice)$", p)}
    bases = {u.rsplit(".", 1)[0] for u in units}
    assert len(bases) > 100, "expected systemd's units"
    nameable = {b for b in bases if re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", b)}
    assert {b for b in nameable if reserved.container_name_problem(b) is None} == set()


def test_numeric_limits_are_in_the_schema():
    defs = load_schema()["definitions"]
    assert defs["container"]["properties"]["deadline_ms"]["maximum"] == limits.MAX_DURATION_MS
    assert defs["resources"]["properties"]["memory_max_mib"]["maximum"] == limits.MAX_MEMORY_MIB
    for key in ("kpi_warn_ms", "kpi_fail_ms", "kpi_max_ms"):
        assert defs[key]["maximum"] == limits.MAX_DURATION_MS
    # TimeoutStartSec=2 x deadline, written in whole seconds when it is, stays a time span systemd takes.
    assert 2 * limits.MAX_DURATION_MS // 1000 <= limits.MAX_TIMESPAN_S
    assert 2 * (limits.MAX_DURATION_MS + 500) // 1000 > limits.MAX_TIMESPAN_S


def test_numbers_the_target_cannot_use():
    big = "99999999999999999999"
    text = containers(f"""\
        - {{name: a, image: {{type: oci, path: a, ref: x}}, deadline_ms: {limits.MAX_DURATION_MS},
           resources: {{memory_max_mib: {limits.MAX_MEMORY_MIB}}}, user: "4294967294:0"}}
        - {{name: b, image: {{type: oci, path: a, ref: x}}, deadline_ms: {big}, resources: {{memory_max_mib: {big}}},
           user: "{big}"}}
        - {{name: c, image: {{type: oci, path: a, ref: x}}, deadline_ms: {limits.MAX_DURATION_MS + 1},
           resources: {{memory_max_mib: {limits.MAX_MEMORY_MIB + 1}}}, user: "65535"}}
        - {{name: d, image: {{type: oci, path: a, ref: x}}, user: "1000:4294967295"}}
        - {{name: e, image: {{type: oci, path: a, ref: x}}, user: "0100"}}
        - {{name: f, image: {{type: oci, path: a, ref: x}}, user: "0:0"}}
        """) + textwrap.dedent(f"""\
        kpis:
          - {{name: k, measure: initrd, statistic: max, warn_ms: {big}, fail_ms: {limits.MAX_DURATION_MS},
             max_ms: {limits.MAX_DURATION_MS + 1}}}
        """)
    assert messages(text) == [
        f"containers[1].deadline_ms: must be <= {limits.MAX_DURATION_MS}, got {big}",
        f"containers[1].resources.memory_max_mib: must be <= {limits.MAX_MEMORY_MIB}, got {big}",
        f"containers[1].user: uid {big} is not a 32-bit id (at most 4294967294)",
        f"containers[2].deadline_ms: must be <= {limits.MAX_DURATION_MS}, got {limits.MAX_DURATION_MS + 1}",
        f"containers[2].resources.memory_max_mib: must be <= {limits.MAX_MEMORY_MIB}, got {limits.MAX_MEMORY_MIB + 1}",
        "containers[2].user: uid 65535 is not a valid id for systemd (the 16-bit -1)",
        "containers[3].user: gid 4294967295 is not a valid id for systemd (the 32-bit -1)",
        "containers[4].user: uid 0100 has a leading zero, which systemd does not read as a number",
        f"kpis[0].warn_ms: must be <= {limits.MAX_DURATION_MS}, got {big}",
        f"kpis[0].warn_ms: warn_ms {big} is above fail_ms {limits.MAX_DURATION_MS}; a KPI warns before it fails",
        f"kpis[0].max_ms: must be <= {limits.MAX_DURATION_MS}, got {limits.MAX_DURATION_MS + 1}",
    ]


def _kernel_args(*args: str) -> str:
    return BASE + "boot:\n  kernel_args: [" + ", ".join(json.dumps(a) for a in args) + "]\n"


def test_kernel_command_line_must_fit_the_kernels_buffer():
    added = limits.added_length([])
    assert added == len("composefs.digest=v1-sha256-12:") + 64 + 1 + len("bootimg.release=/bootimg/releases/") + 64 \
        + 1 + len("bootimg.security_version=") + 10 + 1 + len("root=PARTUUID=") + 36 + 1 + len("rw")
    # The build's arguments, " quiet", " xxx...": exactly the 2047 bytes the kernel keeps.
    n = limits.CMDLINE_MAX - added - len(" quiet") - len(" ")
    assert messages(_kernel_args("quiet", "x" * n)) == []
    assert check(_kernel_args("quiet", "x" * (n + 1), "loglevel=3")) == [
        (7, 26, "boot.kernel_args[1]",
         f"the kernel command line would be {limits.CMDLINE_MAX + 1} bytes with this argument, over the 2047 the kernel "
         f"keeps (COMMAND_LINE_SIZE 2048 on x86_64 and arm64, with its NUL); {added} of them are the build's and boot chain's "
         "(composefs.digest=v1-sha256-12:<64 hex digits>, bootimg.release=/bootimg/releases/<version>, "
         "bootimg.security_version=<32-bit>, root=PARTUUID=<uuid>, rw)")]
    # An argument the manifest sets itself is not counted twice; a huge one is reported once, in one line.
    without_root = added - len(" root=PARTUUID=") - 36
    assert limits.added_length(["root=/dev/vda2"]) == without_root
    n = limits.CMDLINE_MAX - without_root - len(" root=/dev/vda2") - len(" ")
    assert messages(_kernel_args("root=/dev/vda2", "x" * n)) == []
    assert len(messages(_kernel_args("root=/dev/vda2", "x" * (n + 1)))) == 1
    huge = messages(_kernel_args("x" * 3_000_000, "quiet"))
    assert len(huge) == 1 and huge[0].startswith("boot.kernel_args[0]: the kernel command line would be 3000") \
        and len(huge[0]) < 400


def test_kernel_arguments_that_break_the_command_line():
    assert messages(_kernel_args('a="b c"', 'opt="x', "nul\0", "ok=\"q\"")) == [
        "boot.kernel_args[0]: invalid value 'a=\"b c\"': must be one argument without whitespace",
        "boot.kernel_args[1]: has an unbalanced '\"': the kernel would read the rest of the command line into this "
        "argument",
        "boot.kernel_args[2]: contains a control character",
    ]


def test_commands_environment_and_binds_systemd_cannot_take():
    text = containers("""\
        - name: a
          image: {type: oci, path: a, ref: x}
          command: [rel/x, "nul\\0"]
          environment: {A: "x\\0y", B: fine}
          binds: [{source: "/a b", target: /x}, {source: /ok, target: "/c:d"}]
        - {name: b, image: {type: oci, path: a, ref: x}, command: ["-x"]}
        - {name: c, image: {type: oci, path: a, ref: x}, command: [app, "-x", "$HOME"]}
        """)
    assert messages(text) == [
        "containers[0].command[0]: 'rel/x' cannot be an executable for systemd (an absolute path or a bare name, "
        "without quotes, backslashes, '$', control characters or a leading '-@:+!')",
        "containers[0].command[1]: 'nul\\x00' contains a NUL byte, which no command line can hold",
        "containers[0].environment.A: contains a NUL byte, which no environment variable can hold",
        "containers[0].binds[0].source: '/a b' contains whitespace, ':', a quote, a backslash or a control character, "
        "which systemd and podman cannot take in a bind",
        "containers[0].binds[1].target: '/c:d' contains whitespace, ':', a quote, a backslash or a control character, "
        "which systemd and podman cannot take in a bind",
        "containers[1].command[0]: '-x' cannot be an executable for systemd (an absolute path or a bare name, "
        "without quotes, backslashes, '$', control characters or a leading '-@:+!')",
    ]


def test_lone_surrogates_are_unreadable_but_pairs_are_one_character():
    text = BASE + '  add_files:\n    - {path: "/etc/a", text: "x\\ud800"}\n    - {path: "/etc/\\ud83d\\ude00", text: ok}\n'
    text = text.replace("integrity: {trust: sealed}\n", "") + "integrity: {trust: sealed}\n"
    result = validate_text(text, "m.yaml", "/base")
    assert result.lines() == ["m.yaml:6:30: rootfs.add_files[0].text: cannot read value: \\ud800 is a lone UTF-16 "
                              "surrogate, not a character"]
    assert result.normalized["rootfs"]["add_files"][1]["path"] == "/etc/\U0001F600"


# -- add_files and excludes: what the build would refuse or silently override ----------------------

def _rootfs(extra: str, containers_yaml: str = "") -> str:
    text = BASE.replace("integrity: {trust: sealed}\n", "") + textwrap.indent(textwrap.dedent(extra), "  ")
    if containers_yaml:
        text += "containers:\n" + textwrap.indent(textwrap.dedent(containers_yaml), "  ")
    return text + "integrity: {trust: sealed}\n"


def test_add_files_paths_no_tree_can_hold():
    long_name = "é" * 128  # 128 characters, 256 bytes
    text = _rootfs(f"""\
        add_files:
          - {{path: "/etc/a\\0b", text: x}}
          - {{path: /etc/{long_name}, text: x}}
          - {{path: /etc/{"a" * 255}, text: x}}
          - {{path: {"/" + "/".join(["d" * 200] * 21)}, text: x}}
        """)
    got = check(text)
    assert [(line, col, path) for line, col, path, _ in got] == [
        (6, 14, "rootfs.add_files[0].path"), (7, 14, "rootfs.add_files[1].path"), (9, 14, "rootfs.add_files[3].path")]
    assert [m for *_, m in got] == [
        "contains a NUL byte, which no file name can hold",
        f"has a name of 256 bytes ('{long_name[:56]}...'); a file name has at most 255",
        "is 4221 bytes long; a path has at most 4096",
    ]


def test_add_files_under_another_added_file():
    text = _rootfs("""\
        add_files:
          - {path: /etc/a/b, text: x}
          - {path: /etc/a, text: x}
          - {path: /etc/c, text: x}
          - {path: /etc/c/d/e, text: x}
          - {path: /etc/cd, text: x}
          - {path: "/etc/n\\nl", text: x}
          - {path: "/etc/n\\nl/x", text: x}
        """)
    assert check(text) == [
        (6, 14, "rootfs.add_files[0].path", "'/etc/a/b' is under '/etc/a', which add_files[1] adds as a file"),
        (9, 14, "rootfs.add_files[3].path", "'/etc/c/d/e' is under '/etc/c', which add_files[2] adds as a file"),
        (12, 14, "rootfs.add_files[6].path", "'/etc/n\\x0al/x' is under '/etc/n\\x0al', which add_files[5] adds as a "
                                             "file"),
    ]


def test_add_files_that_bootimg_writes_itself():
    text = _rootfs("""\
        add_files:
          - {path: /usr/lib/bootimg/containers.json, text: x}
          - {path: /usr/lib/bootimg/keys/extra.pub, text: x}
          - {path: /usr/libexec/bootimg, text: x}
          - {path: /usr/lib/systemd/system/app.service, text: x}
          - {path: /usr/lib/systemd/system/bootimg-image-app.service, text: x}
          - {path: /usr/share/containers/systemd/app.container, text: x}
          - {path: /usr/lib/systemd/system/other.service, text: x}
          - {path: /usr/lib/systemd/system/app.service.d/10-mine.conf, text: x}
          - {path: /etc/dracut.conf.d/90-bootimg.conf/x, text: x}
          - {path: /sysroot/x, text: x}
        """, "- {name: app, image: {type: oci, path: a, ref: x}}\n")
    assert messages(text) == [
        "rootfs.add_files[0].path: '/usr/lib/bootimg/containers.json' is inside /usr/lib/bootimg, which bootimg fills "
        "itself (the containers' digests, the trusted keys and boot.conf)",
        "rootfs.add_files[1].path: '/usr/lib/bootimg/keys/extra.pub' is inside /usr/lib/bootimg, which bootimg fills "
        "itself (the containers' digests, the trusted keys and boot.conf)",
        "rootfs.add_files[2].path: /usr/libexec/bootimg is bootimg's own directory (bootimg-setup-root); "
        "a file cannot take its place",
        "rootfs.add_files[3].path: bootimg writes /usr/lib/systemd/system/app.service itself (the unit of container "
        "'app') and would replace this file",
        "rootfs.add_files[4].path: bootimg writes /usr/lib/systemd/system/bootimg-image-app.service itself (the image "
        "mount unit of container 'app') and would replace this file",
        "rootfs.add_files[5].path: bootimg writes /usr/share/containers/systemd/app.container itself (the podman "
        "quadlet of container 'app') and would replace this file",
        "rootfs.add_files[8].path: '/etc/dracut.conf.d/90-bootimg.conf/x' is under /etc/dracut.conf.d/90-bootimg.conf, "
        "a file bootimg writes itself (the dracut configuration that enables that module)",
        "rootfs.add_files[9].path: '/sysroot/x' is inside /sysroot, which bootimg fills itself (an empty directory "
        "the physical root is mounted on at boot)",
    ]
    assert messages(_rootfs("add_files: [{path: /usr/lib/systemd, text: x}]\n")) == [
        "rootfs.add_files[0].path: '/usr/lib/systemd' must stay a directory: bootimg writes /usr/lib/systemd/system/"
        "bootimg-containers.target there (the target that starts the containers)"]


def test_exclude_must_name_more_than_the_root():
    assert messages(_rootfs("exclude: [/, //, ///, /**, //a]\n")) == [
        "rootfs.exclude[0]: invalid value '/': must be an absolute path glob (starting with '/') naming more than the root",
        "rootfs.exclude[1]: invalid value '//': must be an absolute path glob (starting with '/') naming more than "
        "the root",
        "rootfs.exclude[2]: invalid value '///': must be an absolute path glob (starting with '/') naming more than "
        "the root",
    ]


# -- validate reports it at its place; build refuses it in one line and leaves nothing -----------

BUILD_BASE = """\
apiVersion: bootimg/v1
identity: {name: t, version: "1", source_date_epoch: 0}
rootfs:
  source: {type: directory, path: root}
  exclude: [/var/cache/**]
  add_files:
    - {path: /etc/motd, text: hi}
containers:
  - {name: app, image: {type: directory, path: img}, command: [/bin/app]}
integrity: {trust: sealed}
boot:
  kernel_args: [quiet]
"""

ADD = "- {path: /etc/motd, text: hi}"
APP = "command: [/bin/app]}"
ADD_MSG = "rootfs.add_files[0].path"

# (id, replace this, by that, where the error is (the first occurrence of this text), its path, its message)
REFUSED = [
    ("name-root", "name: app", "name: root", "root, image", "containers[0].name", "container name 'root' is reserved"),
    ("name-systemd", "name: app", "name: systemd-journald", "systemd-", "containers[0].name",
     "container name 'systemd-journald' is reserved"),
    ("name-unit", "name: app", "name: dbus", "dbus", "containers[0].name", "container name 'dbus' is reserved"),
    ("name-bootimg", "name: app", "name: bootimg-containers", "bootimg-", "containers[0].name",
     "container name 'bootimg-containers' is reserved"),
    ("deadline", APP, "command: [/bin/app], deadline_ms: 99999999999999999999}", "999", "containers[0].deadline_ms",
     "must be <= 9223372036854000"),
    ("memory", APP, "command: [/bin/app], resources: {memory_max_mib: 99999999999999999999}}", "999",
     "containers[0].resources.memory_max_mib", "must be <= 17592186044415"),
    ("uid", APP, 'command: [/bin/app], user: "99999999999999999999"}', '"999', "containers[0].user",
     "uid 99999999999999999999 is not a 32-bit id"),
    ("uid-16bit", APP, 'command: [/bin/app], user: "1000:65535"}', '"1000', "containers[0].user",
     "gid 65535 is not a valid id for systemd"),
    ("command", APP, "command: [bin/app]}", "bin/app", "containers[0].command[0]",
     "'bin/app' cannot be an executable for systemd"),
    ("command-nul", APP, 'command: [/bin/app, "a\\0"]}', '"a', "containers[0].command[1]", "'a\\x00' contains a NUL"),
    ("bind", APP, 'command: [/bin/app], binds: [{source: "/a b", target: /x}]}', '"/a b', "containers[0].binds[0].source",
     "'/a b' contains whitespace"),
    ("cmdline", "kernel_args: [quiet]", "kernel_args: [quiet, " + "x" * 3000 + "]", "xxx", "boot.kernel_args[1]",
     "the kernel command line would be 3290 bytes"),
    ("cmdline-quote", "kernel_args: [quiet]", "kernel_args: [quiet, 'a=\"b']", "'a=", "boot.kernel_args[1]",
     "has an unbalanced '\"'"),
    ("add-nul", ADD, '- {path: "/etc/m\\0otd", text: hi}', '"/etc', ADD_MSG, "contains a NUL byte"),
    ("add-name", ADD, "- {path: /etc/" + "m" * 256 + ", text: hi}", "/etc/m", ADD_MSG, "has a name of 256 bytes"),
    ("add-under-added", ADD, ADD + "\n    - {path: /etc/motd/x, text: y}", "/etc/motd/x", "rootfs.add_files[1].path",
     "'/etc/motd/x' is under '/etc/motd', which add_files[0] adds as a file"),
    ("add-bootimg-file", ADD, "- {path: /usr/lib/bootimg/containers.json, text: x}", "/usr", ADD_MSG,
     "'/usr/lib/bootimg/containers.json' is inside /usr/lib/bootimg, which bootimg fills itself"),
    ("add-container-unit", ADD, "- {path: /usr/lib/systemd/system/app.service, text: x}", "/usr", ADD_MSG,
     "bootimg writes /usr/lib/systemd/system/app.service itself (the unit of container 'app')"),
    ("add-bootimg-parent", ADD, "- {path: /usr/libexec, text: x}", "/usr", ADD_MSG,
     "'/usr/libexec' must stay a directory: bootimg writes /usr/libexec/bootimg there"),
    ("add-surrogate", ADD, '- {path: /etc/motd, text: "\\ud800"}', '"\\ud', "rootfs.add_files[0].text",
     "cannot read value: \\ud800 is a lone UTF-16 surrogate"),
    ("exclude-root", "exclude: [/var/cache/**]", "exclude: [/var/cache/**, //]", "//", "rootfs.exclude[1]",
     "invalid value '//': must be an absolute path glob"),
    # Against the root source (directory or tar), when inputs are checked (build always checks them).
    ("root-unit-etc", "name: app", "name: web", "web", "containers[0].name",
     "the root source already has /etc/systemd/system/web.socket, which this container's web.service would replace"),
    ("root-unit-usr", "name: app", "name: cache", "cache, image", "containers[0].name",
     "the root source already has /usr/lib/systemd/system/cache.service"),
    ("root-symlink", ADD, "- {path: /etc/lnk/x, text: x}", "/etc/lnk", ADD_MSG,
     "'/etc/lnk/x' is under /etc/lnk, which is a symlink in the root source (the build never writes through symlinks)"),
    ("root-file", ADD, "- {path: /etc/file/x, text: x}", "/etc/file", ADD_MSG,
     "'/etc/file/x' is under /etc/file, which is a file in the root source (not a directory)"),
    ("root-dir", ADD, "- {path: /etc/dir, text: x}", "/etc/dir", ADD_MSG,
     "'/etc/dir' is a directory in the root source; a file cannot replace it"),
    ("root-sysroot", "path: root}", "path: root-sysroot}", "root-sysroot", "rootfs.source.path",
     "the root source's /sysroot must be an empty directory (the physical root is mounted on it at boot); "
     "it holds: leftover"),
    ("root-libexec", "path: root}", "path: root-libexec}", "root-libexec", "rootfs.source.path",
     "the root source's /usr/libexec is a symlink; bootimg writes /usr/libexec/bootimg below it"),
]


def _make_root(top: Path, name: str, tar: bool) -> None:
    import tarfile

    root = top / name
    for d in ("etc/systemd/system", "etc/dir", "usr/lib/systemd/system", "var/cache/old"):
        (root / d).mkdir(parents=True)
    (root / "etc/dir/f").write_text("f\n")
    (root / "etc/file").write_text("x\n")
    (root / "etc/lnk").symlink_to("/tmp")
    (root / "etc/systemd/system/web.socket").write_text("[Socket]\nListenStream=80\n")
    (root / "usr/lib/systemd/system/cache.service").write_text("[Service]\nExecStart=/bin/true\n")
    (root / "var/cache/old/x").write_text("x\n")
    if name == "root-sysroot":
        (root / "sysroot").mkdir()
        (root / "sysroot/leftover").write_text("x\n")
    if name == "root-libexec":
        (root / "usr/libexec").symlink_to("lib")
    if tar:  # only files and symlinks: the directories are implied by their members
        with tarfile.open(top / f"{name}.tar.gz", "w:gz") as t:
            for path in sorted(root.rglob("*")):
                if path.is_symlink() or not path.is_dir():
                    t.add(path, str(path.relative_to(root)), recursive=False)
        shutil.rmtree(root)


@pytest.fixture(scope="module", params=["directory", "tar"])
def refusal_workspace(request, tmp_path_factory) -> tuple[Path, str]:
    top = tmp_path_factory.mktemp(f"refuse-{request.param}")
    for name in ("root", "root-sysroot", "root-libexec"):
        _make_root(top, name, request.param == "tar")
    (top / "img" / "bin").mkdir(parents=True)
    (top / "img" / "bin" / "app").write_text("#!/bin/sh\n")
    (top / "img" / "bin" / "app").chmod(0o755)
    base = BUILD_BASE
    if request.param == "tar":
        base = re.sub(r"\{type: directory, path: (root[-a-z]*)\}", r"{type: tar, path: \1.tar.gz}", base)
    return top, base


def _build_in_process(manifest: Path, out: Path, capsys) -> tuple[int, list[str]]:
    from bootimg.cli import main

    code = main(["build", str(manifest), "-o", str(out), "--no-boot-check"])
    return code, [line for line in capsys.readouterr().err.splitlines() if not line.startswith("bootimg build: note:")]


def test_the_refusal_workspace_itself_is_valid_and_builds(refusal_workspace, capsys):
    top, base = refusal_workspace
    manifest = top / "base.yaml"
    manifest.write_text(base)
    assert validate_file(manifest, check_inputs=True).lines() == []
    code, err = _build_in_process(manifest, top / "out-base", capsys)
    assert (code, err) == (0, [])
    # What an exclude removes from the root source does not collide.
    manifest.write_text(base.replace(ADD, ADD + "\n    - {path: /var/cache/old, text: x}")
                        .replace("name: app", "name: web").replace("[/var/cache/**]", "[/var/cache/**, /etc/systemd/**]"))
    assert validate_file(manifest, check_inputs=True).lines() == []


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_validate_reports_and_build_refuses(refusal_workspace, case, capsys):
    top, base = refusal_workspace
    name, old, new, marker, path, message = case
    if "path: root}" in old and "type: tar" in base:
        old, new = old.replace("root}", "root.tar.gz}"), new.replace("}", ".tar.gz}")
    assert old in base
    text = base.replace(old, new, 1)
    offset = text.index(marker)
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    manifest = top / f"{name}.yaml"
    manifest.write_text(text)
    result = validate_file(manifest, check_inputs=True)
    assert len(result.errors) == 1, result.lines()
    first = result.lines()[0]
    assert first.startswith(f"{manifest}:{line}:{column}: {path}: {message}"), first
    before = sorted(p.name for p in top.iterdir())
    code, err = _build_in_process(manifest, top / f"out-{name}", capsys)
    assert (code, err) == (1, [f"bootimg build: {first}"])
    assert sorted(p.name for p in top.iterdir()) == before  # no output, no temp dir


# -- boot.initramfs (the lean initramfs profile) -----------------------------------------

def test_initramfs_profile_loads_into_the_model_and_release_dict():
    text = BASE + ("boot:\n  initramfs:\n    drivers: [virtio_blk, ext4]\n    modules: [systemd-initrd]\n"
                   "    omit: [plymouth]\n    compress: xz\n    compress_level: 6\n")
    result = validate_text(text, "m.yaml", "/base")
    assert result.errors == []
    profile = result.manifest.boot.initramfs
    assert profile.drivers == ("virtio_blk", "ext4") and profile.modules == ("systemd-initrd",)
    assert profile.to_dict() == {"drivers": ["virtio_blk", "ext4"], "modules": ["systemd-initrd"], "omit": ["plymouth"],
                                 "compress": "xz", "compress_level": 6}
    assert validate_text(BASE, "m.yaml", "/base").manifest.boot.initramfs is None


def test_initramfs_profile_errors_name_line_and_column():
    text = BASE + ("boot:\n"
                   "  initramfs:\n"
                   "    drivers: [virtio_blk, 'bad/name']\n"
                   "    modules: [systemd-initrd, base]\n"
                   "    omit: [bootimg, systemd, base]\n"
                   "    compress: bzip2\n"
                   "    hostonly: true\n")
    got = check(text)
    msgs = [f"{line}:{col}: {path}: {msg}" for line, col, path, msg in got]
    assert "8:27: boot.initramfs.drivers[1]: invalid value 'bad/name': must be a kernel module name (letters, digits, " \
           "'_' or '-', at most 55 characters), e.g. 'virtio_blk'" in msgs
    assert any(m.startswith("10:12: boot.initramfs.omit[0]: 'bootimg' cannot be omitted: it is bootimg's own") for m in msgs)
    assert any(m.startswith("10:21: boot.initramfs.omit[1]: 'systemd' cannot be omitted: bootimg's dracut module "
                            "depends on it") for m in msgs)
    assert "10:30: boot.initramfs.omit[2]: 'base' is also in modules (modules[1]); a dracut module is either listed " \
           "or omitted" in msgs
    assert any(m.startswith("11:15: boot.initramfs.compress: ") and "gzip" in m for m in msgs)
    assert any(m.startswith("12:5: boot.initramfs.hostonly: unknown key 'hostonly'") for m in msgs)


@pytest.mark.parametrize("profile, expected", [
    ("{compress_level: 9}", "boot.initramfs.compress_level: a level needs its compressor: add compress"),
    ("{compress: gzip, compress_level: 0}", "boot.initramfs.compress_level: gzip has levels 1-9, not 0"),
    ("{compress: zstd, compress_level: 19}", None),
    ("{compress: xz, compress_level: 0}", None),
    ("{compress: lz4, compress_level: 13}", "boot.initramfs.compress_level: lz4 has levels 1-12, not 13"),
    ("{compress: lz4, compress_level: 12}", None),
    ("{drivers: []}", "boot.initramfs.drivers: "),
    ("{drivers: [ext4, ext4]}", "boot.initramfs.drivers[1]: duplicate item 'ext4' (same as item 0)"),
])
def test_initramfs_compress_levels_and_lists(profile, expected):
    got = messages(BASE + f"boot:\n  initramfs: {profile}\n")
    if expected is None:
        assert got == []
    else:
        assert len(got) == 1 and got[0].startswith(expected), got


def test_initramfs_profile_keeps_the_emergency_shell_of_the_emergency_policy():
    policy = "boot:\n  on_verification_failure: emergency\n  initramfs:\n"
    got = messages(BASE + policy + "    modules: [systemd-initrd]\n")
    assert sorted(m for m in got if "initramfs" in m) == [
        "boot.initramfs.modules: on_verification_failure is emergency: the initramfs needs dracut's 'base' module "
        "for its emergency shell; add it",
        "boot.initramfs.modules: on_verification_failure is emergency: the initramfs needs dracut's 'dracut-systemd' "
        "module for its emergency shell; add it"]
    got = messages(BASE + policy + "    omit: [base]\n")
    assert [m for m in got if "initramfs" in m] == [
        "boot.initramfs.omit[0]: on_verification_failure is emergency: the initramfs needs 'base' for its emergency shell"]
    assert [m for m in messages(BASE + policy + "    modules: [systemd-initrd, dracut-systemd, base]\n")
            if "initramfs" in m] == []
