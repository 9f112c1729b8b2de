"""bootimg-setup-root under fuzzed inputs, end to end (tests/setup_root/fuzz_e2e.py): a fixed-seed
batch of damaged boot.conf, kernel command lines, release.json, signatures and trusted keys, run
for real (mounts in a private namespace) by the TEST build under ASan/UBSan. Every run fails
closed (one FATAL line, nothing mounted) or boots the genuine root. bench/fuzz_setup_root.py runs
longer batches with other seeds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, have, is_root, run_cli

from bootimg.boot import setup_root

sys.path.insert(0, str(REPO / "tools"))
import example_inputs  # noqa: E402

DRIVER = Path(__file__).parent / "setup_root" / "fuzz_e2e.py"


def signed_release(top: Path) -> Path:
    shutil.copytree(REPO / "manifests", top / "manifests")
    example_inputs.main(top / "build")
    out = top / "release"
    res = run_cli("build", str(top / "manifests" / "ivi-demo.yaml"), "-o", str(out),
                  "--key", str(top / "build" / "keys" / "release-2026.key"), "--no-boot-check")
    assert res.returncode == 0, res.stderr.decode()
    return out


def run_batch(program: Path, release: Path, work: Path, seed: int, count: int) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(DRIVER), str(program),
                           str(release), str(work), str(seed), str(count)],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.kernel
@pytest.mark.skipif(not is_root(), reason="needs root for kernel mounts")
@pytest.mark.skipif(not have("unshare"), reason="needs unshare")
def test_fuzzed_inputs_fail_closed(tmp_path):
    program = setup_root.build(variant="test-asan")
    res = run_batch(program, signed_release(tmp_path / "ws"), tmp_path / "work", seed=20260101, count=150)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "fuzz_e2e: 150 cases" in res.stdout
    # the batch exercised both outcomes: refusals, and damage to what is not authenticated
    assert " 0 refused" not in res.stdout, res.stdout
