# SPDX-License-Identifier: GPL-2.0-or-later
"""The exceptions of the hbitmap package.

Every failure of the library is an :class:`Error`, an :class:`OSError` whose ``errno`` is the
library's errno, ``strerror`` its message (naming the bitmap and what is wrong) and
``filename`` the image. As :class:`OSError` itself does, the class raised is chosen by the
errno, so that the usual handlers work::

    try:
        hbitmap.Image("missing.qcow2")
    except FileNotFoundError:        # hbitmap.NotFoundError is one
        ...

``kind`` names the library's error variant: ``"io"``, ``"corrupt"``, ``"unsupported"``,
``"locked"``, ``"read-only"``, ``"not-found"``, ``"exists"``, ``"in-use"``,
``"invalid-argument"``, ``"limit"``.
"""

from __future__ import annotations

import errno as _errno
from typing import Dict, Optional, Type


class Error(OSError):
    """A failure of the library: an OSError with its errno, message and image (filename)."""

    kind: str = "io"


class NotFoundError(Error, FileNotFoundError):
    """ENOENT: no such image file, or no bitmap of that name."""


class ExistsError(Error, FileExistsError):
    """EEXIST: a bitmap of that name exists already."""


class LockedError(Error, BlockingIOError):
    """EAGAIN: another process (QEMU) holds the image's locks."""


class PermissionDeniedError(Error, PermissionError):
    """EACCES or EPERM: the image file cannot be opened as asked."""


class IsADirectoryImageError(Error, IsADirectoryError):
    """EISDIR: the path is a directory."""


class InvalidArgumentError(Error, ValueError):
    """EINVAL for a bad argument (a range past the virtual size, a bad granularity or name):
    also a ValueError."""


for _cls in (Error, NotFoundError, ExistsError, LockedError, PermissionDeniedError,
             IsADirectoryImageError, InvalidArgumentError):
    _cls.__module__ = "hbitmap"

_BY_ERRNO: Dict[int, Type[Error]] = {
    _errno.ENOENT: NotFoundError,
    _errno.EEXIST: ExistsError,
    _errno.EAGAIN: LockedError,
    _errno.EACCES: PermissionDeniedError,
    _errno.EPERM: PermissionDeniedError,
    _errno.EISDIR: IsADirectoryImageError,
}


def _make(errno: int, kind: str, message: str, filename: Optional[str]) -> Error:
    """Builds the exception the extension raises (called from Rust)."""
    if kind == "invalid-argument":
        cls: Type[Error] = InvalidArgumentError
    else:
        cls = _BY_ERRNO.get(errno, Error)
    error = cls(errno, message)
    if filename is not None:
        # Set apart: BlockingIOError's constructor reads a third argument as a byte count.
        error.filename = filename
    error.kind = kind
    return error
