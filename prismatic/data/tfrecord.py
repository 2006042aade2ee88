"""TFRecord framing: uint64 length, masked crc32c(length), payload, masked crc32c(payload).

Reading checks both CRCs and names the file and byte offset of any damage; writing goes to a temporary file that
is renamed into place, so a failed write never leaves a half-written shard.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from prismatic.data.crc32c import masked_crc32c

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


class CorruptTFRecordError(ValueError):
    """A TFRecord shard whose framing or checksums are wrong."""


def iter_records(path: str | Path, verify_crc: bool = True) -> Iterator[tuple[int, memoryview]]:
    """Yield (payload_offset, payload) for every record of a TFRecord file (payload: a memoryview of the file)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return
    # One read per shard: views into an immutable bytes object stay valid whatever the caller keeps.
    view = memoryview(path.read_bytes())
    pos = 0
    while pos < size:
        if pos + _HEADER.size > size:
            raise CorruptTFRecordError(f"{path}: truncated record header at byte {pos} (file size {size})")
        length, length_crc = _HEADER.unpack_from(view, pos)
        if verify_crc and masked_crc32c(view[pos:pos + 8]) != length_crc:
            raise CorruptTFRecordError(f"{path}: length CRC mismatch at byte {pos} (corrupt shard)")
        start = pos + _HEADER.size
        end = start + length
        if end + _FOOTER.size > size:
            raise CorruptTFRecordError(
                f"{path}: record at byte {pos} claims {length} bytes but the file ends at {size} (truncated)")
        payload = view[start:end]
        if verify_crc:
            (data_crc,) = _FOOTER.unpack_from(view, end)
            if masked_crc32c(payload) != data_crc:
                raise CorruptTFRecordError(f"{path}: data CRC mismatch in record at byte {pos} (corrupt shard)")
        yield start, payload
        pos = end + _FOOTER.size


def encode_record(payload: bytes) -> bytes:
    """One framed TFRecord record."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def write_records(path: str | Path, payloads: Iterable[bytes]) -> int:
    """Write a TFRecord file atomically; returns the number of bytes written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    try:
        with open(tmp, "wb") as f:
            for payload in payloads:
                record = encode_record(payload)
                f.write(record)
                written += len(record)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written
