"""fs-verity builtin signatures: PKCS#7 (DER) over ``struct fsverity_formatted_digest``.

For kernels with CONFIG_FS_VERITY_BUILTIN_SIGNATURES: the signature is passed to
FS_IOC_ENABLE_VERITY and the kernel checks it against the certificates in its ``.fs-verity``
keyring. The kernel's PKCS#7 verifier takes RSA (PKCS#1 v1.5) and ECDSA keys, not Ed25519.

:func:`fsverity_pkcs7_sign` produces what ``fsverity sign`` (fsverity-utils 1.5) produces:
SignedData with no certificates, no signed attributes, detached content (OpenSSL's
PKCS7_NOCERTS | PKCS7_NOATTR | PKCS7_DETACHED | PKCS7_BINARY), SHA-256. With an RSA key the
output is byte-identical to ``fsverity sign`` (PKCS#1 v1.5 is deterministic); ECDSA signatures
are randomised.

:func:`fsverity_pkcs7_verify` checks such a signature in Python. ``cryptography`` can build
PKCS#7 but not verify it, so a small strict DER reader below walks the SignedData; it accepts
what the kernel accepts for this use (one SignerInfo, identified by issuer+serial or by subject
key id, with or without signed attributes; detached content) and nothing looser.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from ..composefs.fsverity import fsverity_descriptor_digest_for_signing
from ._common import SignatureError

KEY_TYPES = ("rsa-2048", "rsa-3072", "rsa-4096", "ecdsa-p256", "ecdsa-p384")


# ---------------------------------------------------------------------------------------------
# Certificates and signing


def _source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise SignatureError(f"SOURCE_DATE_EPOCH is not an integer: {value!r}") from None


def _generate_key(key_type: str):
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    curve = {"ecdsa-p256": ec.SECP256R1, "ecdsa-p384": ec.SECP384R1}[key_type]
    return ec.generate_private_key(curve())


def make_signing_cert(common_name: str, key_type: str = "rsa-2048", *, epoch: int | None = None,
                      days: int = 3650) -> tuple[bytes, bytes]:
    """A new private key and a self-signed X.509 certificate for the ``.fs-verity`` keyring.

    Returns ``(private_key_pem, cert_pem)`` (PKCS#8, unencrypted; the certificate's DER for
    ``keyctl padd asymmetric '' %keyring:.fs-verity`` is :func:`cert_der`). Validity runs from
    ``epoch`` (default SOURCE_DATE_EPOCH, else 0) for ``days`` days, and the serial number is
    derived from the public key, so nothing depends on the wall clock. The key is random.
    ``key_type`` is one of :data:`KEY_TYPES`; RSA is the default because its signatures are
    deterministic (reproducible builds) and every kernel with builtin signatures takes it.
    """
    if key_type not in KEY_TYPES:
        raise SignatureError(f"unknown key type {key_type!r} (choose from {', '.join(KEY_TYPES)})")
    if not common_name or any(c in common_name for c in "\r\n\0"):
        raise SignatureError(f"invalid certificate common name {common_name!r}")
    if epoch is None:
        epoch = _source_date_epoch()
    key = _generate_key(key_type)
    public = key.public_key()
    spki = public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    serial = int.from_bytes(hashlib.sha256(spki + common_name.encode()).digest()[:16], "big") >> 1
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before = datetime.fromtimestamp(epoch, timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial or 1)
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(cert: bytes | str) -> x509.Certificate:
    data = cert.encode() if isinstance(cert, str) else bytes(cert)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise SignatureError(f"malformed certificate: {e}") from None


def cert_der(cert_pem: bytes | str) -> bytes:
    """The DER form of a certificate (what the kernel keyring takes)."""
    return _load_cert(cert_pem).public_bytes(serialization.Encoding.DER)


def _load_key(key_pem: bytes | str):
    data = key_pem.encode() if isinstance(key_pem, str) else bytes(key_pem)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"malformed or encrypted private key: {e}") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise SignatureError("private key is not RSA or ECDSA (the kernel's PKCS#7 verifier "
                             "takes only those)")
    return key


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def fsverity_pkcs7_sign(digest: bytes, key_pem: bytes | str, cert_pem: bytes | str) -> bytes:
    """A DER PKCS#7 signature of the fs-verity SHA-256 ``digest`` (32 raw bytes), as
    ``fsverity sign --key KEY --cert CERT`` makes it (byte-identical for RSA keys)."""
    key = _load_key(key_pem)
    cert = _load_cert(cert_pem)
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise SignatureError("the certificate is not for this private key")
    message = fsverity_descriptor_digest_for_signing(bytes(digest))
    opts = pkcs7.PKCS7Options
    return (pkcs7.PKCS7SignatureBuilder()
            .set_data(message)
            .add_signer(cert, key, hashes.SHA256())
            .sign(serialization.Encoding.DER,
                  [opts.DetachedSignature, opts.NoCerts, opts.NoAttributes, opts.Binary]))


# ---------------------------------------------------------------------------------------------
# A strict DER reader, just enough for PKCS#7 SignedData


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class _Node:
    buf: bytes
    tag: int
    start: int  # header start
    body: int   # content start
    end: int

    @property
    def raw(self) -> bytes:
        return self.buf[self.start:self.end]

    @property
    def content(self) -> bytes:
        return self.buf[self.body:self.end]

    def children(self) -> list[_Node]:
        if not self.tag & 0x20:
            raise _Malformed(f"element with tag 0x{self.tag:02x} is not constructed")
        out, pos = [], self.body
        while pos < self.end:
            node = _read(self.buf, pos, self.end)
            out.append(node)
            pos = node.end
        return out


def _read(buf: bytes, pos: int, end: int) -> _Node:
    if pos + 2 > end:
        raise _Malformed("truncated")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise _Malformed("multi-byte tags are not used in PKCS#7")
    first = buf[pos + 1]
    body = pos + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise _Malformed("indefinite length (BER, not DER)")
    else:
        n = first & 0x7F
        if n > 4 or body + n > end:
            raise _Malformed("bad length")
        length = int.from_bytes(buf[body:body + n], "big")
        if buf[body] == 0 or length < 0x80:
            raise _Malformed("non-minimal length (not DER)")
        body += n
    if body + length > end:
        raise _Malformed("truncated")
    return _Node(buf, tag, pos, body, body + length)


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray()
    for value in [40 * parts[0] + parts[1], *parts[2:]]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


_SEQ, _SET, _INT, _OCTETS, _OID, _NULL = 0x30, 0x31, 0x02, 0x04, 0x06, 0x05
OID_SIGNED_DATA = _oid("1.2.840.113549.1.7.2")
OID_DATA = _oid("1.2.840.113549.1.7.1")
OID_CONTENT_TYPE = _oid("1.2.840.113549.1.9.3")
OID_MESSAGE_DIGEST = _oid("1.2.840.113549.1.9.4")
_DIGESTS = {
    _oid("2.16.840.1.101.3.4.2.1"): hashes.SHA256,
    _oid("2.16.840.1.101.3.4.2.2"): hashes.SHA384,
    _oid("2.16.840.1.101.3.4.2.3"): hashes.SHA512,
}
_RSA_SIGS = {  # None: the hash is the SignerInfo's digestAlgorithm
    _oid("1.2.840.113549.1.1.1"): None,
    _oid("1.2.840.113549.1.1.11"): hashes.SHA256,
    _oid("1.2.840.113549.1.1.12"): hashes.SHA384,
    _oid("1.2.840.113549.1.1.13"): hashes.SHA512,
}
_EC_SIGS = {
    _oid("1.2.840.10045.2.1"): None,
    _oid("1.2.840.10045.4.3.2"): hashes.SHA256,
    _oid("1.2.840.10045.4.3.3"): hashes.SHA384,
    _oid("1.2.840.10045.4.3.4"): hashes.SHA512,
}


def _expect(node: _Node, tag: int, what: str) -> _Node:
    if node.tag != tag:
        raise _Malformed(f"{what}: expected tag 0x{tag:02x}, found 0x{node.tag:02x}")
    return node


def _pair(node: _Node, what: str) -> tuple[_Node, _Node]:
    items = node.children()
    if len(items) != 2:
        raise _Malformed(f"{what}: expected 2 elements, found {len(items)}")
    return items[0], items[1]


def _alg_oid(node: _Node, what: str) -> bytes:
    parts = _expect(node, _SEQ, what).children()
    if not parts or len(parts) > 2:
        raise _Malformed(f"{what}: bad AlgorithmIdentifier")
    if len(parts) == 2 and parts[1].tag != _NULL:
        raise _Malformed(f"{what}: unexpected algorithm parameters")
    return _expect(parts[0], _OID, what).content


@dataclass(frozen=True)
class _SignerInfo:
    issuer: bytes | None  # raw DER Name, with serial
    serial: bytes | None  # INTEGER content bytes
    skid: bytes | None
    digest_oid: bytes
    signed_attrs: _Node | None
    sig_oid: bytes
    signature: bytes


def _parse(der: bytes) -> _SignerInfo:
    top = _read(der, 0, len(der))
    if top.end != len(der):
        raise _Malformed("trailing data after the signature")
    items = _expect(top, _SEQ, "ContentInfo").children()
    if not items:
        raise _Malformed("empty ContentInfo")
    content_type, rest = items[0], items[1:]
    if _expect(content_type, _OID, "ContentInfo").content != OID_SIGNED_DATA:
        raise _Malformed("not a PKCS#7 SignedData")
    if len(rest) != 1 or rest[0].tag != 0xA0:
        raise _Malformed("ContentInfo: missing [0] content")
    inner = rest[0].children()
    if len(inner) != 1:
        raise _Malformed("ContentInfo: bad [0] content")
    fields = _expect(inner[0], _SEQ, "SignedData").children()
    if len(fields) < 4:
        raise _Malformed("SignedData: too few fields")
    sd_version = _expect(fields[0], _INT, "SignedData.version").content
    digest_algs = [_alg_oid(n, "SignedData.digestAlgorithms")
                   for n in _expect(fields[1], _SET, "SignedData.digestAlgorithms").children()]
    encap = _expect(fields[2], _SEQ, "SignedData.contentInfo").children()
    if not encap or _expect(encap[0], _OID, "contentInfo").content != OID_DATA:
        raise _Malformed("contentInfo is not id-data")
    if len(encap) > 1:
        raise _Malformed("the signature has embedded content; fs-verity needs a detached one")
    pos = 3
    while pos < len(fields) and fields[pos].tag in (0xA0, 0xA1):  # certificates, crls
        pos += 1
    if pos != len(fields) - 1:
        raise _Malformed("SignedData: unexpected fields")
    signers = _expect(fields[pos], _SET, "SignedData.signerInfos").children()
    if len(signers) != 1:
        raise _Malformed(f"expected exactly one SignerInfo, found {len(signers)}")
    parts = _expect(signers[0], _SEQ, "SignerInfo").children()
    if len(parts) < 5:
        raise _Malformed("SignerInfo: too few fields")
    version = _expect(parts[0], _INT, "SignerInfo.version").content
    # As the kernel: PKCS#7 (v1/v1, issuer+serial) or CMS (v3/v3, subject key id).
    if version not in (b"\x01", b"\x03") or sd_version != version:
        raise _Malformed("unsupported SignedData/SignerInfo version")
    issuer = serial = skid = None
    sid = parts[1]
    if version == b"\x01" and sid.tag == _SEQ:
        name, number = _pair(sid, "IssuerAndSerialNumber")
        issuer = _expect(name, _SEQ, "issuer").raw
        serial = _expect(number, _INT, "serialNumber").content
    elif version == b"\x03" and sid.tag == 0x80:
        skid = sid.content
    else:
        raise _Malformed("SignerInfo: unsupported signer identifier")
    digest_oid = _alg_oid(parts[2], "SignerInfo.digestAlgorithm")
    if digest_oid not in digest_algs:
        raise _Malformed("SignerInfo digest algorithm is not listed in SignedData")
    i = 3
    signed_attrs = None
    if parts[i].tag == 0xA0:
        signed_attrs = parts[i]
        i += 1
    if len(parts) < i + 2:
        raise _Malformed("SignerInfo: too few fields")
    sig_oid = _alg_oid(parts[i], "SignerInfo.signatureAlgorithm")
    signature = _expect(parts[i + 1], _OCTETS, "SignerInfo.signature").content
    if len(parts) > i + 3 or (len(parts) == i + 3 and parts[i + 2].tag != 0xA1):
        raise _Malformed("SignerInfo: unexpected fields")
    return _SignerInfo(issuer, serial, skid, digest_oid, signed_attrs, sig_oid, signature)


def _cert_issuer_serial(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """Raw issuer Name and serial INTEGER content, straight from the TBSCertificate DER."""
    tbs = cert.tbs_certificate_bytes
    fields = _read(tbs, 0, len(tbs)).children()
    if fields[0].tag == 0xA0:  # [0] version
        fields = fields[1:]
    return fields[2].raw, fields[0].content


def _signed_bytes(info: _SignerInfo, message: bytes, hash_cls) -> bytes:
    """What the signature covers: the message, or the DER SET OF signed attributes after
    checking that they bind the message (contentType data, messageDigest = H(message))."""
    if info.signed_attrs is None:
        return message
    seen: dict[bytes, list[_Node]] = {}
    for attr in info.signed_attrs.children():
        oid, values = _pair(_expect(attr, _SEQ, "Attribute"), "Attribute")
        key = _expect(oid, _OID, "Attribute").content
        if key in seen:
            raise _Malformed("duplicate signed attribute")
        seen[key] = _expect(values, _SET, "Attribute").children()
    ct = seen.get(OID_CONTENT_TYPE)
    md = seen.get(OID_MESSAGE_DIGEST)
    if not ct or not md or len(ct) != 1 or len(md) != 1:
        raise _Malformed("signed attributes lack contentType or messageDigest")
    if ct[0].tag != _OID or ct[0].content != OID_DATA:
        raise _Malformed("signed attribute contentType is not id-data")
    h = hashes.Hash(hash_cls())
    h.update(message)
    if _expect(md[0], _OCTETS, "messageDigest").content != h.finalize():
        raise SignatureError("PKCS#7 signature does not match the fs-verity digest "
                             "(messageDigest differs)")
    raw = info.signed_attrs.raw
    return b"\x31" + raw[1:]  # signed as an explicit SET OF, not as [0] IMPLICIT


def fsverity_pkcs7_verify(digest: bytes, der: bytes, cert_pem: bytes | str) -> None:
    """Check a builtin fs-verity signature (DER PKCS#7) of the SHA-256 fs-verity ``digest``
    against one certificate, as the kernel would against its ``.fs-verity`` keyring.
    Raises SignatureError (one line) on any mismatch or malformed input."""
    cert = _load_cert(cert_pem)
    message = fsverity_descriptor_digest_for_signing(bytes(digest))
    try:
        info = _parse(bytes(der))
    except _Malformed as e:
        raise SignatureError(f"malformed PKCS#7 signature: {e}") from None

    if info.skid is not None:
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            ski = None
        if ski != info.skid:
            raise SignatureError("PKCS#7 signature was made by another key "
                                 f"(subject key id {info.skid.hex()})")
    else:
        issuer, serial = _cert_issuer_serial(cert)
        if (info.issuer, info.serial) != (issuer, serial):
            raise SignatureError("PKCS#7 signature was made by another certificate "
                                 f"(serial {info.serial.hex()}, certificate has {serial.hex()})")

    hash_cls = _DIGESTS.get(info.digest_oid)
    if hash_cls is None:
        raise SignatureError("PKCS#7 signature uses an unsupported digest algorithm")
    try:
        signed = _signed_bytes(info, message, hash_cls)
    except _Malformed as e:
        raise SignatureError(f"malformed PKCS#7 signature: {e}") from None

    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        table, scheme = _RSA_SIGS, "RSA"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        table, scheme = _EC_SIGS, "ECDSA"
    else:
        raise SignatureError("certificate key is not RSA or ECDSA")
    if info.sig_oid not in table:
        raise SignatureError(f"PKCS#7 signature algorithm does not fit the certificate's {scheme} key")
    bound = table[info.sig_oid]
    if bound is not None and bound is not hash_cls:
        raise SignatureError("PKCS#7 signature and digest algorithms disagree")
    try:
        if scheme == "RSA":
            public.verify(info.signature, signed, padding.PKCS1v15(), hash_cls())
        else:
            public.verify(info.signature, signed, ec.ECDSA(hash_cls()))
    except InvalidSignature:
        raise SignatureError(f"PKCS#7 signature does not match fs-verity digest "
                             f"sha256:{bytes(digest).hex()} (another image, or another key)") from None
