"""CRC-32C, TFRecord framing and the Example wire scanner against independent references."""

from __future__ import annotations

import os

import numpy as np
import pytest

from prismatic.data.crc32c import crc32c, masked_crc32c
from prismatic.data.example_codec import BytesRefs, bytes_values, encode_example, parse_example_reference, scan_example
from prismatic.data.tfrecord import CorruptTFRecordError, iter_records, write_records


def _crc32c_bitwise(data: bytes) -> int:
    """Bit-by-bit CRC-32C (Castagnoli, reflected 0x82F63B78): the textbook definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("size", [0, 1, 9, 511, 512, 513, 4097, 20000])
def test_crc32c_matches_bitwise_definition(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert crc32c(data) == _crc32c_bitwise(data)


def test_crc32c_multi_block_matches_table_loop():
    from prismatic.data.crc32c import _raw_scalar  # the plain byte-at-a-time table loop

    data = np.random.default_rng(7).integers(0, 256, (1 << 20) + 12345, dtype=np.uint8).tobytes()
    assert crc32c(data) == _raw_scalar(data, 0xFFFFFFFF) ^ 0xFFFFFFFF


def test_crc32c_check_value_and_mask():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    crc = _crc32c_bitwise(b"abc")
    assert masked_crc32c(b"abc") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_records_roundtrip_and_offsets(tmp_path):
    payloads = [os.urandom(n) for n in (0, 5, 3000)]
    path = tmp_path / "x.tfrecord"
    size = write_records(path, payloads)
    assert size == path.stat().st_size == sum(len(p) + 16 for p in payloads)
    raw = path.read_bytes()
    got = list(iter_records(path))
    assert [bytes(p) for _, p in got] == payloads
    for offset, payload in got:
        assert raw[offset:offset + len(payload)] == bytes(payload)


def test_corrupt_payload_names_file(tmp_path):
    path = tmp_path / "bad.tfrecord"
    write_records(path, [b"a" * 100, b"b" * 100])
    raw = bytearray(path.read_bytes())
    raw[116 + 12 + 50] ^= 0xFF  # inside the second payload
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptTFRecordError, match=r"bad\.tfrecord.*data CRC mismatch"):
        list(iter_records(path))
    path.write_bytes(bytes(raw[:150]))
    with pytest.raises(CorruptTFRecordError, match="bad.tfrecord"):
        list(iter_records(path, verify_crc=False))


def test_scanner_equals_protobuf_parse():
    rng = np.random.default_rng(0)
    features = {"steps/action": rng.normal(size=21).astype(np.float32),
                "steps/is_first": np.array([1, 0, 0, -5, 2 ** 40]),
                "steps/language_instruction": [b"pick", b"", "ünïcode".encode()],
                "steps/observation/image": [os.urandom(300), os.urandom(7)]}
    payload = encode_example(features)
    reference = parse_example_reference(payload)
    scanned = scan_example(payload)
    assert set(scanned) == set(reference) == set(features)
    for key, value in scanned.items():
        if isinstance(value, BytesRefs):
            assert bytes_values(payload, value) == reference[key] == features[key]
        else:
            np.testing.assert_array_equal(value, reference[key])
            np.testing.assert_array_equal(value, np.asarray(features[key]).astype(value.dtype))


@pytest.mark.tf
def test_tensorflow_reads_our_framing(tmp_path):
    tf = pytest.importorskip("tensorflow", reason="tensorflow not importable (rlds-tf extra not installed)")
    payloads = [os.urandom(n) for n in (1, 700, 5000, (1 << 20) + 3)]
    write_records(tmp_path / "t.tfrecord", payloads)
    got = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "t.tfrecord"))]
    assert got == payloads
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for p in payloads:
            writer.write(p)
    assert (tmp_path / "tf.tfrecord").read_bytes() == (tmp_path / "t.tfrecord").read_bytes()
