"""Sub-commands: `bootimg keygen`, `bootimg sign` and `bootimg verify-signature`.

(`bootimg verify` is the whole-release check, built on this package elsewhere.)
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from . import SignatureError, generate_keypair

    if not _NAME.fullmatch(args.name):
        raise SignatureError(f"invalid key name {args.name!r} (letters, digits, '_.+-'; no '/')")
    try:
        os.makedirs(args.out, mode=0o700, exist_ok=True)
    except OSError as e:
        raise SignatureError(f"cannot create directory: {e.strerror or e}", file=args.out) from None
    key_path = os.path.join(args.out, args.name + ".key")
    pub_path = os.path.join(args.out, args.name + ".pub")
    for path in (key_path, pub_path):
        if os.path.lexists(path):
            raise SignatureError("already exists; refusing to overwrite it", file=path)
    secret, public = generate_keypair(args.comment or "")
    secret.to_file(key_path)  # 0600, fails if it appeared meanwhile
    try:
        public.to_file(pub_path)
    except BaseException:
        os.unlink(key_path)
        raise
    print(public.keyid)
    print(f"bootimg keygen: wrote {key_path} (secret, mode 0600) and {pub_path}", file=sys.stderr)
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from . import SecretKey, SignatureError, make_trusted_comment, sign_file, write_atomically

    secret = SecretKey.from_file(args.key)
    if args.trusted_comment is not None:
        comment = args.trusted_comment
    else:
        timestamp = args.timestamp
        if timestamp is None and os.environ.get("SOURCE_DATE_EPOCH"):
            try:
                timestamp = int(os.environ["SOURCE_DATE_EPOCH"])
            except ValueError:
                raise SignatureError("SOURCE_DATE_EPOCH is not an integer: "
                                     f"{os.environ['SOURCE_DATE_EPOCH']!r}") from None
        comment = make_trusted_comment(file=args.file, keyid=secret.keyid, timestamp=timestamp,
                                       prehashed=args.prehash)
    out = args.output or args.file + ".minisig"
    data = sign_file(secret, args.file, comment, prehashed=args.prehash)
    write_atomically(out, data)
    print(f"{out}: signed {args.file} with key {secret.keyid}")
    return 0


def _cmd_verify_signature(args: argparse.Namespace) -> int:
    from . import PublicKey, verify_file

    keys = [PublicKey.from_file(path) for path in args.key]
    result = verify_file(args.file, keys, args.sig)
    print(f"{args.file}: good signature by key {result.keyid}; "
          f"trusted comment: {result.trusted_comment}")
    return 0


def _epoch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keygen",
        help="create an Ed25519 release signing key pair (minisign format)",
        description="Write DIR/NAME.key (unencrypted minisign secret key, mode 0600) and "
                    "DIR/NAME.pub; print the key id. Never overwrites.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the key files")
    p.add_argument("--name", required=True, metavar="NAME", help="base name of the key files")
    p.add_argument("--comment", metavar="TEXT", help="note in the keys' untrusted comments")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser(
        "sign",
        help="sign a file (minisign .minisig; verifiable by minisign and signify)",
        description="Write a minisign signature of FILE. The default trusted comment is "
                    "'timestamp:$SOURCE_DATE_EPOCH<TAB>file:NAME<TAB>key:KEYID' (no timestamp "
                    "when SOURCE_DATE_EPOCH is unset); signatures are deterministic.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", required=True, metavar="NAME.key", help="secret key file")
    p.add_argument("--trusted-comment", metavar="TEXT", help="authenticated one-line comment")
    p.add_argument("--timestamp", type=_epoch, metavar="EPOCH",
                   help="timestamp for the default trusted comment (default $SOURCE_DATE_EPOCH)")
    p.add_argument("--prehash", action="store_true",
                   help="sign BLAKE2b(FILE) ('ED': minisign only, any size) instead of FILE "
                        "itself ('Ed': minisign and signify, up to 1 GiB)")
    p.add_argument("-o", "--output", metavar="SIG", help="signature file (default FILE.minisig)")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser(
        "verify-signature",
        help="check a file's minisign signature against trusted public keys",
        description="Exit 0 if SIG is a valid signature of FILE by one of the given keys "
                    "(key rotation: give old and new keys), 1 otherwise.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--sig", metavar="SIG", help="signature file (default FILE.minisig)")
    p.add_argument("--key", required=True, action="append", metavar="KEY.pub",
                   help="trusted public key (repeat for several)")
    p.set_defaults(func=_cmd_verify_signature)
