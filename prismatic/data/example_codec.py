"""`tf.train.Example` without TensorFlow: a runtime protobuf descriptor (for writing and as a reference parser) and a
fast wire-format scanner used by the native reader.

The scanner walks Example -> Features -> map<string, Feature> -> {Bytes,Float,Int64}List directly on the bytes and
returns, per key, either numeric arrays or the (offset, length) of every bytes value. Recording offsets lets the
reader fetch one JPEG later with a single `pread` instead of re-parsing a whole episode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_LEN, _VARINT, _FIXED32, _FIXED64 = 2, 0, 5, 1


@lru_cache(maxsize=1)
def example_message_class():
    """The `Example` message class, built in a private descriptor pool (no clash with TensorFlow's own)."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="prismatic_example.proto", package="prismatic_tf", syntax="proto3")

    def add_list(name: str, field_type: int) -> None:
        msg = fdp.message_type.add(name=name)
        msg.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=field_type)

    add_list("BytesList", F.TYPE_BYTES)
    add_list("FloatList", F.TYPE_FLOAT)
    add_list("Int64List", F.TYPE_INT64)
    feature = fdp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (fname, tname) in enumerate(
            [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")], start=1):
        feature.field.add(name=fname, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                          type_name=f".prismatic_tf.{tname}", oneof_index=0)
    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".prismatic_tf.Feature")
    features.field.add(name="feature", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE,
                       type_name=".prismatic_tf.Features.FeatureEntry")
    example = fdp.message_type.add(name="Example")
    example.field.add(name="features", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                      type_name=".prismatic_tf.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("prismatic_tf.Example"))


FeatureValue = Sequence[bytes] | np.ndarray


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """Serialise {key: list of bytes | float array | int array} as a tf.train.Example (deterministic key order)."""
    example = example_message_class()()
    for key, value in features.items():
        feature = example.features.feature[key]
        if isinstance(value, np.ndarray):
            if np.issubdtype(value.dtype, np.floating):
                feature.float_list.value.extend(value.astype(np.float32).ravel().tolist())
            elif np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
                feature.int64_list.value.extend(value.astype(np.int64).ravel().tolist())
            else:
                raise TypeError(f"feature '{key}': unsupported array dtype {value.dtype}")
        else:
            items = list(value)
            if not all(isinstance(v, bytes) for v in items):
                raise TypeError(f"feature '{key}': expected a numpy array or a list of bytes")
            feature.bytes_list.value.extend(items)
    return example.SerializeToString(deterministic=True)


def parse_example_reference(payload: bytes) -> dict[str, FeatureValue]:
    """Full protobuf parse (slow, independent of the scanner): {key: list[bytes] | float32 array | int64 array}."""
    example = example_message_class()()
    example.ParseFromString(bytes(payload))
    out: dict[str, FeatureValue] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feature.bytes_list.value)
        elif kind == "float_list":
            out[key] = np.asarray(feature.float_list.value, dtype=np.float32)
        elif kind == "int64_list":
            out[key] = np.asarray(feature.int64_list.value, dtype=np.int64)
        else:
            out[key] = []
    return out


@dataclass
class BytesRefs:
    """Positions of the values of a BytesList inside the scanned payload."""

    offsets: np.ndarray  # int64, relative to the start of the payload
    lengths: np.ndarray  # int64


class ExampleFormatError(ValueError):
    """Bytes that are not a valid tf.train.Example."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ExampleFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ExampleFormatError("varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int):
    """Yield (field_number, wire_type, value_start, value_end_or_int) for fields in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ExampleFormatError(f"field {number} of length {length} overruns its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value, value
        elif wire == _FIXED32:
            yield number, wire, pos, pos + 4
            pos += 4
        elif wire == _FIXED64:
            yield number, wire, pos, pos + 8
            pos += 8
        else:
            raise ExampleFormatError(f"unsupported wire type {wire} for field {number}")


def _packed_varints(buf: memoryview, start: int, end: int) -> list[int]:
    values, pos = [], start
    while pos < end:
        v, pos = _varint(buf, pos)
        values.append(v - (1 << 64) if v >= 1 << 63 else v)
    return values


def _scan_list(buf: memoryview, kind: int, start: int, end: int) -> FeatureValue | BytesRefs:
    if kind == 1:  # BytesList
        offsets, lengths = [], []
        for number, wire, a, b in _fields(buf, start, end):
            if number == 1 and wire == _LEN:
                offsets.append(a)
                lengths.append(b - a)
        return BytesRefs(np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64))
    if kind == 2:  # FloatList: packed (normal) or one fixed32 per value
        parts = []
        for number, wire, a, b in _fields(buf, start, end):
            if number == 1 and wire in (_LEN, _FIXED32):
                parts.append(np.frombuffer(buf[a:b], dtype="<f4"))
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if kind == 3:  # Int64List: packed varints or one varint per value
        values: list[int] = []
        for number, wire, a, b in _fields(buf, start, end):
            if number == 1 and wire == _LEN:
                values.extend(_packed_varints(buf, a, b))
            elif number == 1 and wire == _VARINT:
                values.append(a - (1 << 64) if a >= 1 << 63 else a)
        return np.asarray(values, dtype=np.int64)
    raise ExampleFormatError(f"unknown Feature kind {kind}")


def scan_example(payload: memoryview | bytes) -> dict[str, np.ndarray | BytesRefs]:
    """Scan a serialised Example: floats/ints as arrays, bytes values as `BytesRefs` into `payload`."""
    buf = memoryview(payload)
    out: dict[str, np.ndarray | BytesRefs] = {}
    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if number != 1 or wire != _LEN:
            continue
        for fnum, fwire, ea, eb in _fields(buf, a, b):  # Features.feature map entries
            if fnum != 1 or fwire != _LEN:
                continue
            key, value = None, None
            for knum, kwire, ka, kb in _fields(buf, ea, eb):
                if knum == 1 and kwire == _LEN:
                    key = bytes(buf[ka:kb]).decode("utf-8")
                elif knum == 2 and kwire == _LEN:
                    value = (ka, kb)
            if key is None:
                raise ExampleFormatError("feature map entry without a key")
            result: np.ndarray | BytesRefs = np.zeros(0, np.float32)
            if value is not None:
                for kind, lwire, la, lb in _fields(buf, value[0], value[1]):
                    if lwire == _LEN:
                        result = _scan_list(buf, kind, la, lb)
            out[key] = result
    return out


def bytes_values(payload: memoryview | bytes, refs: BytesRefs) -> list[bytes]:
    """Materialise the bytes values a `BytesRefs` points at."""
    buf = memoryview(payload)
    return [bytes(buf[o:o + n]) for o, n in zip(refs.offsets.tolist(), refs.lengths.tolist(), strict=True)]
