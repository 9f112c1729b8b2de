"""bootimg-setup-root's rollback counter against a real TPM 2.0: swtpm (libtpms), the TPM
simulator QEMU uses, and tpm2-tools (tpm2-tss) to cross-check.

This host's kernel has no TPM drivers and no vtpm_proxy (so `swtpm chardev --vtpm-proxy` cannot
make a /dev/tpmrm0 here): swtpm serves its socket (`swtpm socket --server type=unixio`), where
raw TPM2 commands go in and responses come out exactly as through /dev/tpmrm0, and the TEST
builds talk to it (BOOTIMG_TEST_TPM=unix:PATH); tpm2-tools reach the same swtpm through tss2's
swtpm TCTI. The program's own code defines, increments and reads the counter; tpm2-tools read
what it wrote and write what it reads; its commands carry the same handles and parameters as
tpm2-tools' (which authorize with HMAC sessions, the program with the password session). Then the
whole chain: the root setup refuses a release below the TPM's counter with the state file
deleted, bless raises the counter, and a counter that starts high (a TPM whose counters counted
higher before) is reported.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import test_setup_root as tsr
from conftest import have
from test_setup_root import _set_security_version, assert_failed_closed, assert_verified_root, kernel_test
from test_setup_root_units import ENV, build_check

# test_setup_root's releases and scenarios, for this module too
workspace, releases, keyids, test_program, scenario = tsr.workspace, tsr.releases, tsr.keyids, tsr.test_program, tsr.scenario

NV = "0x01500016"

pytestmark = pytest.mark.skipif(not (have("swtpm") and have("tpm2_nvread")),
                                reason="needs swtpm and tpm2-tools (tools/setup-host.sh)")


class Swtpm:
    """One swtpm with a fresh state, serving a unix socket; tools() runs tpm2-tools against it."""

    def __init__(self, top: Path):
        top.mkdir(parents=True, exist_ok=True)
        (top / "state").mkdir()
        self.sock = top / "sock"
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={top / 'state'}", "--server",
             f"type=unixio,path={self.sock}", "--ctrl", f"type=unixio,path={self.sock}.ctrl",
             "--flags", "not-need-init,startup-clear"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(200):
            if self.sock.exists() and Path(f"{self.sock}.ctrl").exists():
                break
            assert self.proc.poll() is None, self.proc.stdout.read()
            time.sleep(0.025)
        else:
            raise AssertionError("swtpm did not start")
        self.env = {"BOOTIMG_TEST_TPM": f"unix:{self.sock}"}

    def tools(self, *argv: str, log: bool = False) -> subprocess.CompletedProcess:
        env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:path={self.sock}", **({"TSS2_LOG": "tcti+debug"} if log else {})}
        return subprocess.run(list(argv), capture_output=True, env=env, timeout=60)

    def nvread(self, index: str = NV) -> int:
        res = self.tools("tpm2_nvread", index)
        assert res.returncode == 0, res.stderr
        return int.from_bytes(res.stdout, "big")

    def nvpublic(self, index: str = NV) -> tuple[int, int] | None:
        """(attributes, size) of an index per tpm2_nvreadpublic, None if it is not defined."""
        res = self.tools("tpm2_nvreadpublic", index)
        if res.returncode != 0:
            return None
        text = res.stdout.decode()
        attrs = re.search(r"attributes:\n(?:.*\n)*?\s+value: (0x[0-9A-Fa-f]+)", text).group(1)
        return int(attrs, 16), int(re.search(r"\n\s+size: (\d+)", text).group(1))

    def count_up_and_delete(self, index: str, times: int) -> None:
        """A counter that counted to `times` and was deleted: the TPM remembers its count."""
        assert self.tools("tpm2_nvdefine", index, "-C", "o", "-s", "8", "-a", "nt=counter|authread|authwrite").returncode == 0
        for _ in range(times):
            assert self.tools("tpm2_nvincrement", index).returncode == 0
        assert self.tools("tpm2_nvundefine", index).returncode == 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def swtpm(tmp_path):
    tpm = Swtpm(tmp_path / "swtpm")
    yield tpm
    tpm.stop()


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> Path:
    return build_check(tmp_path_factory.mktemp("check") / "check")


def run(check: Path, tpm: Swtpm, *args: str) -> str:
    res = subprocess.run([str(check), *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **ENV, **tpm.env})
    assert res.returncode in (0, 1), f"sanitizer or usage error {res.returncode}: {res.stderr}"
    return res.stdout.strip()


# bootimg's counter: TPM_NT_COUNTER | OWNERWRITE | AUTHWRITE | OWNERREAD | AUTHREAD | NO_DA; WRITTEN once incremented
ATTRIBUTES = 0x02060016
WRITTEN = 0x20000000


def test_counter_written_by_the_program_reads_back_with_tpm2_tools(check, swtpm):
    assert run(check, swtpm, "tpm-read", NV) == "undefined"
    assert swtpm.nvpublic() is None
    assert run(check, swtpm, "tpm-raise", NV, "0") == "0 -> 0 defined"         # defined, never incremented
    assert swtpm.nvpublic() == (ATTRIBUTES, 8)
    assert run(check, swtpm, "tpm-read", NV) == "0"
    assert run(check, swtpm, "tpm-raise", NV, "5") == "0 -> 5"
    assert swtpm.nvpublic() == (ATTRIBUTES | WRITTEN, 8)
    assert swtpm.nvread() == 5
    assert run(check, swtpm, "tpm-raise", NV, "3") == "5 -> 5"                  # never lowered
    assert swtpm.nvread() == 5
    assert swtpm.tools("tpm2_nvincrement", NV).returncode == 0                  # and the other way round
    assert run(check, swtpm, "tpm-read", NV) == "6"
    # an index that is not a counter is refused, not read
    assert swtpm.tools("tpm2_nvdefine", "0x01500020", "-C", "o", "-s", "8", "-a", "authread|authwrite").returncode == 0
    assert run(check, swtpm, "tpm-read", "0x01500020").startswith(
        "error: NV index 0x01500020 is not an 8-byte counter readable with its password (attributes 0x000")


def test_a_new_counter_starts_at_the_tpms_highest_count(check, swtpm):
    """TPM2_NV_Increment of a never-written counter sets it to the highest count any counter of
    this TPM had (here a deleted one's, 6) plus one: the program reads the value back after each
    increment instead of counting them."""
    swtpm.count_up_and_delete("0x01500017", 6)
    assert run(check, swtpm, "tpm-raise", NV, "2") == "0 -> 7 defined"
    assert swtpm.nvread() == 7


def _trace_commands(res: subprocess.CompletedProcess) -> dict[int, bytes]:
    """The commands tss2's TCTI sent (TSS2_LOG=tcti+debug), by command code (the last one)."""
    lines = res.stderr.decode(errors="replace").splitlines()
    found = {}
    for i, line in enumerate(lines):
        m = re.search(r"Sending command with TPM_CC (0x[0-9a-f]+) and size (\d+)", line)
        if not m:
            continue
        j = next(k for k in range(i, len(lines)) if "Writing" in lines[k] and "bytes to socket" in lines[k]) + 1
        data = b""
        while j < len(lines) and re.match(r"^[0-9a-f]{4}: ", lines[j]):
            data += bytes.fromhex(lines[j][6:].split(" ", 1)[0])
            j += 1
        assert len(data) == int(m.group(2)), lines[i:j]
        found[int(m.group(1), 16)] = data
    return found


def _split(cmd: bytes, handles: int) -> tuple[bytes, bytes, bytes]:
    """(header's tag-less code, handles, parameters) of a command: the authorization area skipped."""
    head, hs = cmd[6:10], cmd[10:10 + 4 * handles]
    if cmd[:2] == b"\x80\x01":
        return head, hs, cmd[10 + 4 * handles:]
    auth = int.from_bytes(cmd[10 + 4 * handles:14 + 4 * handles], "big")
    return head, hs, cmd[14 + 4 * handles + auth:]


def test_commands_carry_what_tpm2_tools_sends(check, swtpm):
    """Handles and parameters byte for byte as tpm2-tools sends them for the same operations
    (its authorization is an HMAC session, the program's the password session)."""
    attrs = "ownerwrite|authwrite|nt=counter|ownerread|authread|no_da"
    ops = [("define", 0x12A, 1, ["tpm2_nvdefine", NV, "-C", "o", "-s", "8", "-a", attrs]),
           ("read-public", 0x169, 1, ["tpm2_nvreadpublic", NV]),
           ("increment", 0x134, 2, ["tpm2_nvincrement", NV]),
           ("read", 0x14E, 2, ["tpm2_nvread", NV, "-s", "8", "--offset", "0"])]
    for which, code, handles, argv in ops:
        res = swtpm.tools(*argv, log=True)
        assert res.returncode == 0, res.stderr[-2000:]
        theirs = _trace_commands(res)[code]
        ours = bytes.fromhex(run(check, swtpm, "tpm-command", which, NV))
        assert _split(ours, handles) == _split(theirs, handles), which
    assert swtpm.nvread() == 1


# -- the whole chain: root setup and bless with the TPM ------------------------------------------------------

@kernel_test
def test_root_setup_refuses_a_release_below_the_tpm_counter(scenario, check, swtpm):
    """The state file deleted (or never written), the TPM's counter at 5: a release with
    security_version 3 is refused, naming the TPM; 5 boots; a higher state file wins."""
    s = scenario("signed", layout="releases")
    assert run(check, swtpm, "tpm-raise", NV, "5") == "0 -> 5 defined"
    _set_security_version(s, 3)
    o = s.run(env=swtpm.env)
    assert_failed_closed(o, "")
    assert o.fatal_lines() == ["bootimg: FATAL: release 1.4.0 has security_version 3, below this device's minimum 5 "
                               "(TPM NV 0x01500016)"]
    _set_security_version(s, 5)
    o = s.run(env=swtpm.env)
    assert_verified_root(o, s.digest)
    assert (o.booted["rollback_minimum"], o.booted["rollback_store"]) == (5, "tpm")
    (s.state / "rollback").write_text("6\n")
    assert_failed_closed(s.run(env=swtpm.env), "release 1.4.0 has security_version 5, below this device's minimum 6 "
                                               "(state file /bootimg/state/rollback)")
    assert swtpm.nvread() == 5                           # the initramfs never raises it


@kernel_test
def test_root_setup_with_a_tpm_but_no_counter_yet(scenario, swtpm):
    s = scenario("signed", layout="releases")
    o = s.run(env=swtpm.env)
    assert_verified_root(o, s.digest)
    assert (o.booted["rollback_minimum"], o.booted["rollback_store"]) == (0, "tpm")
    assert swtpm.nvpublic() is None                      # not defined by the root setup


@kernel_test
def test_root_setup_refuses_an_index_that_is_not_a_counter(scenario, swtpm):
    """Someone put an ordinary index (writable down to 0) where the counter belongs: fail closed."""
    s = scenario("signed", layout="releases")
    assert swtpm.tools("tpm2_nvdefine", NV, "-C", "o", "-s", "8", "-a", "authread|authwrite").returncode == 0
    assert_failed_closed(s.run(env=swtpm.env), "cannot read this device's rollback minimum: NV index 0x01500016 is not "
                                               "an 8-byte counter")


@kernel_test
def test_the_nv_index_is_boot_conf_s(scenario, check, swtpm):
    s = scenario("signed", layout="releases")
    s.conf.write_text(s.conf.read_text() + "BOOTIMG_ROLLBACK_NV=0x01500020\n")
    assert run(check, swtpm, "tpm-raise", "0x01500020", "4") == "0 -> 4 defined"
    assert_failed_closed(s.run(env=swtpm.env), "release 1.4.0 has security_version 0, below this device's minimum 4 "
                                               "(TPM NV 0x01500020)")


@kernel_test
def test_bless_defines_and_raises_the_counter(scenario, swtpm):
    s = scenario("signed", layout="releases")
    _set_security_version(s, 3)
    assert s.run(env=swtpm.env).rc == 0
    rc, lines = s.bless(env=swtpm.env)
    assert (rc, lines) == (0, ["bootimg: bless: rollback minimum 3 (release 1.4.0): state file "
                               "/sysroot/bootimg/state/rollback 0 -> 3, TPM NV 0x01500016 0 -> 3 (defined now)"])
    assert swtpm.nvpublic() == (ATTRIBUTES | WRITTEN, 8) and swtpm.nvread() == 3
    rc, lines = s.bless(env=swtpm.env)
    assert (rc, lines[0].endswith("3 -> 3, TPM NV 0x01500016 3 -> 3")) == (0, True), lines
    assert swtpm.nvread() == 3
    # the state file lost (a re-flashed partition): the TPM still refuses the older release
    (s.state / "rollback").unlink()
    _set_security_version(s, 2)
    assert_failed_closed(s.run(env=swtpm.env), "release 1.4.0 has security_version 2, below this device's minimum 3 "
                                               "(TPM NV 0x01500016)")


@kernel_test
def test_bless_reports_a_counter_that_started_above_the_release(scenario, swtpm):
    s = scenario("signed", layout="releases")
    _set_security_version(s, 3)
    swtpm.count_up_and_delete("0x01500017", 6)
    assert s.run(env=swtpm.env).rc == 0
    rc, lines = s.bless(env=swtpm.env)
    assert (rc, lines) == (1, ["bootimg: bless failed: TPM NV counter 0x01500016 is at 7, above the booted release's "
                               "security_version 3 (a new counter starts at the TPM's highest count): releases below 7 "
                               "will be refused"])
    assert (s.state / "rollback").read_text() == "3\n"

