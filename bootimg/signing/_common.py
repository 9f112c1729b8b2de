"""Shared pieces of the signing package: the error type and atomic file writes."""

from __future__ import annotations

import os

from .. import fsutil
from ..errors import BootimgError


class SignatureError(BootimgError):
    """A signature, key or certificate that is malformed, untrusted or does not match."""


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644,
                     overwrite: bool = True) -> None:
    """fsutil.write_atomically, with its errors as SignatureError (the signing commands' type)."""
    try:
        fsutil.write_atomically(path, data, mode=mode, overwrite=overwrite)
    except SignatureError:
        raise
    except BootimgError as err:
        raise SignatureError(err.message, file=err.file) from None


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of ``path``, or a one-line SignatureError ("cannot read <what>: ...")."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SignatureError(f"cannot read {what}: {e.strerror or e}", file=os.fspath(path)) from None
