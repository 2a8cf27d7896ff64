# SPDX-License-Identifier: GPL-2.0-or-later
"""Type stubs of the hbitmap package (the extension module hbitmap._hbitmap and the exceptions)."""

import os
import pathlib
from types import TracebackType
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Type, Union

from typing_extensions import Literal, Self, final

from ._errors import (
    Error as Error,
    ExistsError as ExistsError,
    InvalidArgumentError as InvalidArgumentError,
    IsADirectoryImageError as IsADirectoryImageError,
    LockedError as LockedError,
    NotFoundError as NotFoundError,
    PermissionDeniedError as PermissionDeniedError,
)

__version__: str
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

#: Largest number of groups (bits) of an HBitmap: 2**41.
MAX_GROUPS: int
#: Granularities from this one (58) up cannot be serialized.
MAX_SERIALIZABLE_GRANULARITY: int

#: A bitmap name: its exact bytes, or a str standing for its UTF-8 encoding.
Name = Union[str, bytes, bytearray]
#: A file system path.
StrPath = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
#: What a check or repair returns (qemu-img check --output=json's names, then the findings).
CheckReport = Dict[str, Any]

@final
@final
class ExtentIterator(Iterator[Tuple[int, int]]):
    """Dirty extents as (start, length) tuples, produced in batches with the GIL released."""

    def __iter__(self) -> ExtentIterator: ...
    def __next__(self) -> Tuple[int, int]: ...

@final
class HBitmap:
    """QEMU's hierarchical dirty bitmap: size items, one bit per 2**granularity items."""

    def __new__(cls, size: int, granularity: int = 0) -> HBitmap: ...
    @property
    def size(self) -> int:
        """The size in items."""
    @property
    def granularity(self) -> int:
        """log2 of the number of items per bit."""
    @property
    def groups(self) -> int:
        """Bits (groups of 2**granularity items) in the bitmap."""
    @property
    def serialization_align(self) -> int:
        """Items per serialized word (64 << granularity); ValueError from granularity 58."""
    def set(self, start: int, count: int) -> None:
        """Marks every group touched by start .. start + count dirty (ValueError past the end)."""
    def reset(self, start: int, count: int) -> None:
        """Marks every group touched by start .. start + count clean (ValueError past the end)."""
    def clear(self) -> None:
        """Marks the whole bitmap clean."""
    def get(self, item: int) -> bool:
        """Whether the group holding item is dirty (ValueError past the end)."""
    def count(self) -> int:
        """Dirty items: dirty groups times the group size (QEMU's hbitmap_count)."""
    def is_empty(self) -> bool:
        """Whether no bit is set."""
    def __len__(self) -> int:
        """The number of dirty extents: what iterating yields (the size in items is size)."""
    def __bool__(self) -> bool:
        """Whether a bit is set."""
    def __iter__(self) -> ExtentIterator:
        """The dirty extents, (start, length) in items."""
    def extents(self) -> ExtentIterator:
        """The dirty extents, (start, length) in items, maximal runs clipped to the size."""
    def serialization_size(self, start: int = 0, count: Optional[int] = None) -> int:
        """Bytes the chunk start .. start + count serializes to."""
    def serialize(self, start: int = 0, count: Optional[int] = None) -> bytes:
        """The chunk in QEMU's format (little-endian 64-bit words of the last level)."""
    def serialize_into(
        self, buffer: Any, start: int = 0, count: Optional[int] = None
    ) -> int:
        """Serializes the chunk into the start of a writable buffer; returns the bytes written."""
    def deserialize(
        self,
        data: Union[bytes, bytearray, memoryview],
        start: int = 0,
        count: Optional[int] = None,
        finish: bool = True,
    ) -> None:
        """Loads the chunk from exactly serialization_size(start, count) bytes."""
    def deserialize_finish(self) -> None:
        """Rebuilds the summary after deserialize(..., finish=False)."""
    def merge(self, other: HBitmap) -> None:
        """self |= other (equal sizes in items, any granularities)."""
    def copy(self) -> HBitmap:
        """An independent copy."""
    def __copy__(self) -> HBitmap: ...
    def __deepcopy__(self, memo: Any, /) -> HBitmap: ...
    def sha256(self) -> str:
        """SHA-256 of the last level, lowercase hexadecimal (QEMU's hbitmap_sha256)."""
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]

@final
class BitmapInfo:
    """One persistent bitmap of an image, as listed by Image.bitmaps()."""

    @property
    def name(self) -> Union[str, bytes]:
        """The name: str when UTF-8, else bytes."""
    @property
    def granularity(self) -> int:
        """Bytes of the virtual disk per bit."""
    @property
    def in_use(self) -> bool:
        """Flag in_use: not saved properly, content untrusted."""
    @property
    def auto(self) -> bool:
        """Flag auto: enabled (QEMU records guest writes in it)."""
    @property
    def dirty_bytes(self) -> Optional[int]:
        """Dirty bytes of the virtual disk; None for a bitmap in use."""

@final
class Image:
    """An open qcow2 image and its persistent dirty bitmaps (a context manager)."""

    def __new__(
        cls, path: StrPath, writable: bool = False, force_share: bool = False
    ) -> Image: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]] = None,
        exc: Optional[BaseException] = None,
        tb: Optional[TracebackType] = None,
    ) -> Literal[False]: ...
    def close(self) -> None:
        """Flushes and closes the image, releasing its locks (idempotent)."""
    @property
    def closed(self) -> bool: ...
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def writable(self) -> bool: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def default_granularity(self) -> int: ...
    @property
    def warnings(self) -> List[str]: ...
    def bitmaps(self) -> List[BitmapInfo]:
        """The bitmaps in directory order."""
    def __contains__(self, name: Name, /) -> bool: ...
    def extents(self, name: Name, force: bool = False) -> ExtentIterator:
        """Dirty extents of a bitmap as (offset, length) in bytes, streamed."""
    def read_bitmap(self, name: Name, force: bool = False) -> HBitmap:
        """A bitmap as an HBitmap over the virtual disk's bytes."""
    def write_bitmap(
        self, name: Name, bitmap: HBitmap, enabled: Optional[bool] = None
    ) -> None:
        """Stores an HBitmap as a persistent bitmap (creating or replacing it)."""
    def add(
        self,
        name: Name,
        granularity: Optional[int] = None,
        disabled: bool = False,
        exist_ok: bool = False,
    ) -> None:
        """Adds an empty bitmap."""
    def remove(self, name: Name, missing_ok: bool = False) -> None:
        """Removes a bitmap (also one in use)."""
    def clear(self, name: Name) -> None:
        """Makes a bitmap empty."""
    def enable(self, name: Name) -> None:
        """Sets the auto flag."""
    def disable(self, name: Name) -> None:
        """Drops the auto flag."""
    def merge(
        self,
        source: Name,
        target: Name,
        source_image: Optional[Union[Image, StrPath]] = None,
    ) -> None:
        """target |= source (source of this image or of source_image)."""
    def set(self, name: Name, offset: int, length: int) -> None:
        """Marks a byte range dirty."""
    def reset(self, name: Name, offset: int, length: int) -> None:
        """Marks a byte range (whole granules) clean."""
    def import_extents(
        self,
        name: Name,
        extents: Iterable[Tuple[int, int]],
        granularity: Optional[int] = None,
    ) -> None:
        """Creates or replaces a bitmap from (offset, length) extents."""
    def check(self, repair: Optional[Literal["leaks", "all"]] = None) -> CheckReport:
        """qemu-img check's figures and the findings; repair as qemu-img check -r."""

def create(path: StrPath, size: int, cluster_size: int = 65536) -> Image:
    """Creates an empty qcow2 v3 image and returns it open for writing."""

def check(
    path: StrPath,
    repair: Optional[Literal["leaks", "all"]] = None,
    force_share: bool = False,
) -> CheckReport:
    """Checks (or repairs) an image by path; a malformed image gives a report, not an error."""
