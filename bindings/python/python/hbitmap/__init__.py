# SPDX-License-Identifier: GPL-2.0-or-later
"""qcow2 persistent dirty bitmaps and QEMU's HBitmap, from libhbitmap.

Read, edit and repair the persistent bitmaps of a qcow2 image in one process, without QEMU::

    import hbitmap

    with hbitmap.Image("disk.qcow2") as image:
        for info in image.bitmaps():
            print(info.name, info.granularity, info.dirty_bytes)
        for offset, length in image.extents("backup-0"):
            ...  # copy these bytes of the disk

* :class:`Image` -- an open image: ``bitmaps()``, ``extents()``, ``add``, ``remove``,
  ``clear``, ``enable``, ``disable``, ``merge``, ``set``, ``reset``, ``import_extents``,
  ``read_bitmap``, ``write_bitmap``, ``check``; :func:`create` makes a new image and
  :func:`check` checks or repairs one by path.
* :class:`HBitmap` -- QEMU's hierarchical bitmap with its serialization format.
* :class:`Error` -- every failure of the library, an :class:`OSError` with ``errno``.
  Arguments that break a precondition raise :class:`ValueError` (wrong types
  :class:`TypeError`, negative or too large integers :class:`OverflowError`).
"""

from ._errors import (
    Error,
    ExistsError,
    InvalidArgumentError,
    IsADirectoryImageError,
    LockedError,
    NotFoundError,
    PermissionDeniedError,
)
from ._hbitmap import (
    MAX_GROUPS,
    MAX_SERIALIZABLE_GRANULARITY,
    BitmapInfo,
    ExtentIterator,
    HBitmap,
    Image,
    check,
    create,
)

__all__ = [
    "MAX_GROUPS",
    "MAX_SERIALIZABLE_GRANULARITY",
    "BitmapInfo",
    "CheckReport",
    "Error",
    "ExistsError",
    "ExtentIterator",
    "HBitmap",
    "Image",
    "InvalidArgumentError",
    "IsADirectoryImageError",
    "LockedError",
    "Name",
    "NotFoundError",
    "PermissionDeniedError",
    "StrPath",
    "check",
    "create",
]

import os as _os
from typing import Any as _Any, Dict as _Dict, Union as _Union

#: A bitmap name: its exact bytes, or a str standing for its UTF-8 encoding.
Name = _Union[str, bytes, bytearray]
#: A file system path.
StrPath = _Union[str, bytes, "_os.PathLike[str]", "_os.PathLike[bytes]"]
#: What a check or repair returns (qemu-img check --output=json's names, then the findings).
CheckReport = _Dict[str, _Any]

__version__ = "1.0.0"
