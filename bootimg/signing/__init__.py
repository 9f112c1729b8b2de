"""Signing: Ed25519 release signatures (minisign format) and fs-verity builtin PKCS#7 signatures.

Release signatures (:mod:`.minisig`) are what an initramfs checks with a small C verifier
(``minisign -V`` or ``signify-openbsd -V``) before trusting a release's fs-verity digests.
fs-verity PKCS#7 signatures (:mod:`.pkcs7`) are for kernels that check each image against the
``.fs-verity`` keyring.
"""

from ._common import SignatureError, write_atomically
from .minisig import (
    ALG_LEGACY,
    ALG_PREHASHED,
    ParsedSignature,
    PublicKey,
    SecretKey,
    VerifiedSignature,
    generate_keypair,
    keyid_hex,
    make_trusted_comment,
    parse_signature,
    parse_trusted_comment,
    sign,
    sign_file,
    verify,
    verify_file,
)
from .pkcs7 import (
    KEY_TYPES,
    cert_der,
    fsverity_pkcs7_sign,
    fsverity_pkcs7_verify,
    make_signing_cert,
)

__all__ = [
    "ALG_LEGACY", "ALG_PREHASHED", "KEY_TYPES", "ParsedSignature", "PublicKey", "SecretKey",
    "SignatureError", "VerifiedSignature", "cert_der", "fsverity_pkcs7_sign",
    "fsverity_pkcs7_verify", "generate_keypair", "keyid_hex", "make_signing_cert",
    "make_trusted_comment", "parse_signature", "parse_trusted_comment", "sign", "sign_file",
    "verify", "verify_file", "write_atomically",
]
