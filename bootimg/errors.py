"""User-facing errors: one line that names the file, the place and what is wrong.

Library code raises these; the CLI prints ``str(err)`` and exits non-zero without a
traceback. Anything else escaping the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


class BootimgError(Exception):
    """An error caused by the user's input or environment, not by a bug."""

    exit_code = 1

    def __init__(self, message: str, *, file: str | None = None, where: str | int | None = None):
        self.message = message
        self.file = file
        self.where = where
        super().__init__(self.format())

    def format(self) -> str:
        if self.file is None:
            return self.message
        loc = self.file if self.where is None else f"{self.file}:{self.where}"
        return f"{loc}: {self.message}"


class FormatError(BootimgError):
    """Input that violates the composefs dump or image format."""
