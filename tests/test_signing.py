"""bootimg.signing against the real tools: minisign, signify-openbsd, fsverity-utils, openssl.

Release signatures must verify with the C verifiers an initramfs can carry, and signatures
made by those tools must verify with ours; fs-verity PKCS#7 signatures must be what
`fsverity sign` makes (byte for byte with RSA) and what openssl accepts.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import have, run_cli

from bootimg.composefs import fsverity
from bootimg.signing import (
    PublicKey,
    SecretKey,
    SignatureError,
    cert_der,
    fsverity_pkcs7_sign,
    fsverity_pkcs7_verify,
    generate_keypair,
    make_signing_cert,
    make_trusted_comment,
    parse_signature,
    parse_trusted_comment,
    sign,
    sign_file,
    verify,
    verify_file,
)
from bootimg.signing.minisig import ALG_LEGACY, ALG_PREHASHED

needs_minisign = pytest.mark.skipif(not have("minisign"), reason="minisign not installed")
needs_signify = pytest.mark.skipif(not have("signify-openbsd"), reason="signify-openbsd not installed")
needs_fsverity = pytest.mark.skipif(not have("fsverity"), reason="fsverity-utils not installed")
needs_openssl = pytest.mark.skipif(not have("openssl"), reason="openssl not installed")

MESSAGE = b'{"release": "1.2.3", "images": {"root": "sha256:' + b"ab" * 32 + b'"}}\n'
TC = "timestamp:1700000000\tfile:release.json\tkey:TEST"


def run(*cmd: str | os.PathLike[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, **kw)


@pytest.fixture(scope="module")
def keypair() -> tuple[SecretKey, PublicKey]:
    return generate_keypair("test")


@pytest.fixture
def files(tmp_path: Path, keypair) -> dict[str, Path]:
    """release.json, its legacy signature, the key files."""
    secret, public = keypair
    msg = tmp_path / "release.json"
    msg.write_bytes(MESSAGE)
    sig = tmp_path / "release.json.minisig"
    sig.write_bytes(sign(secret, MESSAGE, TC))
    pub = tmp_path / "k.pub"
    public.to_file(pub)
    key = tmp_path / "k.key"
    secret.to_file(key)
    return {"msg": msg, "sig": sig, "pub": pub, "key": key}


def minisign_keypair(tmp_path: Path, name: str = "m") -> tuple[Path, Path]:
    pub, key = tmp_path / f"{name}.pub", tmp_path / f"{name}.key"
    r = run("minisign", "-G", "-W", "-p", pub, "-s", key)
    assert r.returncode == 0, r.stderr
    return pub, key


def rewrite_line(data: bytes, lineno: int, fn) -> bytes:
    lines = data.split(b"\n")
    lines[lineno - 1] = fn(lines[lineno - 1])
    return b"\n".join(lines)


def patch_b64(line: bytes, offset: int) -> bytes:
    raw = bytearray(base64.b64decode(line))
    raw[offset] ^= 0x01
    return base64.b64encode(bytes(raw))


# ---------------------------------------------------------------------------------------------
# Interop with minisign and signify


@needs_minisign
@pytest.mark.parametrize("prehashed", [False, True], ids=["legacy-Ed", "prehashed-ED"])
def test_our_signature_verifies_with_minisign(files, keypair, prehashed):
    secret, _ = keypair
    files["sig"].write_bytes(sign(secret, MESSAGE, TC, prehashed=prehashed))
    r = run("minisign", "-Vm", files["msg"], "-p", files["pub"])
    assert r.returncode == 0, r.stderr
    assert f"Trusted comment: {TC}" in r.stdout
    # -H demands prehashed signatures: legacy ones are refused, which documents the variant.
    r = run("minisign", "-V", "-H", "-m", files["msg"], "-p", files["pub"])
    assert (r.returncode == 0) == prehashed, r.stderr
    # The key as a -P string works too.
    _, public = keypair
    r = run("minisign", "-Vm", files["msg"], "-P", public.to_base64(), "-q")
    assert r.returncode == 0


@needs_signify
def test_legacy_signature_verifies_with_signify_prehashed_does_not(files, keypair):
    secret, _ = keypair
    r = run("signify-openbsd", "-V", "-q", "-p", files["pub"], "-x", files["sig"], "-m", files["msg"])
    assert r.returncode == 0, r.stderr
    files["sig"].write_bytes(sign(secret, MESSAGE, TC, prehashed=True))
    r = run("signify-openbsd", "-V", "-q", "-p", files["pub"], "-x", files["sig"], "-m", files["msg"])
    assert r.returncode != 0


@needs_signify
@needs_minisign
def test_only_minisign_and_we_authenticate_the_trusted_comment(files, keypair):
    """signify ignores lines 3-4: a forged trusted comment passes signify, not minisign/us."""
    _, public = keypair
    forged = files["sig"].read_bytes().replace(b"timestamp:1700000000", b"timestamp:1999999999")
    files["sig"].write_bytes(forged)
    assert run("signify-openbsd", "-V", "-q", "-p", files["pub"], "-x", files["sig"],
               "-m", files["msg"]).returncode == 0
    assert run("minisign", "-V", "-q", "-m", files["msg"], "-p", files["pub"]).returncode != 0
    with pytest.raises(SignatureError, match="trusted comment does not match"):
        verify(MESSAGE, forged, [public])


@needs_minisign
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-Ed", "prehashed-ED"])
def test_minisign_keys_and_signatures_work_with_ours(tmp_path, legacy):
    """Keys from `minisign -G -W`, signatures from `minisign -S`: ours verifies them, and our
    signer, given minisign's key and the same comments, writes the same bytes."""
    pub_path, key_path = minisign_keypair(tmp_path)
    msg = tmp_path / "release.json"
    msg.write_bytes(MESSAGE)
    tc = "timestamp:1\tfile:release.json"
    r = run("minisign", "-S", *(["-l"] if legacy else []), "-s", key_path, "-m", msg,
            "-t", tc, "-c", "from minisign")
    assert r.returncode == 0, r.stderr
    theirs = (tmp_path / "release.json.minisig").read_bytes()

    public = PublicKey.from_file(pub_path)
    result = verify(MESSAGE, theirs, [public])
    assert result.trusted_comment == tc and result.key == public
    assert result.prehashed is (not legacy)
    assert parse_signature(theirs).keyid == public.keyid
    # same key-id notation as minisign (0.11 does not zero-pad it, later versions do)
    assert f"minisign public key {public.keyid.lstrip('0')}\n" in pub_path.read_text()

    secret = SecretKey.from_file(key_path)
    assert secret.public_key == PublicKey(public.keynum, public.raw)
    ours = sign(secret, MESSAGE, tc, prehashed=not legacy, untrusted_comment="from minisign")
    assert ours == theirs


@needs_minisign
def test_minisign_signs_with_our_secret_key(files, keypair, tmp_path):
    _, public = keypair
    other = tmp_path / "other.json"
    other.write_bytes(b"other\n")
    r = run("minisign", "-S", "-s", files["key"], "-m", other, "-t", "via minisign")
    assert r.returncode == 0, r.stderr
    result = verify_file(other, [public])
    assert result.trusted_comment == "via minisign" and result.prehashed
    # and minisign rebuilds our public key file, byte for byte, from our secret key
    rebuilt = tmp_path / "rebuilt.pub"
    assert run("minisign", "-R", "-s", files["key"], "-p", rebuilt).returncode == 0
    assert PublicKey.from_file(rebuilt) == PublicKey(public.keynum, public.raw)
    fresh, _ = generate_keypair()
    # a key id with a leading zero digit, the case where minisign 0.11 and later differ
    plain_secret = SecretKey(b"\x11" * 7 + b"\x0a", fresh.sk)
    plain_public = PublicKey(plain_secret.keynum, fresh.sk[32:])
    (tmp_path / "p.key").write_bytes(plain_secret.to_bytes())
    assert run("minisign", "-R", "-s", tmp_path / "p.key", "-p", tmp_path / "p.pub").returncode == 0
    theirs = (tmp_path / "p.pub").read_bytes()
    ours = plain_public.to_bytes()
    if plain_public.keyid.startswith("0"):  # minisign 0.11 prints the key id without padding
        ours = ours.replace(plain_public.keyid.encode(), plain_public.keyid.lstrip("0").encode(), 1)
    assert theirs == ours


@needs_minisign
def test_prehashed_file_signing_streams(tmp_path, keypair):
    secret, public = keypair
    big = tmp_path / "image.cfs"
    big.write_bytes(os.urandom(3 << 20))
    sig = tmp_path / "image.cfs.minisig"
    sig.write_bytes(sign_file(secret, big, "x", prehashed=True))
    assert verify_file(big, [public]).prehashed
    pub = tmp_path / "k.pub"
    public.to_file(pub)
    assert run("minisign", "-V", "-H", "-q", "-m", big, "-p", pub).returncode == 0
    assert sig.read_bytes() == sign(secret, big.read_bytes(), "x", prehashed=True)


def test_legacy_refuses_files_minisign_could_not_verify(tmp_path, keypair):
    secret, _ = keypair
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate((1 << 30) + 1)  # sparse
    with pytest.raises(SignatureError, match="larger than 1 GiB.*--prehash"):
        sign_file(secret, huge, "x")


# ---------------------------------------------------------------------------------------------
# Tampering, trust and rotation


def test_verify_returns_key_and_trusted_comment(keypair):
    secret, public = keypair
    result = verify(MESSAGE, sign(secret, MESSAGE, TC), [public])
    assert result.key == public and result.keyid == public.keyid
    assert result.trusted_comment == TC and not result.prehashed
    assert result.fields == {"timestamp": "1700000000", "file": "release.json", "key": "TEST"}


def test_flipped_message_byte_fails(keypair):
    secret, public = keypair
    sig = sign(secret, MESSAGE, TC)
    for pos in range(len(MESSAGE)):
        bad = bytearray(MESSAGE)
        bad[pos] ^= 0x01
        with pytest.raises(SignatureError, match=r"^release.json: signature by key [0-9A-F]{16} "
                                                 r"does not match \(file modified\?\)$"):
            verify(bytes(bad), sig, [public], message_name="release.json")
    with pytest.raises(SignatureError, match="does not match"):
        verify(MESSAGE + b" ", sig, [public])


def test_every_flipped_bit_after_the_untrusted_comment_fails(keypair):
    """Lines 2-4 are all authenticated or structural: any single-bit change is an error
    (the untrusted comment on line 1 is, as the name says, not authenticated)."""
    secret, public = keypair
    sig = sign(secret, MESSAGE, TC)
    start = sig.index(b"\n") + 1
    for pos in range(start, len(sig)):
        for bit in range(8):
            bad = bytearray(sig)
            bad[pos] ^= 1 << bit
            with pytest.raises(SignatureError):
                verify(MESSAGE, bytes(bad), [public])
    changed = sig.replace(b"signature from", b"signature FROM")
    assert verify(MESSAGE, changed, [public]).trusted_comment == TC


def test_targeted_signature_changes_give_clear_errors(keypair):
    secret, public = keypair
    sig = sign(secret, MESSAGE, TC)
    # the Ed25519 signature proper (line 2, after alg(2) + keynum(8))
    bad = rewrite_line(sig, 2, lambda l: patch_b64(l, 20))
    with pytest.raises(SignatureError, match=r"does not match \(file modified\?\)"):
        verify(MESSAGE, bad, [public])
    # the key number: now a different, untrusted key
    bad = rewrite_line(sig, 2, lambda l: patch_b64(l, 2))
    with pytest.raises(SignatureError, match="which is not trusted"):
        verify(MESSAGE, bad, [public])
    # the trusted comment and its signature
    bad = rewrite_line(sig, 3, lambda l: l.replace(b"1700000000", b"1700000001"))
    with pytest.raises(SignatureError, match=r"^sig: trusted comment does not match its "
                                             r"signature \(signature file modified\?\)$"):
        verify(MESSAGE, bad, [public], signature_name="sig")
    bad = rewrite_line(sig, 4, lambda l: patch_b64(l, 5))
    with pytest.raises(SignatureError, match="trusted comment does not match"):
        verify(MESSAGE, bad, [public])
    # an unknown algorithm
    bad = rewrite_line(sig, 2, lambda l: base64.b64encode(b"XX" + base64.b64decode(l)[2:]))
    with pytest.raises(SignatureError, match="line 2: unsupported signature algorithm"):
        verify(MESSAGE, bad, [public])
    # legacy <-> prehashed relabelling does not verify
    bad = rewrite_line(sig, 2, lambda l: base64.b64encode(ALG_PREHASHED + base64.b64decode(l)[2:]))
    with pytest.raises(SignatureError, match="does not match"):
        verify(MESSAGE, bad, [public])


@pytest.mark.parametrize("data, message", [
    (b"", "line 1: missing"),
    (b"untrusted comment: x\n", "line 2: missing"),
    (b"hello\nA\ntrusted comment: x\nA\n", "line 1: does not start with 'untrusted comment:'"),
    (b"untrusted comment: x\n!!!\ntrusted comment: x\nAAAA\n", "line 2: the signature is not valid base64"),
    (b"untrusted comment: x\nAAAA\ntrusted comment: x\nAAAA\n", "line 2: the signature decodes to 3 bytes, expected 74"),
])
def test_malformed_signature_files(data, message):
    _, public = generate_keypair()
    with pytest.raises(SignatureError) as err:
        verify(MESSAGE, data, [public], signature_name="x.minisig")
    assert str(err.value).startswith(f"x.minisig: malformed signature file: {message}")


def test_malformed_signature_messages_without_a_file_name(keypair):
    secret, public = keypair
    sig = sign(secret, MESSAGE, TC)
    with pytest.raises(SignatureError, match=r"^malformed signature file: line 3: does not start"):
        verify(MESSAGE, rewrite_line(sig, 3, lambda l: l.replace(b"trusted comment", b"trusted remark")),
               [public])
    with pytest.raises(SignatureError, match=r"^malformed signature file: line 5: unexpected"):
        verify(MESSAGE, sig + b"extra\n", [public])
    with pytest.raises(SignatureError, match=r"line 3: contains a CR or NUL"):
        verify(MESSAGE, sig.replace(b"file:", b"fi\rle:"), [public])
    # CRLF line endings (an edited file) are fine, as for minisign
    assert verify(MESSAGE, sig.replace(b"\n", b"\r\n"), [public]).trusted_comment == TC


def test_untrusted_key_error_names_the_key(keypair):
    secret, public = keypair
    _, other = generate_keypair()
    sig = sign(secret, MESSAGE, TC)
    with pytest.raises(SignatureError) as err:
        verify(MESSAGE, sig, [other], signature_name="release.json.minisig")
    assert str(err.value) == (f"release.json.minisig: signed by key {public.keyid} which is not "
                              f"trusted (trusted: {other.keyid})")
    with pytest.raises(SignatureError, match="no trusted keys given"):
        verify(MESSAGE, sig, [])


def test_key_rotation():
    old_secret, old = generate_keypair("old")
    new_secret, new = generate_keypair("new")
    old_sig = sign(old_secret, MESSAGE, TC)
    new_sig = sign(new_secret, MESSAGE, TC)
    assert verify(MESSAGE, new_sig, [old, new]).key == new
    assert verify(MESSAGE, old_sig, [old, new]).key == old
    with pytest.raises(SignatureError, match=f"signed by key {new.keyid} which is not trusted"):
        verify(MESSAGE, new_sig, [old])
    # a key that reuses the trusted key id but is another key: no match, not "untrusted"
    impostor_secret, _ = generate_keypair()
    forged = sign(SecretKey(new.keynum, impostor_secret.sk), MESSAGE, TC)
    with pytest.raises(SignatureError, match="does not match"):
        verify(MESSAGE, forged, [old, new])


def test_public_key_damage_is_caught(files, keypair):
    _, public = keypair
    sig = files["sig"].read_bytes()
    good = public.to_bytes()
    assert PublicKey.from_bytes(good) == public
    assert PublicKey.from_base64(f" {public.to_base64()}\n") == public  # the `minisign -P` form
    # pk bytes -> does not match; keynum -> not trusted; alg -> unsupported
    for offset, pattern in ((20, "does not match"), (3, "which is not trusted"),
                            (0, "unsupported algorithm")):
        bad = rewrite_line(good, 2, lambda l: patch_b64(l, offset))
        with pytest.raises(SignatureError, match=pattern):
            verify(MESSAGE, sig, [PublicKey.from_bytes(bad, file="k.pub")])
    # every single-bit flip of the key line makes loading or verification fail
    start = good.index(b"\n") + 1
    for pos in range(start, len(good)):
        for bit in range(8):
            bad = bytearray(good)
            bad[pos] ^= 1 << bit
            with pytest.raises(SignatureError):
                verify(MESSAGE, sig, [PublicKey.from_bytes(bytes(bad))])
    with pytest.raises(SignatureError, match=r"^k.pub: malformed public key file: line 2: "
                                             r"public key is not valid base64$"):
        PublicKey.from_bytes(good.replace(b"\nRW", b"\n*W"), file="k.pub")
    with pytest.raises(SignatureError, match=r"^nope.pub: cannot read public key: No such file"):
        PublicKey.from_file("nope.pub")


def test_deterministic_signatures(keypair):
    secret, _ = keypair
    assert sign(secret, MESSAGE, TC) == sign(secret, MESSAGE, TC)
    assert sign(secret, MESSAGE, TC, prehashed=True) == sign(secret, MESSAGE, TC, prehashed=True)
    assert sign(secret, MESSAGE, TC) != sign(secret, MESSAGE, TC + "x")


def test_trusted_comment_rules_and_helpers(keypair):
    secret, public = keypair
    with pytest.raises(SignatureError, match="one line"):
        sign(secret, MESSAGE, "a\nb")
    with pytest.raises(SignatureError, match="at most"):
        sign(secret, MESSAGE, "x" * 9000)
    tc = make_trusted_comment(file="/out/release.json", keyid=public.keyid, timestamp=1700000000)
    assert tc == f"timestamp:1700000000\tfile:release.json\tkey:{public.keyid}"
    assert make_trusted_comment(file="a", keyid="K") == "file:a\tkey:K"
    assert parse_trusted_comment(make_trusted_comment(file="a", keyid="K", prehashed=True,
                                                      extra={"digest": "sha256:00"})) == \
        {"file": "a", "key": "K", "hashed": "", "digest": "sha256:00"}
    # non-ASCII trusted comments round-trip
    assert verify(MESSAGE, sign(secret, MESSAGE, "release «été»"), [public]).trusted_comment == \
        "release «été»"


def test_secret_key_file_format(tmp_path, keypair):
    secret, _ = keypair
    data = secret.to_bytes()
    assert SecretKey.from_bytes(data) == secret
    assert "keyid" in repr(secret) and secret.sk.hex() not in repr(secret)
    blob = bytearray(base64.b64decode(data.split(b"\n")[1]))
    assert blob[:6] == ALG_LEGACY + b"\0\0B2" and len(blob) == 158
    # damaged secret half -> checksum mismatch; minisign's zero checksum is accepted
    bad = bytearray(blob)
    bad[100] ^= 1
    with pytest.raises(SignatureError, match=r"^k.key: malformed secret key file: line 2: checksum "
                                             r"mismatch \(key file damaged\?\)$"):
        SecretKey.from_bytes(b"untrusted comment: x\n" + base64.b64encode(bytes(bad)), file="k.key")
    zero_chk = bytes(blob[:126]) + bytes(32)
    assert SecretKey.from_bytes(b"untrusted comment: x\n" + base64.b64encode(zero_chk)) == secret
    bad = bytearray(zero_chk)
    bad[100] ^= 1  # no checksum to catch it, but the public half no longer fits the seed
    with pytest.raises(SignatureError, match="line 2: its public half does not match its seed"):
        SecretKey.from_bytes(b"untrusted comment: x\n" + base64.b64encode(bytes(bad)))
    encrypted = bytes(blob[:2]) + b"Sc" + bytes(blob[4:])
    with pytest.raises(SignatureError, match=r"password-encrypted.*minisign -C -W"):
        SecretKey.from_bytes(b"untrusted comment: x\n" + base64.b64encode(encrypted))
    path = tmp_path / "s.key"
    secret.to_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SignatureError, match="already exists"):
        secret.to_file(path)


# ---------------------------------------------------------------------------------------------
# fs-verity builtin signatures (PKCS#7)


@pytest.fixture(scope="module")
def verity_file(tmp_path_factory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("verity")
    path = d / "image.cfs"
    path.write_bytes(os.urandom(200_000))
    digest = fsverity.digest(path.read_bytes())
    if have("fsverity"):
        out = run("fsverity", "digest", path).stdout
        assert out.split()[0] == f"sha256:{digest.hex()}"
    return path, digest


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, tuple[Path, Path, bytes, bytes]]:
    d = tmp_path_factory.mktemp("certs")
    out = {}
    for kt in ("rsa-2048", "ecdsa-p256"):
        key_pem, cert_pem = make_signing_cert(f"bootimg test {kt}", kt, epoch=1700000000)
        (d / f"{kt}.key").write_bytes(key_pem)
        (d / f"{kt}.crt").write_bytes(cert_pem)
        out[kt] = (d / f"{kt}.key", d / f"{kt}.crt", key_pem, cert_pem)
    return out


@needs_fsverity
def test_rsa_pkcs7_identical_to_fsverity_sign(tmp_path, verity_file, certs):
    path, digest = verity_file
    key, crt, key_pem, cert_pem = certs["rsa-2048"]
    r = run("fsverity", "sign", path, tmp_path / "fs.sig", "--key", key, "--cert", crt)
    assert r.returncode == 0, r.stderr
    ours = fsverity_pkcs7_sign(digest, key_pem, cert_pem)
    assert ours == (tmp_path / "fs.sig").read_bytes()
    fsverity_pkcs7_verify(digest, ours, cert_pem)
    assert fsverity_pkcs7_sign(digest, key_pem, cert_pem) == ours  # deterministic


@needs_openssl
@needs_fsverity
def test_ecdsa_pkcs7_verified_by_openssl_and_fsverity_sig_by_us(tmp_path, verity_file, certs):
    path, digest = verity_file
    key, crt, key_pem, cert_pem = certs["ecdsa-p256"]
    content = tmp_path / "formatted"
    content.write_bytes(fsverity.fsverity_descriptor_digest_for_signing(digest))
    ours = tmp_path / "ours.sig"
    ours.write_bytes(fsverity_pkcs7_sign(digest, key_pem, cert_pem))
    for tool in ("smime", "cms"):
        r = run("openssl", tool, "-verify", "-binary", "-inform", "DER", "-in", ours,
                "-content", content, "-noverify", "-certfile", crt, "-nointern", "-out", os.devnull)
        assert r.returncode == 0, r.stderr
    # a different digest fails in openssl too
    content.write_bytes(fsverity.fsverity_descriptor_digest_for_signing(bytes(32)))
    r = run("openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", ours,
            "-content", content, "-noverify", "-certfile", crt, "-nointern", "-out", os.devnull)
    assert r.returncode != 0
    # and ECDSA signatures made by fsverity-utils verify with ours
    assert run("fsverity", "sign", path, tmp_path / "fs.sig", "--key", key,
               "--cert", crt).returncode == 0
    fsverity_pkcs7_verify(digest, (tmp_path / "fs.sig").read_bytes(), cert_pem)


def test_pkcs7_verify_rejects(verity_file, certs):
    _, digest = verity_file
    _, _, key_pem, cert_pem = certs["rsa-2048"]
    _, _, ec_key, ec_cert = certs["ecdsa-p256"]
    der = fsverity_pkcs7_sign(digest, key_pem, cert_pem)
    other = bytes([digest[0] ^ 1]) + digest[1:]
    with pytest.raises(SignatureError, match=f"does not match fs-verity digest sha256:{other.hex()}"):
        fsverity_pkcs7_verify(other, der, cert_pem)
    with pytest.raises(SignatureError, match="made by another certificate"):
        fsverity_pkcs7_verify(digest, der, ec_cert)
    with pytest.raises(SignatureError, match="malformed PKCS#7 signature"):
        fsverity_pkcs7_verify(digest, der[:-10], cert_pem)
    with pytest.raises(SignatureError, match="malformed PKCS#7 signature"):
        fsverity_pkcs7_verify(digest, b"\x30\x80" + der[2:], cert_pem)
    bad = bytearray(der)
    bad[-5] ^= 0xFF  # inside the RSA signature value
    with pytest.raises(SignatureError, match="does not match"):
        fsverity_pkcs7_verify(digest, bytes(bad), cert_pem)
    # every single-bit corruption is a SignatureError (never another exception, never a pass)
    for pos in range(len(der)):
        for bit in range(8):
            bad = bytearray(der)
            bad[pos] ^= 1 << bit
            with pytest.raises(SignatureError):
                fsverity_pkcs7_verify(digest, bytes(bad), cert_pem)
    with pytest.raises(SignatureError, match="not for this private key"):
        fsverity_pkcs7_sign(digest, key_pem, ec_cert)
    with pytest.raises(SignatureError, match="malformed or encrypted private key"):
        fsverity_pkcs7_sign(digest, b"nope", cert_pem)
    fsverity_pkcs7_verify(digest, fsverity_pkcs7_sign(digest, ec_key, ec_cert), ec_cert)


@needs_openssl
@pytest.mark.parametrize("extra", [[], ["-keyid"]], ids=["signed-attrs", "signed-attrs-skid"])
def test_pkcs7_with_signed_attributes_from_openssl(tmp_path, verity_file, certs, extra):
    """openssl cms -sign (signed attributes, optionally subject-key-id signer) is accepted,
    as the kernel accepts it; a wrong digest still fails via messageDigest."""
    _, digest = verity_file
    key, crt, _, cert_pem = certs["ecdsa-p256"]
    content = tmp_path / "formatted"
    content.write_bytes(fsverity.fsverity_descriptor_digest_for_signing(digest))
    sig = tmp_path / "cms.sig"
    r = run("openssl", "cms", "-sign", "-binary", "-nocerts", "-outform", "DER", "-md", "sha256",
            "-in", content, "-signer", crt, "-inkey", key, "-out", sig, *extra)
    assert r.returncode == 0, r.stderr
    fsverity_pkcs7_verify(digest, sig.read_bytes(), cert_pem)
    with pytest.raises(SignatureError, match="does not match the fs-verity digest"):
        fsverity_pkcs7_verify(bytes(32), sig.read_bytes(), cert_pem)
    # embedded (non-detached) content is refused, as the kernel refuses it
    r = run("openssl", "cms", "-sign", "-binary", "-nocerts", "-nodetach", "-outform", "DER",
            "-in", content, "-signer", crt, "-inkey", key, "-out", sig)
    assert r.returncode == 0, r.stderr
    with pytest.raises(SignatureError, match="embedded content"):
        fsverity_pkcs7_verify(digest, sig.read_bytes(), cert_pem)


def test_signing_cert_is_reproducible_apart_from_the_key(certs):
    from cryptography import x509

    _, _, key_pem, cert_pem = certs["ecdsa-p256"]
    cert = x509.load_pem_x509_certificate(cert_pem)
    def utc(cert, name):  # the *_utc properties came with cryptography 42 (Debian 12 has 38)
        value = getattr(cert, f"{name}_utc", None)
        return value if value is not None else getattr(cert, name).replace(tzinfo=timezone.utc)

    assert utc(cert, "not_valid_before") == datetime.fromtimestamp(1700000000, timezone.utc)
    assert (utc(cert, "not_valid_after") - utc(cert, "not_valid_before")).days == 3650
    assert cert.subject.rfc4514_string() == "CN=bootimg test ecdsa-p256"
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert x509.load_der_x509_certificate(cert_der(cert_pem)) == cert
    with pytest.raises(SignatureError, match="unknown key type"):
        make_signing_cert("x", "ed25519")
    k2, c2 = make_signing_cert("y", "rsa-2048", epoch=0, days=1)
    assert utc(x509.load_pem_x509_certificate(c2), "not_valid_before").year == 1970


# ---------------------------------------------------------------------------------------------
# CLI


def assert_one_line_error(r: subprocess.CompletedProcess, *parts: str) -> str:
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == 1, err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    for p in parts:
        assert p in err, err
    return err


def test_cli_keygen(tmp_path):
    r = run_cli("keygen", "--out", str(tmp_path / "keys"), "--name", "release", "--comment", "ci")
    assert r.returncode == 0, r.stderr
    keyid = r.stdout.decode().strip()
    assert re.fullmatch(r"[0-9A-F]{16}", keyid)
    key, pub = tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert PublicKey.from_file(pub).keyid == keyid == SecretKey.from_file(key).keyid
    before = key.read_bytes(), pub.read_bytes()
    r = run_cli("keygen", "--out", str(tmp_path / "keys"), "--name", "release")
    assert_one_line_error(r, "release.key: already exists; refusing to overwrite it")
    assert (key.read_bytes(), pub.read_bytes()) == before
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["release.key", "release.pub"]
    # a lone leftover .pub also blocks, and nothing new is written
    (tmp_path / "keys" / "x.pub").write_text("old")
    assert_one_line_error(run_cli("keygen", "--out", str(tmp_path / "keys"), "--name", "x"),
                          "x.pub: already exists")
    assert not (tmp_path / "keys" / "x.key").exists()
    assert_one_line_error(run_cli("keygen", "--out", str(tmp_path), "--name", "../evil"),
                          "invalid key name")


def test_cli_sign_and_verify(tmp_path):
    assert run_cli("keygen", "--out", str(tmp_path), "--name", "a").returncode == 0
    assert run_cli("keygen", "--out", str(tmp_path), "--name", "b").returncode == 0
    a_id = PublicKey.from_file(tmp_path / "a.pub").keyid
    msg = tmp_path / "release.json"
    msg.write_bytes(MESSAGE)
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    r = run_cli("sign", str(msg), "--key", str(tmp_path / "a.key"), env=env)
    assert r.returncode == 0, r.stderr
    sig = tmp_path / "release.json.minisig"
    first = sig.read_bytes()
    assert f"trusted comment: timestamp:1700000000\tfile:release.json\tkey:{a_id}\n".encode() in first
    assert run_cli("sign", str(msg), "--key", str(tmp_path / "a.key"), env=env).returncode == 0
    assert sig.read_bytes() == first  # reproducible
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["a.key", "a.pub", "b.key", "b.pub", "release.json", "release.json.minisig"]

    r = run_cli("verify-signature", str(msg), "--key", str(tmp_path / "b.pub"),
                "--key", str(tmp_path / "a.pub"))
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.count("\n") == 1 and f"good signature by key {a_id}" in out

    assert_one_line_error(run_cli("verify-signature", str(msg), "--sig", str(sig),
                                  "--key", str(tmp_path / "b.pub")),
                          f"signed by key {a_id} which is not trusted")
    msg.write_bytes(MESSAGE.replace(b"1.2.3", b"1.2.4"))
    assert_one_line_error(run_cli("verify-signature", str(msg), "--key", str(tmp_path / "a.pub")),
                          "does not match (file modified?)")
    assert_one_line_error(run_cli("verify-signature", str(msg), "--sig", str(tmp_path / "none"),
                                  "--key", str(tmp_path / "a.pub")), "cannot read signature")
    assert_one_line_error(run_cli("sign", str(msg), "--key", str(tmp_path / "a.pub")),
                          "a.pub: malformed secret key file: line 2")
    assert_one_line_error(run_cli("sign", str(tmp_path / "missing"), "--key", str(tmp_path / "a.key")),
                          "missing: cannot read")
    assert_one_line_error(run_cli("sign", str(msg), "--key", str(tmp_path / "a.key"),
                                  "-o", str(tmp_path / "no" / "dir.sig")),
                          "dir.sig: cannot write: No such file or directory")

    # -o, --trusted-comment, --prehash
    out_sig = tmp_path / "custom.sig"
    r = run_cli("sign", str(msg), "--key", str(tmp_path / "b.key"), "-o", str(out_sig),
                "--trusted-comment", "release 1.2.4", "--prehash")
    assert r.returncode == 0, r.stderr
    assert parse_signature(out_sig.read_bytes()).prehashed
    r = run_cli("verify-signature", str(msg), "--sig", str(out_sig), "--key", str(tmp_path / "b.pub"))
    assert r.returncode == 0 and b"trusted comment: release 1.2.4" in r.stdout


@needs_minisign
@needs_signify
def test_cli_output_verifies_with_the_initramfs_tools(tmp_path):
    """The exact commands an initramfs hook runs on a `bootimg sign` output."""
    assert run_cli("keygen", "--out", str(tmp_path), "--name", "rel").returncode == 0
    msg = tmp_path / "release.json"
    msg.write_bytes(MESSAGE)
    assert run_cli("sign", str(msg), "--key", str(tmp_path / "rel.key"),
                   env={"SOURCE_DATE_EPOCH": "1700000000"}).returncode == 0
    sig, pub = tmp_path / "release.json.minisig", tmp_path / "rel.pub"
    assert run("minisign", "-V", "-q", "-p", pub, "-x", sig, "-m", msg).returncode == 0
    assert run("signify-openbsd", "-V", "-q", "-p", pub, "-x", sig, "-m", msg).returncode == 0
    msg.write_bytes(MESSAGE + b"\n")
    assert run("minisign", "-V", "-q", "-p", pub, "-x", sig, "-m", msg).returncode == 1
    assert run("signify-openbsd", "-V", "-q", "-p", pub, "-x", sig, "-m", msg).returncode == 1
