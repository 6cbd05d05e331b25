"""The protobuf messages of Tinker's wire, described here without the ``tinker`` package.

The tinker SDK (0.38) sends ``/api/v1/forward_backward`` as a ``ForwardBackwardRequest`` protobuf
(zstd-compressed when the served client config asks) and reads forward/backward and sample results
as protobuf when it sends ``Accept: application/x-protobuf``. The messages below carry the SDK's
package name, message names and field numbers (from its ``tinker_public.proto``); only the fields
this server reads or writes are declared; a reader skips the others as unknown fields, as protobuf
does. The descriptor is built at import into a private pool, so it never clashes with an installed
``tinker``.

Field spec: ``(name, number, type)`` or ``(name, number, type, oneof)``; ``type`` is a scalar
(``bytes``, ``string``, ``int32``, ``int64``, ``uint32``, ``double``, ``bool``), a message or enum
declared here, ``repeated <type>``, or ``map<string, <type>>``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tinker_public"

ENUMS: dict[str, list[tuple[str, int]]] = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [("DTYPE_UNSPECIFIED", 0), ("DTYPE_FLOAT32", 1), ("DTYPE_INT64", 2), ("DTYPE_INT32", 3),
              ("DTYPE_BFLOAT16", 4)],
}

MESSAGES: dict[str, list[tuple[Any, ...]]] = {
    # ---- requests (decoded) ----
    "ForwardBackwardRequest": [
        ("model_id", 1, "string"), ("seq_id", 2, "int32"), ("data", 3, "repeated Datum"),
        ("loss_fn", 4, "string"), ("loss_fn_config", 5, "map<string, double>"), ("forward_only", 6, "bool"),
        ("loss_fn_config_v2", 7, "map<string, LossConfigValue>")],
    "LossConfigValue": [("number", 1, "double", "value"), ("text", 2, "string", "value")],
    "Datum": [
        ("model_input", 1, "repeated Chunk"), ("loss_fn_inputs", 2, "map<string, Tensor>"),
        ("model_input_spans", 3, "repeated ProvenanceSpan"), ("loss_fn_input_spans", 4, "repeated ProvenanceSpan")],
    "ProvenanceSpan": [("prompt_tokens", 1, "PromptProvenanceSpan", "span"),
                       ("sampled_tokens", 2, "SampledProvenanceSpan", "span")],
    "PromptProvenanceSpan": [("sequence_id", 1, "string"), ("offset", 2, "int64"), ("length", 3, "int64")],
    "SampledProvenanceSpan": [("sequence_id", 1, "string"), ("offset", 2, "int64"), ("length", 3, "int64")],
    "Chunk": [("encoded_text", 1, "EncodedTextChunk", "chunk"), ("image", 2, "ImageChunk", "chunk"),
              ("dmel", 3, "DmelChunk", "chunk")],
    "EncodedTextChunk": [("tokens", 1, "bytes")],  # int32 little-endian
    "ImageChunk": [("data", 1, "bytes"), ("format", 2, "string"), ("expected_tokens", 3, "int32")],
    "DmelChunk": [("dmel", 1, "bytes")],
    "Tensor": [("dense", 1, "bytes", "encoding"), ("sparse_csr", 2, "SparseCsr", "encoding"),
               ("dtype", 3, "DType"), ("shape", 4, "repeated int64")],
    "SparseCsr": [("values", 1, "bytes"), ("crow_indices", 2, "bytes"), ("col_indices", 3, "bytes")],
    # ---- responses (encoded) ----
    "ForwardBackwardOutput": [
        ("loss_fn_output_type", 1, "string"), ("loss_fn_outputs", 2, "repeated ArrayRecord"),
        ("metrics", 3, "map<string, double>")],
    "ArrayRecord": [("type_tag", 1, "string"), ("fields", 2, "map<string, BatchedTensor>"), ("num_datums", 3, "int64")],
    # data: every datum's values back to back; offsets: int64 byte offsets, one per datum plus the end
    "BatchedTensor": [("data", 1, "bytes"), ("offsets", 2, "bytes"), ("dtype", 3, "DType"),
                      ("trailing_shape", 4, "repeated int64")],
    "SampleResponse": [("sequences", 1, "repeated SampledSequence"), ("prompt_logprobs", 2, "bytes"),
                       ("topk_prompt_logprobs", 3, "TopkLogprobs"), ("prompt_cache_hit_tokens", 4, "int32")],
    # tokens: int32 bytes; logprobs: float32 bytes (empty = not requested)
    "SampledSequence": [("stop_reason", 1, "StopReason"), ("tokens", 2, "bytes"), ("logprobs", 3, "bytes")],
    # row-major [length, k]: int32 token ids and float32 logprobs
    "TopkLogprobs": [("token_ids", 1, "bytes"), ("logprobs", 2, "bytes"), ("k", 3, "uint32"), ("length", 4, "uint32")],
}

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"bytes": _F.TYPE_BYTES, "string": _F.TYPE_STRING, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64,
            "uint32": _F.TYPE_UINT32, "double": _F.TYPE_DOUBLE, "bool": _F.TYPE_BOOL}


def _set_type(field: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    elif type_name in ENUMS:
        field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{type_name}"
    else:
        assert type_name in MESSAGES, type_name
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{type_name}"


def _message(name: str, fields: list[tuple[Any, ...]]) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    oneofs: list[str] = []
    for spec in fields:
        fname, number, kind = spec[:3]
        field = msg.field.add(name=fname, number=number, label=_F.LABEL_OPTIONAL)
        if kind.startswith("map<"):
            key, value = (s.strip() for s in kind[4:-1].split(","))
            entry = msg.nested_type.add(name="".join(p.title() for p in fname.split("_")) + "Entry")
            entry.options.map_entry = True
            _set_type(entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL), key)
            _set_type(entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL), value)
            field.label, field.type = _F.LABEL_REPEATED, _F.TYPE_MESSAGE
            field.type_name = f".{PACKAGE}.{name}.{entry.name}"
            continue
        if kind.startswith("repeated "):
            field.label, kind = _F.LABEL_REPEATED, kind.split(" ", 1)[1]
        _set_type(field, kind)
        if len(spec) > 3:
            if spec[3] not in oneofs:
                oneofs.append(spec[3])
                msg.oneof_decl.add(name=spec[3])
            field.oneof_index = oneofs.index(spec[3])
    return msg


def _build() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(name="loops_tinker_public.proto", package=PACKAGE, syntax="proto3")
    for name, values in ENUMS.items():
        enum = file.enum_type.add(name=name)
        for vname, number in values:
            enum.value.add(name=vname, number=number)
    for name, fields in MESSAGES.items():
        file.message_type.append(_message(name, fields))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in MESSAGES}


CLASSES = _build()
ForwardBackwardRequest = CLASSES["ForwardBackwardRequest"]
ForwardBackwardOutput = CLASSES["ForwardBackwardOutput"]
SampleResponse = CLASSES["SampleResponse"]
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 1, 2, 3, 4
STOP_REASON = {"stop": 0, "length": 1}
