"""Errors raised by the data package (one-line messages)."""

from __future__ import annotations

__all__ = ["DataError", "ImageLoadError"]


class DataError(ValueError):
    """A data set could not be found or read; the message says which and how to fix it."""


class ImageLoadError(DataError):
    """One image file could not be decoded. ``str(e)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
