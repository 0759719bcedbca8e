"""Reader for the IDX format (LeCun et al.), the file format of MNIST and Fashion-MNIST.

Layout of an IDX file (all multi-byte numbers big-endian):

    byte 0-1   0x00 0x00                       magic
    byte 2     dtype code                      0x08 uint8, 0x09 int8, 0x0B int16,
                                               0x0C int32, 0x0D float32, 0x0E float64
    byte 3     ndim                            number of dimensions (>= 1)
    4·ndim     dims                            one uint32 per dimension
    payload    prod(dims) · itemsize bytes     the values, C order

Files ending in ``.gz`` (or starting with the gzip magic ``1f 8b``) are decompressed first.
Every problem raises :class:`~kdistill.errors.DataError` with the file path in the message.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from kdistill.errors import DataError

__all__ = ["IDX_DTYPES", "read_idx"]

#: dtype code byte → big-endian numpy dtype of the payload.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip file; OS and gzip errors become DataError."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an IDX file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err})") from err
    if path.suffix != ".gz" and not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip data ({err})") from err


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``) into a writable numpy array in native byte order.

    The array has shape ``dims`` and the dtype named by the header's dtype code.
    Raises DataError when the file is missing, the magic bytes are not zero, the dtype code is
    unknown, ndim is 0, the header is truncated, the payload is shorter or longer than
    ``prod(dims) · itemsize`` bytes, or the gzip stream is corrupt.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated header: expected at least 4 bytes (magic, dtype, ndim), "
            f"found {len(data)}"
        )
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"{path}: not an IDX file: the first two bytes must be 0x00 0x00, "
            f"found 0x{zero0:02x} 0x{zero1:02x}"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim < 1:
        raise DataError(f"{path}: IDX header has ndim 0, expected at least 1 dimension")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(
            f"{path}: truncated header: {ndim} dimensions need {header_size} header bytes, "
            f"found {len(data)}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - header_size
    if found < expected:
        raise DataError(
            f"{path}: truncated: expected {expected} data bytes after the header "
            f"(dims {dims}, {dtype.itemsize}-byte values), found {found}"
        )
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} trailing bytes after the data: expected {expected} "
            f"data bytes after the header (dims {dims}), found {found}"
        )
    values = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header_size)
    return values.astype(dtype.newbyteorder("="), copy=True).reshape(dims)
