"""Ed25519 release signatures in the minisign file format.

Why this format: it is what small, existing C verifiers check, so an initramfs can verify a
release without Python. Checked against the real tools (Debian bookworm):

* ``minisign -V`` (0.11) verifies both signature algorithms: "ED" (Ed25519 over
  BLAKE2b-512(message), minisign's default) and legacy "Ed" (Ed25519 over the message itself).
  In both, a second "global" signature over ``signature || trusted comment`` authenticates
  the trusted comment.
* ``signify-openbsd -V`` verifies legacy "Ed" signatures (its own format is the first two
  lines of a minisign file) and rejects "ED" ("unsupported file"). It ignores lines 3 and 4,
  so it does NOT authenticate the trusted comment.

So :func:`sign` writes legacy "Ed" by default (verifiable by both tools), and "ED" with
``prehashed=True`` (minisign only; needed by minisign for files over 1 GiB).

File formats (base64 is the standard alphabet with padding; the key id "keynum" is 8 random
bytes, shown like minisign does, as the little-endian 64-bit number in 16 upper-case hex
digits):

* public key:  ``untrusted comment: ...`` / base64("Ed" keynum(8) pk(32))
* signature:   ``untrusted comment: ...`` / base64(alg(2) keynum(8) sig(64)) /
  ``trusted comment: ...`` / base64(ed25519(sig || trusted comment bytes))
* secret key:  ``untrusted comment: ...`` / base64("Ed" kdf(2) "B2" salt(32) opslimit(8)
  memlimit(8) keynum(8) sk(64) chk(32)), with kdf = 00 00 (unencrypted, what
  ``minisign -G -W`` writes, and salt/limits zero), sk = seed(32) || pk(32) as libsodium keeps
  it, chk = BLAKE2b-256("Ed" keynum sk). ``minisign -S -s KEY`` signs with these files as they
  are; minisign-made unencrypted keys have chk = 0 and are accepted too. Password-encrypted
  minisign keys (kdf "Sc") are refused with a hint (``minisign -C -W`` removes the password).

Ed25519 is deterministic, so the same key, message and comments give identical bytes.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._common import SignatureError, read_file, write_atomically

ALG_LEGACY = b"Ed"
"""Ed25519 over the message itself (minisign -l, signify)."""
ALG_PREHASHED = b"ED"
"""Ed25519 over BLAKE2b-512(message) (minisign's default)."""

UNTRUSTED_PREFIX = "untrusted comment: "
TRUSTED_PREFIX = "trusted comment: "
KDF_NONE = b"\0\0"
KDF_SCRYPT = b"Sc"
CHK_BLAKE2B = b"B2"

KEYNUM_SIZE = 8
PK_SIZE = 32
SIG_SIZE = 64
_PUBKEY_LEN = 2 + KEYNUM_SIZE + PK_SIZE                 # 42
_SIGLINE_LEN = 2 + KEYNUM_SIZE + SIG_SIZE               # 74
_SECKEY_LEN = 2 + 2 + 2 + 32 + 8 + 8 + KEYNUM_SIZE + 64 + 32  # 158

# minisign reads comments with fgets into fixed buffers: an untrusted comment line fits in
# 1024 bytes (and signify's limit is the same), a trusted comment in 8192 - len(prefix) - 1.
MAX_UNTRUSTED_COMMENT = 1024 - len(UNTRUSTED_PREFIX) - 2
MAX_TRUSTED_COMMENT = 8192 - len(TRUSTED_PREFIX) - 2

LEGACY_MAX_MESSAGE = 1 << 30
"""minisign refuses to verify a legacy ("Ed") signature over more than 1 GiB."""

_READ_CHUNK = 1 << 20


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _unb64(text: str, size: int, what: str) -> bytes:
    try:
        raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != size:
        raise ValueError(f"{what} decodes to {len(raw)} bytes, expected {size}")
    if _b64(raw) != text:  # like libsodium: no stray bits in the last character
        raise ValueError(f"{what} is not canonical base64")
    return raw


def keyid_hex(keynum: bytes) -> str:
    """The key id as minisign prints it: the little-endian u64, 16 upper-case hex digits."""
    return keynum[::-1].hex().upper()


def _check_comment(comment: str, limit: int, what: str) -> bytes:
    if not isinstance(comment, str):
        raise TypeError(f"{what} must be a str")
    if any(c in comment for c in "\r\n\0"):
        raise SignatureError(f"{what} must be one line (no CR, LF or NUL): {comment!r}")
    raw = comment.encode("utf-8")
    if len(raw) > limit:
        raise SignatureError(f"{what} is {len(raw)} bytes; at most {limit} fit in a minisign file")
    return raw


def _lines(data: bytes, count: int, what: str) -> list[str]:
    """Exactly ``count`` lines (LF or CRLF; a final newline optional, nothing after)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SignatureError(f"malformed {what}: line {line}: not UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    for i, ln in enumerate(lines):
        if "\r" in ln or "\0" in ln:  # C readers would cut the line there: refuse ambiguity
            raise SignatureError(f"malformed {what}: line {i + 1}: contains a CR or NUL byte")
    if len(lines) < count:
        raise SignatureError(f"malformed {what}: line {len(lines) + 1}: missing "
                             f"(expected {count} lines, found {len(lines)})")
    for i in range(count, len(lines)):
        if lines[i].strip():
            raise SignatureError(f"malformed {what}: line {i + 1}: unexpected content after "
                                 f"the {count} lines of a {what}")
    return lines[:count]


def _comment_of(line: str, prefix: str, lineno: int, what: str) -> str:
    if not line.startswith(prefix):
        raise SignatureError(f"malformed {what}: line {lineno}: does not start with {prefix.strip()!r}")
    return line[len(prefix):]


def _with_file(err: SignatureError, file: str | None) -> SignatureError:
    if file is None:
        return err
    return SignatureError(err.message, file=file)


# ---------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key with its minisign key number (8 bytes)."""

    keynum: bytes
    raw: bytes
    comment: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.keynum) != KEYNUM_SIZE or len(self.raw) != PK_SIZE:
            raise ValueError("keynum must be 8 bytes and the public key 32")

    @property
    def keyid(self) -> str:
        """Key id as minisign prints it, e.g. ``5DF6D261450561ED``."""
        return keyid_hex(self.keynum)

    def to_base64(self) -> str:
        """The key as one base64 string (what ``minisign -P`` takes)."""
        return _b64(ALG_LEGACY + self.keynum + self.raw)

    def to_bytes(self) -> bytes:
        """The public key file (``minisign -p`` / ``signify -p`` read it)."""
        comment = self.comment or f"minisign public key {self.keyid}"
        _check_comment(comment, MAX_UNTRUSTED_COMMENT, "untrusted comment")
        return f"{UNTRUSTED_PREFIX}{comment}\n{self.to_base64()}\n".encode("utf-8")

    def to_file(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        write_atomically(path, self.to_bytes(), mode=0o644, overwrite=overwrite)

    @classmethod
    def from_base64(cls, text: str, comment: str = "") -> PublicKey:
        """A key from its base64 form (the second line of a key file, ``minisign -P``)."""
        return cls._from_base64(text.strip(), comment)

    @classmethod
    def _from_base64(cls, text: str, comment: str = "") -> PublicKey:
        try:
            raw = _unb64(text, _PUBKEY_LEN, "public key")
        except ValueError as e:
            raise SignatureError(f"malformed public key: {e}") from None
        if raw[:2] != ALG_LEGACY:
            raise SignatureError(f"malformed public key: unsupported algorithm {raw[:2]!r} "
                                 f"(expected {ALG_LEGACY!r}, Ed25519)")
        return cls(raw[2:10], raw[10:], comment)

    @classmethod
    def from_bytes(cls, data: bytes, *, file: str | None = None) -> PublicKey:
        try:
            comment_line, key_line = _lines(data, 2, "public key file")
            comment = _comment_of(comment_line, UNTRUSTED_PREFIX, 1, "public key file")
            try:
                return cls._from_base64(key_line, comment)
            except SignatureError as e:
                raise SignatureError(f"malformed public key file: line 2: "
                                     f"{e.message.removeprefix('malformed public key: ')}") from None
        except SignatureError as e:
            raise _with_file(e, file) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PublicKey:
        return cls.from_bytes(read_file(path, "public key"), file=os.fspath(path))

    def _ed25519(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.raw)


@dataclass(frozen=True, repr=False)
class SecretKey:
    """An Ed25519 secret key (libsodium layout: seed || public key) and its key number."""

    keynum: bytes
    sk: bytes
    comment: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.keynum) != KEYNUM_SIZE or len(self.sk) != 64:
            raise ValueError("keynum must be 8 bytes and the secret key 64")
        derived = _public_raw(Ed25519PrivateKey.from_private_bytes(self.sk[:32]).public_key())
        if derived != self.sk[32:]:
            raise ValueError("its public half does not match its seed")

    def __repr__(self) -> str:  # never print the secret
        return f"SecretKey(keyid={self.keyid})"

    @property
    def keyid(self) -> str:
        return keyid_hex(self.keynum)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(self.keynum, self.sk[32:])

    def _checksum(self) -> bytes:
        return hashlib.blake2b(ALG_LEGACY + self.keynum + self.sk, digest_size=32).digest()

    def to_bytes(self) -> bytes:
        """The unencrypted minisign secret key file (``minisign -S -s`` reads it as is)."""
        comment = self.comment or f"bootimg unencrypted secret key {self.keyid}"
        _check_comment(comment, MAX_UNTRUSTED_COMMENT, "untrusted comment")
        blob = (ALG_LEGACY + KDF_NONE + CHK_BLAKE2B + bytes(32 + 8 + 8)
                + self.keynum + self.sk + self._checksum())
        assert len(blob) == _SECKEY_LEN
        return f"{UNTRUSTED_PREFIX}{comment}\n{_b64(blob)}\n".encode("utf-8")

    def to_file(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key file with mode 0600 (atomically; by default never over a file)."""
        write_atomically(path, self.to_bytes(), mode=0o600, overwrite=overwrite)

    @classmethod
    def from_bytes(cls, data: bytes, *, file: str | None = None) -> SecretKey:
        what = "secret key file"
        try:
            comment_line, key_line = _lines(data, 2, what)
            comment = _comment_of(comment_line, UNTRUSTED_PREFIX, 1, what)
            try:
                blob = _unb64(key_line, _SECKEY_LEN, "the key")
            except ValueError as e:
                raise SignatureError(f"malformed {what}: line 2: {e}") from None
            sig_alg, kdf, chk_alg = blob[0:2], blob[2:4], blob[4:6]
            if sig_alg != ALG_LEGACY:
                raise SignatureError(f"malformed {what}: line 2: unsupported algorithm {sig_alg!r}")
            if kdf == KDF_SCRYPT:
                raise SignatureError("secret key is password-encrypted; bootimg needs an "
                                     "unencrypted key (remove the password with `minisign -C -W`)")
            if kdf != KDF_NONE:
                raise SignatureError(f"malformed {what}: line 2: unknown key derivation {kdf!r}")
            if chk_alg != CHK_BLAKE2B:
                raise SignatureError(f"malformed {what}: line 2: unknown checksum {chk_alg!r}")
            keynum, sk, chk = blob[54:62], blob[62:126], blob[126:158]
            if chk != bytes(32) and chk != hashlib.blake2b(sig_alg + keynum + sk,
                                                           digest_size=32).digest():
                raise SignatureError(f"malformed {what}: line 2: checksum mismatch (key file damaged?)")
            try:
                return cls(keynum, sk, comment)
            except ValueError as e:
                raise SignatureError(f"malformed {what}: line 2: {e}") from None
        except SignatureError as e:
            raise _with_file(e, file) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SecretKey:
        return cls.from_bytes(read_file(path, "secret key"), file=os.fspath(path))

    @classmethod
    def from_seed(cls, keynum: bytes, seed: bytes, comment: str = "") -> SecretKey:
        """The key of a 32-byte Ed25519 seed (a derived key, e.g. a fixed example key)."""
        return cls(keynum, seed + _public_raw(Ed25519PrivateKey.from_private_bytes(seed).public_key()), comment)

    def _ed25519(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.sk[:32])


def _public_raw(key: Ed25519PublicKey) -> bytes:
    # Encoding.Raw rather than public_bytes_raw() (cryptography >= 40): Debian 12 has 38.
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_keypair(comment: str = "") -> tuple[SecretKey, PublicKey]:
    """A new random Ed25519 key pair with a random 8-byte key number, as ``minisign -G``.

    ``comment`` (optional) is added to the untrusted comment line of both key files.
    """
    if comment:
        _check_comment(comment, MAX_UNTRUSTED_COMMENT - 64, "comment")
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    pk = _public_raw(private.public_key())
    keynum = secrets.token_bytes(KEYNUM_SIZE)
    kid = keyid_hex(keynum)
    suffix = f" ({comment})" if comment else ""
    secret = SecretKey(keynum, seed + pk, f"bootimg unencrypted secret key {kid}{suffix}")
    public = PublicKey(keynum, pk, f"minisign public key {kid}{suffix}")
    return secret, public


# ---------------------------------------------------------------------------------------------
# Signatures


def make_trusted_comment(*, file: str, keyid: str, timestamp: int | None = None,
                         prehashed: bool = False, extra: Mapping[str, str] | None = None) -> str:
    """A deterministic trusted comment in minisign's style (tab-separated ``name:value``):
    ``timestamp:<epoch>\\tfile:<basename>\\tkey:<KEYID>[\\thashed][\\t<extra>...]``.

    ``timestamp`` should be SOURCE_DATE_EPOCH (never the wall clock: builds are reproducible);
    it is left out when None.
    """
    fields = []
    if timestamp is not None:
        fields.append(f"timestamp:{int(timestamp)}")
    fields.append(f"file:{os.path.basename(file)}")
    fields.append(f"key:{keyid}")
    if prehashed:
        fields.append("hashed")
    for k, v in (extra or {}).items():
        fields.append(f"{k}:{v}")
    for f in fields:
        if "\t" in f:
            raise SignatureError(f"trusted comment field contains a tab: {f!r}")
    return "\t".join(fields)


def parse_trusted_comment(comment: str) -> dict[str, str]:
    """``name:value`` fields of a tab-separated trusted comment (a bare word maps to "")."""
    out: dict[str, str] = {}
    for item in comment.split("\t"):
        name, _, value = item.partition(":")
        if name:
            out[name] = value
    return out


def _prehash(message: bytes) -> bytes:
    return hashlib.blake2b(message, digest_size=64).digest()


def _sign_payload(secret: SecretKey, alg: bytes, payload: bytes, trusted_comment: str,
                  untrusted_comment: str | None) -> bytes:
    tc = _check_comment(trusted_comment, MAX_TRUSTED_COMMENT, "trusted comment")
    uc = untrusted_comment if untrusted_comment is not None else \
        f"signature from minisign secret key {secret.keyid}"
    _check_comment(uc, MAX_UNTRUSTED_COMMENT, "untrusted comment")
    key = secret._ed25519()
    sig = key.sign(payload)
    global_sig = key.sign(sig + tc)
    return (f"{UNTRUSTED_PREFIX}{uc}\n{_b64(alg + secret.keynum + sig)}\n"
            f"{TRUSTED_PREFIX}{trusted_comment}\n{_b64(global_sig)}\n").encode("utf-8")


def sign(secret: SecretKey, message: bytes, trusted_comment: str, *, prehashed: bool = False,
         untrusted_comment: str | None = None) -> bytes:
    """The content of a ``.minisig`` signature file for ``message``.

    Legacy "Ed" by default (verifies with minisign and signify-openbsd); ``prehashed=True``
    writes "ED" (minisign only). Deterministic: same inputs, same bytes.
    """
    if prehashed:
        return _sign_payload(secret, ALG_PREHASHED, _prehash(message), trusted_comment,
                             untrusted_comment)
    return _sign_payload(secret, ALG_LEGACY, bytes(message), trusted_comment, untrusted_comment)


def _hash_file(path: str) -> bytes:
    h = hashlib.blake2b(digest_size=64)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise SignatureError(f"cannot read: {e.strerror or e}", file=path) from None
    return h.digest()


def sign_file(secret: SecretKey, path: str | os.PathLike[str], trusted_comment: str, *,
              prehashed: bool = False, untrusted_comment: str | None = None) -> bytes:
    """:func:`sign` for a file; prehashed mode streams it, so any size works. Legacy mode
    refuses files over 1 GiB, which minisign would not verify."""
    path = os.fspath(path)
    if prehashed:
        return _sign_payload(secret, ALG_PREHASHED, _hash_file(path), trusted_comment,
                             untrusted_comment)
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise SignatureError(f"cannot read: {e.strerror or e}", file=path) from None
    if size > LEGACY_MAX_MESSAGE:
        raise SignatureError("larger than 1 GiB: minisign cannot verify a legacy signature of "
                             "it; sign it prehashed (--prehash)", file=path)
    return sign(secret, read_file(path, "file"), trusted_comment,
                untrusted_comment=untrusted_comment)


@dataclass(frozen=True)
class ParsedSignature:
    untrusted_comment: str
    algorithm: bytes
    keynum: bytes
    signature: bytes
    trusted_comment: str
    global_signature: bytes

    @property
    def keyid(self) -> str:
        return keyid_hex(self.keynum)

    @property
    def prehashed(self) -> bool:
        return self.algorithm == ALG_PREHASHED


def parse_signature(data: bytes, *, file: str | None = None) -> ParsedSignature:
    """Parse a ``.minisig`` file strictly (4 lines), raising "malformed signature file: line N"."""
    what = "signature file"
    try:
        l1, l2, l3, l4 = _lines(data, 4, what)
        uc = _comment_of(l1, UNTRUSTED_PREFIX, 1, what)
        try:
            blob = _unb64(l2, _SIGLINE_LEN, "the signature")
        except ValueError as e:
            raise SignatureError(f"malformed {what}: line 2: {e}") from None
        alg = blob[:2]
        if alg not in (ALG_LEGACY, ALG_PREHASHED):
            raise SignatureError(f"malformed {what}: line 2: unsupported signature algorithm {alg!r}")
        tc = _comment_of(l3, TRUSTED_PREFIX, 3, what)
        try:
            global_sig = _unb64(l4, SIG_SIZE, "the trusted comment signature")
        except ValueError as e:
            raise SignatureError(f"malformed {what}: line 4: {e}") from None
        return ParsedSignature(uc, alg, blob[2:10], blob[10:], tc, global_sig)
    except SignatureError as e:
        raise _with_file(e, file) from None


@dataclass(frozen=True)
class VerifiedSignature:
    """The outcome of a successful :func:`verify`: which trusted key signed, and the
    authenticated trusted comment."""

    key: PublicKey
    trusted_comment: str
    prehashed: bool

    @property
    def keyid(self) -> str:
        return self.key.keyid

    @property
    def fields(self) -> dict[str, str]:
        return parse_trusted_comment(self.trusted_comment)


def _ed_verify(key: PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        key._ed25519().verify(sig, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def _verify_parsed(payload_for, parsed: ParsedSignature, trusted_keys: Iterable[PublicKey],
                   message_name: str | None, signature_name: str | None) -> VerifiedSignature:
    keys = list(trusted_keys)
    if not keys:
        raise SignatureError("no trusted keys given", file=signature_name)
    candidates = [k for k in keys if k.keynum == parsed.keynum]
    if not candidates:
        trusted = ", ".join(k.keyid for k in keys)
        raise SignatureError(f"signed by key {parsed.keyid} which is not trusted "
                             f"(trusted: {trusted})", file=signature_name)
    payload = payload_for(parsed)
    tc = parsed.trusted_comment.encode("utf-8")
    for key in candidates:
        if not _ed_verify(key, parsed.signature, payload):
            continue
        if not _ed_verify(key, parsed.global_signature, parsed.signature + tc):
            raise SignatureError("trusted comment does not match its signature "
                                 "(signature file modified?)", file=signature_name)
        return VerifiedSignature(key, parsed.trusted_comment, parsed.prehashed)
    raise SignatureError(f"signature by key {parsed.keyid} does not match (file modified?)",
                         file=message_name)


def verify(message: bytes, signature: bytes, trusted_keys: Iterable[PublicKey], *,
           message_name: str | None = None,
           signature_name: str | None = None) -> VerifiedSignature:
    """Check a ``.minisig`` signature of ``message`` against a list of trusted keys.

    Passes when a trusted key has the signature's key id and both the signature and the
    trusted-comment signature verify with it (key rotation: trust [old, new] during a
    transition). Raises SignatureError with one line otherwise; ``message_name`` and
    ``signature_name`` name the files in the message.
    """
    parsed = parse_signature(signature, file=signature_name)
    message = bytes(message)
    return _verify_parsed(lambda p: _prehash(message) if p.prehashed else message, parsed,
                          trusted_keys, message_name, signature_name)


def verify_file(path: str | os.PathLike[str], trusted_keys: Iterable[PublicKey],
                signature_path: str | os.PathLike[str] | None = None) -> VerifiedSignature:
    """:func:`verify` for files; the signature defaults to ``PATH.minisig``. Prehashed
    signatures are checked streaming, so any size works."""
    path = os.fspath(path)
    sig_path = os.fspath(signature_path) if signature_path is not None else path + ".minisig"
    parsed = parse_signature(read_file(sig_path, "signature"), file=sig_path)

    def payload(p: ParsedSignature) -> bytes:
        return _hash_file(path) if p.prehashed else read_file(path, "file")

    return _verify_parsed(payload, parsed, trusted_keys, path, sig_path)
