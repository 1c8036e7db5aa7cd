"""
Read the weights out of a TensorFlow GraphDef (`classify_image_graph_def.pb`) without
TensorFlow or protobuf: a minimal reader of the protobuf wire format that knows only the
fields it needs.

Wire format: each field is a varint key (field_number << 3 | wire_type) followed by a
varint (type 0), 8 bytes (type 1), a varint length and that many bytes (type 2) or
4 bytes (type 5). Field numbers used (tensorflow/core/framework/*.proto):
  GraphDef.node = 1; NodeDef.name = 1, .op = 2, .attr = 5 (map entries: key = 1, value = 2);
  AttrValue.f = 4 (float), .b = 5 (bool), .tensor = 8; TensorProto.dtype = 1,
  .tensor_shape = 2, .tensor_content = 4, .float_val = 5; TensorShapeProto.dim = 2;
  Dim.size = 1; DataType DT_FLOAT = 1.
"""

import struct

import numpy as np

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_DT_FLOAT = 1


def _read_varint(data, pos):
    """Decode the varint at data[pos:]; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("GraphDef: truncated varint; the file is not a complete GraphDef")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def iter_fields(data):
    """
    Iterate over the fields of one serialized protobuf message.

    :param data: the message's bytes (a memoryview, to avoid copies).
    :return: an iterator of (field_number, wire_type, value): an int for varints, a
             memoryview for length-delimited fields and fixed-size fields.
    """
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type in (_FIXED64, _FIXED32, _BYTES):
            if wire_type == _BYTES:
                size, pos = _read_varint(data, pos)
            else:
                size = 8 if wire_type == _FIXED64 else 4
            if pos + size > len(data):
                raise ValueError("GraphDef: field runs past the end of its message")
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"GraphDef: unsupported protobuf wire type {wire_type}")
        yield field, wire_type, value


def _parse_float_tensor(tensor):
    """Decode a DT_FLOAT TensorProto into a numpy array, or None for other dtypes."""
    dtype, shape, content, floats = None, [], None, []
    for field, wire_type, value in iter_fields(tensor):
        if field == 1:
            dtype = value
        elif field == 2:
            for dim_field, _, dim in iter_fields(value):
                if dim_field == 2:
                    shape.append(next((v for f, _, v in iter_fields(dim) if f == 1), 0))
        elif field == 4:
            content = value
        elif field == 5:  # packed (wire type 2) or one value per field (wire type 5)
            floats.append(np.frombuffer(value, dtype="<f4"))
    if dtype != _DT_FLOAT:
        return None
    size = int(np.prod(shape))
    if content is not None:
        array = np.frombuffer(content, dtype="<f4")
    else:
        array = np.concatenate(floats) if floats else np.zeros(0, np.float32)
        if 0 < len(array) < size:  # TensorFlow repeats the last value to fill the shape
            array = np.concatenate([array, np.full(size - len(array), array[-1], np.float32)])
    if len(array) != size:
        raise ValueError(f"GraphDef: tensor of shape {shape} holds {len(array)} values")
    return array.astype(np.float32).reshape(shape)


def _parse_attr_value(value):
    """Decode the scalar parts of an AttrValue: {'f': float, 'b': bool, 'tensor': bytes}."""
    parsed = {}
    for field, _, item in iter_fields(value):
        if field == 4:
            parsed["f"] = struct.unpack("<f", item)[0]
        elif field == 5:
            parsed["b"] = bool(item)
        elif field == 8:
            parsed["tensor"] = item
    return parsed


def _parse_node(node):
    """Decode a NodeDef into (name, op, {attr name: parsed AttrValue})."""
    name, op, attrs = "", "", {}
    for field, _, value in iter_fields(node):
        if field == 1:
            name = bytes(value).decode("utf-8")
        elif field == 2:
            op = bytes(value).decode("utf-8")
        elif field == 5:
            entry = dict((f, v) for f, _, v in iter_fields(value))
            attrs[bytes(entry.get(1, b"")).decode("utf-8")] = entry.get(2, memoryview(b""))
    return name, op, attrs


def read_graphdef(data):
    """
    Read the float constants and the batch-norm settings of a serialized GraphDef.

    :param data: the file's bytes.
    :return: (constants, batch_norms): {node name: float32 array} for every DT_FLOAT
             `Const` node, and {node name: {'variance_epsilon': float,
             'scale_after_normalization': bool}} for every `BatchNormWithGlobalNormalization`.
    """
    constants, batch_norms = {}, {}
    for field, wire_type, node in iter_fields(memoryview(data)):
        if field != 1 or wire_type != _BYTES:
            continue
        name, op, attrs = _parse_node(node)
        if op == "Const" and "value" in attrs:
            tensor = _parse_attr_value(attrs["value"]).get("tensor")
            array = None if tensor is None else _parse_float_tensor(tensor)
            if array is not None:
                constants[name] = array
        elif op == "BatchNormWithGlobalNormalization":
            epsilon = _parse_attr_value(attrs.get("variance_epsilon", memoryview(b"")))
            scale = _parse_attr_value(attrs.get("scale_after_normalization", memoryview(b"")))
            batch_norms[name] = {
                "variance_epsilon": epsilon.get("f", 0.0),
                "scale_after_normalization": scale.get("b", False),
            }
    return constants, batch_norms
