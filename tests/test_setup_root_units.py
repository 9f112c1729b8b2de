"""bootimg-setup-root's parsers and crypto, through tests/setup_root/check.c built with the
program's own sources under AddressSanitizer and UndefinedBehaviorSanitizer.

Crypto: SHA-256/512 against hashlib, Ed25519 against RFC 8032's vectors and against signatures
made by `cryptography`, minisign files made by bootimg's signer (legacy "Ed" and prehashed "ED")
and by the real `minisign`; every kind of damage is refused. Parsers: release.json (strict JSON),
boot.conf and the kernel command line. A fixed-seed fuzz batch runs every parser on mutated inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import have

from bootimg.boot import setup_root
from bootimg.composefs import fsverity
from bootimg.signing import generate_keypair, make_trusted_comment, sign
from bootimg.signing.minisig import PublicKey

SOURCES = ["config.c", "json.c", "minisign.c", "util.c", "sha256.c", "sha512.c", "verity.c", "tpm.c", "rollback.c",
           "mounts.c", "vendor/monocypher/monocypher.c"]
CHECK_C = Path(__file__).parent / "setup_root" / "check.c"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99", "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98"}

# RFC 8032, section 7.1, tests 1-3: (public key, signature, message)
RFC8032 = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
     ""),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
     "72"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
     "af82"),
]


def build_check(out: Path) -> Path:
    """tests/setup_root/check.c with the program's sources, under ASan/UBSan, with the test hooks
    (tpm-read and tpm-raise talk to swtpm's socket: BOOTIMG_TEST_TPM=unix:PATH)."""
    src = setup_root.source_dir()
    res = subprocess.run(["gcc", "-std=c11", "-D_GNU_SOURCE", "-DBOOTIMG_TEST_HOOKS", "-O1", "-g", *SANITIZE, "-Wall",
                          "-Wextra", "-Werror", "-Wno-unused-parameter", f"-I{src}", "-o", str(out), str(CHECK_C),
                          *(str(src / s) for s in SOURCES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def check(tmp_path_factory) -> Path:
    return build_check(tmp_path_factory.mktemp("check") / "check")


def run(check: Path, *args) -> subprocess.CompletedProcess:
    res = subprocess.run([str(check), *map(str, args)], capture_output=True, text=True, env={**os.environ, **ENV},
                         timeout=300)
    assert res.returncode in (0, 1), f"sanitizer or usage error {res.returncode}: {res.stderr}"
    return res


# -- hashes and Ed25519 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 111, 112, 127, 128, 129, 1000, 4096])
def test_sha256_and_sha512_agree_with_hashlib(check, size):
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    assert run(check, "sha256", data.hex()).stdout.strip() == hashlib.sha256(data).hexdigest()
    assert run(check, "sha512", data.hex()).stdout.strip() == hashlib.sha512(data).hexdigest()


@pytest.mark.parametrize("pk, sig, msg", RFC8032)
def test_ed25519_rfc8032_vectors(check, pk, sig, msg):
    assert run(check, "ed25519", pk, sig, msg or "").returncode == 0
    bad = bytearray.fromhex(sig)
    bad[10] ^= 1
    assert run(check, "ed25519", pk, bad.hex(), msg).returncode == 1
    assert run(check, "ed25519", pk, sig, (msg or "") + "00").returncode == 1
    # s >= L (the group order) is refused: no malleable signatures
    s_plus_l = (int.from_bytes(bytes.fromhex(sig)[32:], "little") + 2**252 + 27742317777372353535851937790883648493)
    assert run(check, "ed25519", pk, sig[:64] + s_plus_l.to_bytes(32, "little").hex(), msg).returncode == 1


def test_ed25519_agrees_with_cryptography(check):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    for i in range(8):
        key = Ed25519PrivateKey.generate()
        msg = os.urandom(i * 37)
        sig = key.sign(msg)
        pk = key.public_key().public_bytes_raw()
        assert run(check, "ed25519", pk.hex(), sig.hex(), msg.hex()).returncode == 0
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert run(check, "ed25519", other.hex(), sig.hex(), msg.hex()).returncode == 1


# -- minisign files -------------------------------------------------------------------------------------------

@pytest.fixture
def signed(tmp_path):
    """A release.json-like message, a key pair and signatures in both algorithms."""
    secret, public = generate_keypair("test")
    msg = json.dumps({"format": "bootimg-release/1", "root": {"kernel_argument": "x"}}, indent=2).encode()
    (tmp_path / "msg").write_bytes(msg)
    (tmp_path / "key.pub").write_bytes(public.to_bytes())
    comment = make_trusted_comment(file="release.json", keyid=secret.keyid, timestamp=1)
    (tmp_path / "legacy.sig").write_bytes(sign(secret, msg, comment))
    (tmp_path / "hashed.sig").write_bytes(sign(secret, msg, comment, prehashed=True))
    return tmp_path, public


@pytest.mark.parametrize("kind", ["legacy", "hashed"])
def test_minisign_verifies_bootimg_signatures(check, signed, kind):
    d, public = signed
    res = run(check, "minisign", d / "key.pub", d / f"{kind}.sig", d / "msg")
    assert res.stdout.strip() == f"ok {public.keyid}"


@pytest.mark.skipif(not have("minisign"), reason="needs minisign")
@pytest.mark.parametrize("legacy", [True, False], ids=["Ed", "ED"])
def test_minisign_verifies_signatures_of_the_real_minisign(check, tmp_path, legacy):
    subprocess.run(["minisign", "-G", "-W", "-p", str(tmp_path / "k.pub"), "-s", str(tmp_path / "k.key")],
                   check=True, capture_output=True)
    (tmp_path / "msg").write_bytes(b"release bytes\n" * 100)
    args = ["minisign", "-S", "-s", str(tmp_path / "k.key"), "-m", str(tmp_path / "msg"), "-t", "tc\tkey:x"]
    subprocess.run(args + (["-l"] if legacy else []), check=True, capture_output=True)
    sig = tmp_path / "msg.minisig"
    assert sig.read_bytes().splitlines()[1][:2] == (b"RW" if legacy else b"RU")     # base64 of "Ed" / "ED"
    res = run(check, "minisign", tmp_path / "k.pub", sig, tmp_path / "msg")
    assert res.stdout.strip() == f"ok {PublicKey.from_file(tmp_path / 'k.pub').keyid}"
    (tmp_path / "msg").write_bytes(b"release bytes\n" * 99)
    assert run(check, "minisign", tmp_path / "k.pub", sig, tmp_path / "msg").stdout.startswith("fail:")


def _edit(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


def _line(data: bytes, i: int, fn) -> bytes:
    lines = data.split(b"\n")
    lines[i] = fn(lines[i])
    return b"\n".join(lines)


DAMAGE = {
    "wrong-key": (None, "signed by key"),
    "message-edited": ("msg", "signature verification failed"),
    "trusted-comment-edited": ("sig", "the trusted comment's signature verification failed"),
    "signature-bit": ("sig2", "signature verification failed"),
    "global-signature-bit": ("sig4", "the trusted comment's signature verification failed"),
    "truncated-signature-file": ("trunc", "line 4: missing"),
    "truncated-signature-line": ("short", "line 2: not the base64 of a 74-byte signature"),
    "bad-base64": ("b64", "line 2: not the base64"),
    "non-canonical-base64": ("canon", "line 4: not the base64"),
    "no-trusted-prefix": ("prefix", "line 3: does not start with 'trusted comment:'"),
    "extra-content": ("extra", "unexpected content after the 4 lines"),
    "nul-byte": ("nul", "contains a NUL byte"),
    "cr-in-line": ("cr", "contains a CR"),
    "unknown-algorithm": ("alg", "unsupported algorithm"),
}


def _b64_flip(line: bytes, pos: int) -> bytes:
    import base64
    raw = bytearray(base64.b64decode(line))
    raw[pos] ^= 1
    return base64.b64encode(bytes(raw))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_minisign_refuses_damage(check, signed, case):
    d, _ = signed
    how, reason = DAMAGE[case]
    sig, key = d / "legacy.sig", d / "key.pub"
    if how is None:
        _, other = generate_keypair()
        key.write_bytes(other.to_bytes())
    elif how == "msg":
        _edit(d / "msg", lambda b: b.replace(b"bootimg", b"bootimh"))
    elif how == "sig":
        _edit(sig, lambda b: _line(b, 2, lambda ln: ln + b"x"))
    elif how == "sig2":
        _edit(sig, lambda b: _line(b, 1, lambda ln: _b64_flip(ln, 20)))
    elif how == "sig4":
        _edit(sig, lambda b: _line(b, 3, lambda ln: _b64_flip(ln, 5)))
    elif how == "trunc":
        _edit(sig, lambda b: b"\n".join(b.split(b"\n")[:3]))
    elif how == "short":
        _edit(sig, lambda b: _line(b, 1, lambda ln: ln[:-8]))
    elif how == "b64":
        _edit(sig, lambda b: _line(b, 1, lambda ln: b"*" + ln[1:]))
    elif how == "canon":   # the last character carries stray bits: another text for the same bytes
        _edit(sig, lambda b: _line(b, 3, lambda ln: ln[:-3] + bytes([ln[-3] + 1]) + ln[-2:]))
    elif how == "prefix":
        _edit(sig, lambda b: _line(b, 2, lambda ln: ln.replace(b"trusted comment: ", b"trusted-comment: ")))
    elif how == "extra":
        _edit(sig, lambda b: b + b"more\n")
    elif how == "nul":
        _edit(sig, lambda b: _line(b, 0, lambda ln: ln + b"\0"))
    elif how == "cr":
        _edit(sig, lambda b: _line(b, 2, lambda ln: ln[:20] + b"\r" + ln[20:]))
    elif how == "alg":
        _edit(sig, lambda b: _line(b, 1, lambda ln: _b64_flip(ln, 1)))
    res = run(check, "minisign", key, sig, d / "msg")
    assert res.returncode == 1 and res.stdout.startswith("fail:") and reason in res.stdout, res.stdout


def test_minisign_accepts_crlf_and_an_edited_untrusted_comment(check, signed):
    """The untrusted comment is not signed (as in minisign); CRLF line ends are fine."""
    d, public = signed
    sig = d / "legacy.sig"
    _edit(sig, lambda b: _line(b, 0, lambda ln: ln + b" edited").replace(b"\n", b"\r\n"))
    assert run(check, "minisign", d / "key.pub", sig, d / "msg").stdout.strip() == f"ok {public.keyid}"


# -- release.json ----------------------------------------------------------------------------------------------

GOOD = {"format": "bootimg-release/1", "root": {"image": "root", "digest": "ab" * 32,
                                                "kernel_argument": "composefs.digest=v1-sha256-12:" + "ab" * 32},
        "images": {"root": {"size": 1, "x": [1.5e3, -0, True, False, None, "\u00e9\U0001f600"]}}}

JSON_CASES = {
    "trailing-comma": ('{"format": "x",}', "expected a member name"),
    "unterminated": ('{"format": "x"', "expected ',' or '}'"),
    "not-an-object": ('["format"]', "not a JSON object"),
    "content-after": ('{} {}', "content after the JSON document"),
    "control-char": ('{"format": "a\tb"}', "control character"),
    "bad-escape": ('{"format": "\\x"}', "bad escape"),
    "lone-surrogate": ('{"format": "\\ud800"}', "unpaired surrogate"),
    "nul-escape": ('{"format": "a\\u0000b"}', "NUL"),
    "bad-utf8": (b'{"format": "\xc3\x28"}', "invalid UTF-8"),
    "overlong-utf8": (b'{"format": "\xc0\xaf"}', "invalid UTF-8"),
    "leading-zero": ('{"a": 01}', "expected ',' or '}'"),
    "bare-minus": ('{"a": -}', "bad number"),
    "deep": ('{"a": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32 levels"),
    "duplicate-format": ('{"format": "a", "format": "b"}', 'duplicate member "format"'),
    "duplicate-root": ('{"root": {}, "root": {}}', 'duplicate member "root"'),
    "root-not-object": ('{"root": "x"}', '"root" is not an object'),
    "kernel-argument-not-string": ('{"root": {"kernel_argument": 1}}', "is not a string"),
    "single-quotes": ("{'format': 'x'}", "expected a member name"),
    "nan": ('{"a": NaN}', "unexpected character"),
    "security-version-negative": ('{"security_version": -1}', '"security_version" is not an integer from 0 to 4294967295'),
    "security-version-fraction": ('{"security_version": 1.0}', '"security_version" is not an integer'),
    "security-version-exponent": ('{"security_version": 1e3}', '"security_version" is not an integer'),
    "security-version-too-big": ('{"security_version": 4294967296}', '"security_version" is not an integer'),
    "security-version-string": ('{"security_version": "3"}', '"security_version" is not an integer'),
    "security-version-twice": ('{"security_version": 3, "security_version": 4}', 'duplicate member "security_version"'),
    "version-not-string": ('{"version": 1}', '"version" is not a string'),
}


def test_release_json_good(check, tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(GOOD, indent=2, ensure_ascii=False))
    out = run(check, "json", p).stdout.splitlines()
    assert out == ["format=bootimg-release/1", f"kernel_argument={GOOD['root']['kernel_argument']}",
                   f"root_digest={'ab' * 32}", "n_kernel_argument=1", "version=", "security_version=absent 0"]
    # two kernel arguments are counted (the program refuses that), escapes decoded
    p.write_text('{"root": {"kernel_argument": "a", "kernel_argument": "b\\u00e9"}, "format": "f\\/"}')
    assert run(check, "json", p).stdout.splitlines() == ["format=f/", "kernel_argument=bé", "root_digest=",
                                                          "n_kernel_argument=2", "version=", "security_version=absent 0"]
    # the version and the security version (0..4294967295); the members of nested objects are not them
    for sv in (0, 7, 4294967295):
        p.write_text(json.dumps({**GOOD, "version": "1.4.0", "security_version": sv,
                                 "boot": {"security_version": 9, "version": "x", "tries": 3}}))
        assert run(check, "json", p).stdout.splitlines()[-2:] == ["version=1.4.0", f"security_version={sv}"]


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_release_json_refuses(check, tmp_path, case):
    text, reason = JSON_CASES[case]
    p = tmp_path / "r.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = run(check, "json", p)
    assert res.returncode == 1 and res.stdout.startswith("error: line ") and reason in res.stdout, res.stdout


# -- boot.conf and the kernel command line ----------------------------------------------------------------------

def test_conf(check, tmp_path):
    p = tmp_path / "boot.conf"
    p.write_text("# c\nBOOTIMG_TRUST=signed\nBOOTIMG_TRUST=sealed\nOTHER=1\nBOOTIMG_OBJECTS=/bootimg/objects\n"
                 "BOOTIMG_RELEASES=/bootimg/releases\nBOOTIMG_ROLLBACK_NV=0x01500017\nBOOTIMG_RELEASE=/r")
    out = run(check, "conf", p).stdout.splitlines()
    assert "trust=sealed" in out and "objects=/bootimg/objects" in out and "release=/r" in out and "etc=" in out
    assert "releases=/bootimg/releases" in out and "rollback_nv=0x01500017" in out
    p.write_bytes(b"BOOTIMG_TRUST=signed\0\n")
    assert "contains a NUL byte" in run(check, "conf", p).stdout
    p.write_text("BOOTIMG_TRUST=" + "s" * 100 + "\n")
    assert "line 1: the value of BOOTIMG_TRUST is too long" in run(check, "conf", p).stdout


@pytest.mark.parametrize("text, expect", [
    ("quiet composefs.digest=v1-sha256-12:" + "ab" * 32 + " rw\n", {"n_digest": "1", "digest": "ab" * 32}),
    ("composefs.digest=v1-sha256-12:" + "AB" * 32, {"n_digest": "1", "digest": ""}),
    ("composefs.digest=sha256:" + "ab" * 32, {"n_digest": "1", "digest": ""}),
    ("composefs.digest=v1-sha256-12:" + "ab" * 33, {"n_digest": "1", "digest": ""}),
    ("composefs.digest=a composefs.digest=b", {"n_digest": "2"}),
    ("bootimg.release=/bootimg/r2\tx", {"release": "/bootimg/r2", "release_safe": "1"}),
    ("bootimg.release=/bootimg/../etc", {"release": "/bootimg/../etc", "release_safe": "0"}),
    ("bootimg.release=/a//b", {"release_safe": "0"}),
    ("bootimg.release=/a/b/", {"release_safe": "0"}),
    ("bootimg.release=/a,b", {"release_safe": "0"}),
    ("bootimg.release=relative", {"release_safe": "0"}),
    ("xcomposefs.digest=v1-sha256-12:" + "ab" * 32, {"n_digest": "0"}),
    ("bootimg.security_version=7 rw", {"n_secver": "1", "secver": "7"}),
    ("bootimg.security_version=1 bootimg.security_version=2", {"n_secver": "2", "secver": "2"}),
    ("bootimg.security_version=" + "9" * 20, {"n_secver": "1", "secver": ""}),
    ("xbootimg.security_version=1", {"n_secver": "0"}),
])
def test_cmdline(check, tmp_path, text, expect):
    p = tmp_path / "cmdline"
    p.write_text(text)
    out = dict(ln.split("=", 1) for ln in run(check, "cmdline", p).stdout.splitlines())
    for k, v in expect.items():
        assert out[k] == v, (k, out)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 128 * 4096, 128 * 4096 + 1, 3 * 1024 * 1024 + 7])
def test_user_space_fsverity_digest(check, tmp_path, size):
    p = tmp_path / "f"
    p.write_bytes(bytes((i * 31) & 0xFF for i in range(size)))
    assert run(check, "verity", p).stdout.strip() == fsverity.digest(p.read_bytes()).hex()


# -- fuzz --------------------------------------------------------------------------------------------------------

def test_fuzz_batch_under_sanitizers(check, signed, tmp_path):
    """20,000 mutated keys, signatures, release.json texts, configurations, command lines and
    base64 strings (fixed seed) through the parsers: no sanitizer report, and nothing but the
    original key and signature ever verifies. bench/fuzz_setup_root.py runs longer batches."""
    d, _ = signed
    (tmp_path / "boot.conf").write_text("BOOTIMG_TRUST=signed\nBOOTIMG_FSVERITY=required\nBOOTIMG_ETC=transient\n")
    res = run(check, "fuzz", 20260101, 20000, d / "key.pub", d / "legacy.sig", d / "msg", tmp_path / "boot.conf")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("fuzz: 20000 rounds"), res.stdout


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("7", 7), ("4294967295", 4294967295), ("4294967296", None), ("-1", None), ("+1", None), ("07", None),
    ("", None), ("1 ", None), ("0x10", None), ("99999999999999999999", None),
])
def test_security_version_numbers(check, text, value):
    res = run(check, "u32", text)
    assert res.stdout.strip() == (str(value) if value is not None else "error")


@pytest.mark.parametrize("path, ok", [
    ("/bootimg/releases/1.4.0", True), ("/bootimg/releases/a_b-c.D", True),
    ("/bootimg/releases/..", False), ("/bootimg/releases/.", False), ("/bootimg/releases/.1.4.0.tmp", False),
    ("/bootimg/releases/../state", False), ("/bootimg/releases/1.4.0/images", False), ("/bootimg/releases", False),
    ("/bootimg/releases/", False), ("/bootimg/releasesX/1.4.0", False), ("/bootimg/release", False),
    ("/bootimg/releases//1.4.0", False), ("/bootimg/releases/1,4", False), ("bootimg/releases/1.4.0", False),
    ("/other/1.4.0", False),
])
def test_release_must_be_a_direct_child_of_the_releases(check, path, ok):
    assert run(check, "release-in", "/bootimg/releases", path).stdout.strip() == ("yes" if ok else "no")


@pytest.mark.parametrize("text, value", [
    ("0x01500016", 0x01500016), ("0x01ffffff", 0x01FFFFFF), ("0x01C00002", 0x01C00002),
    ("0x81000001", None), ("0x1500016", None), ("01500016", None), ("0x015000160", None), ("0x0150001g", None),
])
def test_nv_index(check, text, value):
    assert run(check, "nv-index", text).stdout.strip() == (str(value) if value is not None else "error")


@pytest.mark.parametrize("content, result", [
    (None, "0"), (b"3\n", "3"), (b"3", "3"), (b"0\n", "0"), (b"4294967295\n", "4294967295"),
    (b"", "error: the state file STATE is malformed"), (b"\n", "error: the state file STATE is malformed"),
    (b"03\n", "error: the state file STATE is malformed"), (b"3\n\n", "error: the state file STATE is malformed"),
    (b"-1\n", "error: the state file STATE is malformed"), (b"3\0\n", "error: the state file STATE is malformed"),
    (b"4294967296\n", "error: the state file STATE is malformed"), (b"1" * 40, "larger than 32 bytes"),
    ("dir", "cannot read the state file STATE: Is a directory"),
])
def test_rollback_state_file(check, tmp_path, content, result):
    p = tmp_path / "rollback"
    if content == "dir":
        p.mkdir()
    elif content is not None:
        p.write_bytes(content)
    assert result in run(check, "state", p).stdout


def test_booted_json_for_bless_and_mount_image(check, tmp_path):
    doc = {"digest": "ab" * 32, "release": "/bootimg/releases/1.4.0", "release_dir": "/sysroot/bootimg/releases/1.4.0",
           "objects": "/sysroot/bootimg/objects", "version": "1.4.0", "security_version": 3, "rollback_minimum": 2,
           "rollback_store": "file", "rollback_nv": "0x01500016", "rollback_file": "/sysroot/bootimg/state/rollback",
           "mounts": {"/": "composefs"}}
    (tmp_path / "booted.json").write_text(json.dumps(doc))
    assert run(check, "booted", tmp_path).stdout.splitlines() == [
        "release_dir=/sysroot/bootimg/releases/1.4.0", "objects=/sysroot/bootimg/objects",
        "rollback_file=/sysroot/bootimg/state/rollback", "rollback_nv=0x01500016", "version=1.4.0", "security_version=3"]
    (tmp_path / "booted.json").write_text(json.dumps({**doc, "security_version": "3"}))
    assert '"security_version" is not an integer' in run(check, "booted", tmp_path).stdout
    (tmp_path / "booted.json").unlink()
    assert "booted.json: No such file or directory (the root was not set up by bootimg-setup-root)" in \
        run(check, "booted", tmp_path).stdout


# -- the TPM 2.0 commands ----------------------------------------------------------------------------------------

# The commands as TPM 2.0 Library Part 3 lays them out for NV index 0x01500016, written out by hand:
# tag, size, command code; handles; a password session (TPM_RS_PW, empty nonce, continueSession,
# empty password); parameters.
PW_SESSION = "00000009" + "40000009" + "0000" + "01" + "0000"
TPM_COMMANDS = {
    "read-public": "8001" + "0000000e" + "00000169" + "01500016",
    "read": "8002" + "00000023" + "0000014e" + "01500016" + "01500016" + PW_SESSION + "0008" + "0000",
    "increment": "8002" + "0000001f" + "00000134" + "01500016" + "01500016" + PW_SESSION,
    # owner hierarchy; empty authValue; TPM2B_NV_PUBLIC {index, SHA-256, attributes COUNTER|OWNERWRITE|
    # AUTHWRITE|OWNERREAD|AUTHREAD|NO_DA, no policy, 8 bytes}
    "define": "8002" + "0000002d" + "0000012a" + "40000001" + PW_SESSION + "0000" + "000e" + "01500016" + "000b"
              + "02060016" + "0000" + "0008",
}


@pytest.mark.parametrize("which", list(TPM_COMMANDS))
def test_tpm_commands_are_byte_exact(check, which):
    assert run(check, "tpm-command", which, "0x01500016").stdout.strip() == TPM_COMMANDS[which]
    other = run(check, "tpm-command", which, "0x01c00123").stdout.strip()
    assert other == TPM_COMMANDS[which].replace("01500016", "01c00123")


# Real responses of swtpm 0.7.1 (libtpms) to the commands above (tests/test_setup_root_tpm.py
# gets them live from swtpm too).
SWTPM = {
    "public-unwritten": "80010000003e00000000000e01500016000b02060016000000080022000b7757e09815ac4f98ee9d99371563a83d0cc000"
                        "3903f860ab02f2cf8d151e19fc",
    "public-written": "80010000003e00000000000e01500016000b22060016000000080022000b3afd5889e451c4f03de69ba812cc8502e14d"
                      "02403e4ecc2f7265ed4f5b7d1d34",
    "public-undefined": "80010000000a0000018b",
    "read-2": "80020000001d000000000000000a000800000000000000020000010000",
    "read-uninitialized": "80010000000a0000014a",
    "increment": "80020000001300000000000000000000010000",
    "define": "80020000001300000000000000000000010000",
    "define-exists": "80010000000a0000014c",
}


@pytest.mark.parametrize("which, response, result", [
    ("read-public", "public-unwritten", "ok attributes=0x02060016 size=8 value=0"),
    ("read-public", "public-written", "ok attributes=0x22060016 size=8 value=0"),     # + TPMA_NV_WRITTEN
    ("read-public", "public-undefined", "rc 0x18b"),                                   # TPM_RC_HANDLE + handle 1
    ("read", "read-2", "ok attributes=0x00000000 size=0 value=2"),
    ("read", "read-uninitialized", "rc 0x14a"),
    ("increment", "increment", "ok attributes=0x00000000 size=0 value=0"),
    ("define", "define", "ok attributes=0x00000000 size=0 value=0"),
    ("define", "define-exists", "rc 0x14c"),
])
def test_tpm_responses_of_swtpm(check, which, response, result):
    assert run(check, "tpm-response", which, "0x01500016", SWTPM[response]).stdout.strip() == result


def _resize(h: str, delta: int) -> str:
    """A response with its size field changed by delta (to match a changed length)."""
    return h[:4] + f"{int(h[4:12], 16) + delta:08x}" + h[12:]


MALFORMED = {
    "empty": ("read", ""),
    "header-only-9": ("read", SWTPM["read-2"][:18]),
    "truncated": ("read", SWTPM["read-2"][:-2]),
    "size-field-too-big": ("read", _resize(SWTPM["read-2"], 1)),
    "extra-byte": ("read", SWTPM["read-2"] + "00"),
    "extra-byte-resized": ("read", _resize(SWTPM["read-2"] + "00", 1)),
    "no-session-tag": ("read", "8001" + SWTPM["read-2"][4:]),
    "seven-byte-counter": ("read", _resize(SWTPM["read-2"][:20] + "00000009" + "0007" + "00" * 7 + "0000010000", -1)),
    "parameter-size-lies": ("read", SWTPM["read-2"][:20] + "0000000b" + SWTPM["read-2"][28:]),
    "nonce-overruns": ("read", SWTPM["read-2"][:-10] + "ffff010000"),
    "no-session": ("increment", _resize(SWTPM["increment"][:28], -5)),
    "error-with-body": ("read", _resize("80010000000a0000014a" + "00", 1)),
    "error-with-session-tag": ("read", "8002" + SWTPM["read-uninitialized"][4:]),
    "public-other-index": ("read-public", SWTPM["public-written"].replace("01500016", "01500017")),
    "public-size-lies": ("read-public", SWTPM["public-written"][:20] + "000f" + SWTPM["public-written"][24:]),
    "public-policy-overruns": ("read-public", SWTPM["public-written"][:44] + "00ff" + SWTPM["public-written"][48:]),
    "public-name-truncated": ("read-public", _resize(SWTPM["public-written"][:-2], -1)),
    "public-name-too-long": ("read-public", _resize(SWTPM["public-written"][:52] + "0043" + "00" * 0x43, 0x43 - 0x22)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_tpm_malformed_responses_fail_closed(check, case):
    which, response = MALFORMED[case]
    res = run(check, "tpm-response", which, "0x01500016", response)
    assert res.returncode == 1 and res.stdout.startswith("error: malformed TPM response ("), res.stdout
