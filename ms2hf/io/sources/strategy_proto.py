"""The ``mindspore.straspb`` protobuf schema, built at import time from its field list.

MindSpore ships this schema compiled into its own package; we only need the protobuf runtime.
Declaring the messages as a ``FileDescriptorProto`` keeps the schema readable next to
``docs/legacy-format.md#protobuf-schema``, needs no ``protoc`` step, and gives both the decoder
(for users' files) and the encoder (for the checkpoint generator) from one definition.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_REPEATED, _OPTIONAL = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
_PACKAGE = "mindspore.straspb"

# message name -> [(field name, type, label, message type name or None)], numbered from 1.
_SCHEMA: dict[str, list[tuple[str, int, int, str | None]]] = {
    "ParallelStrategy": [("dim", _F.TYPE_UINT32, _REPEATED, None)],
    "ParallelStrategys": [
        ("stage", _F.TYPE_UINT32, _OPTIONAL, None),
        ("parallel_strategy", _F.TYPE_MESSAGE, _REPEATED, "ParallelStrategy"),
    ],
    "ParallelStrategyItem": [
        ("node_name", _F.TYPE_STRING, _OPTIONAL, None),
        ("parallel_strategys", _F.TYPE_MESSAGE, _OPTIONAL, "ParallelStrategys"),
    ],
    "DevMatrix": [("dim", _F.TYPE_UINT32, _REPEATED, None)],
    "TensorMap": [("dim", _F.TYPE_INT32, _REPEATED, None)],
    "ParamSplitShape": [("dim", _F.TYPE_INT64, _REPEATED, None)],
    "IndicesOffset": [("dim", _F.TYPE_INT64, _REPEATED, None)],
    "ParallelLayouts": [
        ("dev_matrix", _F.TYPE_MESSAGE, _REPEATED, "DevMatrix"),
        ("tensor_map", _F.TYPE_MESSAGE, _REPEATED, "TensorMap"),
        ("param_split_shape", _F.TYPE_MESSAGE, _REPEATED, "ParamSplitShape"),
        ("indices_offset", _F.TYPE_MESSAGE, _REPEATED, "IndicesOffset"),
        ("field", _F.TYPE_INT32, _OPTIONAL, None),
        ("opt_weight_shard_step", _F.TYPE_INT32, _OPTIONAL, None),
        ("opt_weight_shard_size", _F.TYPE_INT32, _OPTIONAL, None),
    ],
    "ParallelLayoutItem": [
        ("param_name", _F.TYPE_STRING, _OPTIONAL, None),
        ("parallel_layouts", _F.TYPE_MESSAGE, _OPTIONAL, "ParallelLayouts"),
    ],
    "ParallelStrategyMap": [
        ("current_stage", _F.TYPE_UINT32, _OPTIONAL, None),
        ("parallel_strategy_item", _F.TYPE_MESSAGE, _REPEATED, "ParallelStrategyItem"),
        ("parallel_layout_item", _F.TYPE_MESSAGE, _REPEATED, "ParallelLayoutItem"),
    ],
}


def _build() -> type[message.Message]:
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="ms2hf_straspb.proto", package=_PACKAGE, syntax="proto2"
    )
    for message_name, fields in _SCHEMA.items():
        msg = file_proto.message_type.add(name=message_name)
        for number, (name, kind, label, type_name) in enumerate(fields, start=1):
            field = msg.field.add(name=name, number=number, type=kind, label=label)
            if type_name is not None:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    cls: type[message.Message] = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{_PACKAGE}.ParallelStrategyMap")
    )
    return cls


ParallelStrategyMap = _build()
"""The message class of a ``.ckpt`` strategy file."""
