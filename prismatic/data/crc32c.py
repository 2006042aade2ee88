"""CRC-32C (Castagnoli) for TFRecord framing, vectorised with numpy (no compiled crc32c package is available).

The register update of a table-driven reflected CRC is linear over GF(2), so a long buffer is split into many equal
lanes whose raw CRCs (zero initial register) are computed in parallel, then merged pairwise with "shift by L zero
bytes" operators. The initial 0xFFFFFFFF register is folded in afterwards with the same operator.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_POLY = 0x82F63B78
_MASK32 = 0xFFFFFFFF
_SCALAR_LIMIT = 512  # below this many bytes a Python loop is faster than numpy overheads
_LANE_BYTES = 256
_BLOCK_BYTES = 1 << 20


def _make_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table[i] = c
    return table


_TABLE = _make_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _make_table16() -> np.ndarray:
    """Register update for 16 bits at once: two byte steps applied to every 16-bit value."""
    t = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(2):
        t = _TABLE[t & 0xFF] ^ (t >> 8)
    return t


_TABLE16 = _make_table16()


def _raw_scalar(data: bytes | memoryview, crc: int) -> int:
    table = _TABLE_LIST
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def _apply_cols(cols: list[int], x: int) -> int:
    out, j = 0, 0
    while x:
        if x & 1:
            out ^= cols[j]
        x >>= 1
        j += 1
    return out


@lru_cache(maxsize=64)
def _zero_shift_cols(num_bytes: int) -> tuple[int, ...]:
    """Columns of the GF(2) matrix mapping a register to its value after `num_bytes` zero bytes."""
    if num_bytes == 0:
        return tuple(1 << j for j in range(32))
    if num_bytes == 1:
        return tuple(_raw_scalar(b"\x00", 1 << j) for j in range(32))
    half = _zero_shift_cols(num_bytes // 2)
    cols = [_apply_cols(list(half), c) for c in half]  # square: shift by 2*(num_bytes//2)
    if num_bytes % 2:
        one = list(_zero_shift_cols(1))
        cols = [_apply_cols(one, c) for c in cols]
    return tuple(cols)


@lru_cache(maxsize=64)
def _zero_shift_tables(num_bytes: int) -> np.ndarray:
    """(4, 256) byte tables of the shift operator, for vectorised application."""
    cols = np.asarray(_zero_shift_cols(num_bytes), dtype=np.uint32)
    values = np.arange(256, dtype=np.uint32)
    tables = np.zeros((4, 256), dtype=np.uint32)
    for b in range(4):
        for bit in range(8):
            tables[b] ^= np.where((values >> bit) & 1, cols[8 * b + bit], np.uint32(0)).astype(np.uint32)
    return tables


def _shift(x: np.ndarray, num_bytes: int) -> np.ndarray:
    t = _zero_shift_tables(num_bytes)
    return t[0][x & 0xFF] ^ t[1][(x >> 8) & 0xFF] ^ t[2][(x >> 16) & 0xFF] ^ t[3][x >> 24]


def _raw_vectorised(data: bytes | memoryview) -> int:
    """Raw CRC register (zero initial value, no final xor) of `data`."""
    n = len(data)
    lanes = -(-n // _LANE_BYTES)
    lanes_pow2 = 1 << max(0, (lanes - 1).bit_length())
    padded = np.zeros(lanes_pow2 * _LANE_BYTES, dtype=np.uint8)
    padded[padded.size - n:] = np.frombuffer(data, dtype=np.uint8)  # zero front padding leaves a zero register at 0
    # (lane_bytes / 2, lanes): row i = little-endian 16-bit word i of every lane
    words = padded.view("<u2").reshape(lanes_pow2, _LANE_BYTES // 2).T.astype(np.uint32)
    crc = np.zeros(lanes_pow2, dtype=np.uint32)
    for row in words:
        crc = _TABLE16[(crc ^ row) & 0xFFFF] ^ (crc >> 16)
    length = _LANE_BYTES
    while crc.size > 1:
        crc = _shift(crc[0::2], length) ^ crc[1::2]
        length *= 2
    return int(crc[0])


def crc32c(data: bytes | memoryview) -> int:
    """Standard CRC-32C of `data` (crc32c(b"123456789") == 0xE3069283)."""
    if len(data) < _SCALAR_LIMIT:
        return _raw_scalar(data, _MASK32) ^ _MASK32
    view = memoryview(data).cast("B")
    register = _MASK32
    for start in range(0, len(view), _BLOCK_BYTES):  # blocks keep the working arrays cache-sized
        block = view[start:start + _BLOCK_BYTES]
        register = _apply_cols(list(_zero_shift_cols(len(block))), register) ^ _raw_vectorised(block)
    return register ^ _MASK32


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & _MASK32
