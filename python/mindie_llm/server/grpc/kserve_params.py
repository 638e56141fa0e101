# SPDX-License-Identifier: Apache-2.0
"""Request decoding for the KServe v2 service: BYTES tensors and sampling parameters.

Owns the wire conventions of Triton's LLM backends: the prompt is a one-element BYTES tensor
``text_input``; an optional BOOL tensor ``stream``; an optional BYTES tensor
``sampling_parameters`` holding a JSON object (vLLM backend style); one-element tensors named after
a sampling option (``max_tokens`` INT32, ``temperature`` FP32, ...: TensorRT-LLM backend style);
and request parameters (``parameters`` map; tritonclient sends str, bool and int values, so floats
may be given as strings). Every error is a ValueError naming the tensor or the parameter.

Must not import grpc, torch or the engine: plain messages in, plain values out.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KServeRequest", "decode_request", "serialize_bytes_tensor", "deserialize_bytes_tensor",
           "option_tensor_types", "INPUT_TEXT", "INPUT_STREAM", "INPUT_SAMPLING", "OUTPUT_TEXT"]

INPUT_TEXT = "text_input"
INPUT_STREAM = "stream"
INPUT_SAMPLING = "sampling_parameters"
OUTPUT_TEXT = "text_output"

_INT64_MAX = (1 << 63) - 1
_MAX_JSON_DEPTH = 8

# Sampling options accepted as request parameters or in the sampling_parameters JSON: name -> kind.
_SAMPLING_KINDS = {
    "max_tokens": "int", "min_tokens": "int", "top_k": "int", "seed": "int", "n": "int",
    "temperature": "float", "top_p": "float", "min_p": "float", "presence_penalty": "float",
    "frequency_penalty": "float", "repetition_penalty": "float",
    "ignore_eos": "bool", "include_stop_str_in_output": "bool", "skip_special_tokens": "bool",
    "stop": "str_list", "stop_token_ids": "int_list",
}
# Parameters that only make sense as request parameters.
_CONTROL_KINDS = {"stream": "bool", "priority": "int", "triton_enable_empty_final_response": "bool"}
_UNSUPPORTED = {
    "sequence_id": "sequence batching is not supported",
    "sequence_start": "sequence batching is not supported",
    "sequence_end": "sequence batching is not supported",
    "timeout": "per-request timeouts are not supported; use the gRPC deadline (client_timeout)",
}


def option_tensor_types() -> dict[str, str]:
    """The optional one-element sampling tensors and the datatype ModelMetadata advertises for each
    (any numeric datatype is accepted)."""
    kinds = {"int": "INT64", "float": "FP32", "bool": "BOOL", "str_list": "BYTES", "int_list": "BYTES"}
    return {name: kinds[kind] for name, kind in _SAMPLING_KINDS.items()}


@dataclass
class KServeRequest:
    """A decoded ModelInferRequest."""

    prompt: str
    sampling: dict[str, Any] = field(default_factory=dict)
    stream: bool | None = None       # None: not given
    priority: int = 0
    empty_final_response: bool = False


def deserialize_bytes_tensor(raw: bytes, name: str) -> list[bytes]:
    """Elements of a raw BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ValueError(f"{name}: malformed BYTES contents (truncated length prefix)")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ValueError(f"{name}: malformed BYTES contents (element longer than the data)")
        items.append(bytes(raw[pos:pos + n]))
        pos += n
    return items


def serialize_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _param_value(p: Any, name: str) -> Any:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        raise ValueError(f"{name}: the parameter has no value")
    return getattr(p, which)


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Checks one option's type; numbers may arrive as strings (tritonclient has no float params)."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{name}: must be a boolean; got {value!r:.64}")
    if kind == "int":
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"{name}: must be an integer; got {value!r:.64}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: must be an integer; got {value!r:.64}")
        if not -(1 << 63) <= value <= _INT64_MAX:
            raise ValueError(f"{name}: out of the int64 range")
        return value
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"{name}: must be a number; got {value!r:.64}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: must be a number; got {value!r:.64}")
        if isinstance(value, int) and abs(value) > 1e300:
            raise ValueError(f"{name}: out of range")
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{name}: must be a finite number")
        return value
    if kind == "str_list":
        if isinstance(value, str) and value.startswith("["):
            # A JSON list of strings (tritonclient has no list parameters); anything else that
            # starts with "[" is a literal stop string such as "[END]".
            try:
                parsed = _json(value, name)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and all(isinstance(s, str) for s in parsed):
                return parsed
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError(f"{name}: must be a string or a list of strings")
    if kind == "int_list":
        if isinstance(value, str):
            value = _json(value, name)
        if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            return value
        raise ValueError(f"{name}: must be a list of integers")
    raise AssertionError(kind)


def _depth(obj: Any, limit: int) -> int:
    depth, frontier = 0, [obj]
    while frontier:
        depth += 1
        if depth > limit:
            return depth
        nxt = []
        for o in frontier:
            if isinstance(o, dict):
                nxt.extend(o.values())
            elif isinstance(o, list):
                nxt.extend(o)
        frontier = nxt
    return depth


def _json(text: str, name: str) -> Any:
    # Reject deep nesting before parsing: json.loads recurses once per level.
    if max((text.count("["), text.count("{"))) > 4096:
        raise ValueError(f"{name}: JSON has too many brackets (nesting limit)")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{name}: not valid JSON") from None
    if _depth(obj, _MAX_JSON_DEPTH) > _MAX_JSON_DEPTH:
        raise ValueError(f"{name}: JSON is nested too deeply")
    return obj


def _one_element(inp: Any, raw: bytes | None, kind: str) -> Any:
    """The single element of an input tensor (batch size 1)."""
    name = inp.name
    shape = list(inp.shape)
    if any(d < 0 for d in shape) or math.prod(shape) != 1:
        raise ValueError(f"{name}: shape must hold exactly one element (batch size 1); got {shape}")
    if kind == "BYTES":
        if inp.datatype != "BYTES":
            raise ValueError(f"{name}: datatype must be BYTES; got {inp.datatype[:16]!r}")
        items = deserialize_bytes_tensor(raw, name) if raw is not None else list(inp.contents.bytes_contents)
        if len(items) != 1:
            raise ValueError(f"{name}: expected 1 element, got {len(items)}")
        return items[0]
    if kind == "BOOL":
        if inp.datatype != "BOOL":
            raise ValueError(f"{name}: datatype must be BOOL; got {inp.datatype[:16]!r}")
        if raw is not None:
            if len(raw) != 1 or raw[0] not in (0, 1):
                raise ValueError(f"{name}: expected 1 BOOL element")
            return bool(raw[0])
        if len(inp.contents.bool_contents) != 1:
            raise ValueError(f"{name}: expected 1 BOOL element")
        return bool(inp.contents.bool_contents[0])
    raise AssertionError(kind)


# Numeric datatypes of one-element option tensors: struct format, InferTensorContents field.
_SCALAR_TYPES = {"INT32": ("<i", "int_contents"), "INT64": ("<q", "int64_contents"),
                 "UINT32": ("<I", "uint_contents"), "UINT64": ("<Q", "uint64_contents"),
                 "FP32": ("<f", "fp32_contents"), "FP64": ("<d", "fp64_contents")}


def _scalar_tensor(inp: Any, raw: bytes | None) -> Any:
    """The value of a one-element option tensor (TensorRT-LLM style, e.g. ``max_tokens`` INT32)."""
    if inp.datatype == "BOOL":
        return _one_element(inp, raw, "BOOL")
    if inp.datatype == "BYTES":
        return _utf8(_one_element(inp, raw, "BYTES"), inp.name)
    if inp.datatype not in _SCALAR_TYPES:
        raise ValueError(f"{inp.name}: datatype must be one of BOOL, BYTES, {', '.join(_SCALAR_TYPES)}; "
                         f"got {inp.datatype[:16]!r}")
    shape = list(inp.shape)
    if any(d < 0 for d in shape) or math.prod(shape) != 1:
        raise ValueError(f"{inp.name}: shape must hold exactly one element; got {shape}")
    fmt, contents = _SCALAR_TYPES[inp.datatype]
    if raw is not None:
        if len(raw) != struct.calcsize(fmt):
            raise ValueError(f"{inp.name}: expected 1 {inp.datatype} element in raw contents")
        return struct.unpack(fmt, raw)[0]
    values = list(getattr(inp.contents, contents))
    if len(values) != 1:
        raise ValueError(f"{inp.name}: expected 1 {inp.datatype} element")
    return values[0]


def _utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not valid UTF-8") from None


def decode_request(request: Any) -> KServeRequest:
    """Decodes a ModelInferRequest into prompt, sampling options and stream flags (ValueError names
    the tensor or parameter)."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise ValueError(f"raw_input_contents: {len(raws)} entries for {len(request.inputs)} inputs")
    prompt: str | None = None
    out = KServeRequest(prompt="")
    json_sampling: dict[str, Any] = {}
    tensor_sampling: dict[str, Any] = {}
    seen: set[str] = set()
    for i, inp in enumerate(request.inputs):
        raw = raws[i] if raws else None
        if inp.name in seen:
            raise ValueError(f"{inp.name[:64]}: input given twice")
        seen.add(inp.name)
        if inp.name == INPUT_TEXT:
            prompt = _utf8(_one_element(inp, raw, "BYTES"), INPUT_TEXT)
        elif inp.name == INPUT_STREAM:
            out.stream = _one_element(inp, raw, "BOOL")
        elif inp.name == INPUT_SAMPLING:
            obj = _json(_utf8(_one_element(inp, raw, "BYTES"), INPUT_SAMPLING), INPUT_SAMPLING)
            if not isinstance(obj, dict):
                raise ValueError(f"{INPUT_SAMPLING}: must be a JSON object")
            for k, v in obj.items():
                if k not in _SAMPLING_KINDS:
                    raise ValueError(f"{INPUT_SAMPLING}.{k[:64]}: unknown sampling parameter")
                json_sampling[k] = _coerce(f"{INPUT_SAMPLING}.{k}", _SAMPLING_KINDS[k], v)
        elif inp.name in _SAMPLING_KINDS:
            tensor_sampling[inp.name] = _coerce(inp.name, _SAMPLING_KINDS[inp.name], _scalar_tensor(inp, raw))
        else:
            raise ValueError(f"inputs: unknown input tensor {inp.name[:64]!r}; expected {INPUT_TEXT}, "
                             f"{INPUT_STREAM}, {INPUT_SAMPLING} or a sampling option ({', '.join(_SAMPLING_KINDS)})")
    if prompt is None:
        raise ValueError(f"{INPUT_TEXT}: missing; the prompt is a BYTES tensor named {INPUT_TEXT}")
    if not prompt:
        raise ValueError(f"{INPUT_TEXT}: the prompt must not be empty")
    out.prompt = prompt
    for key, p in request.parameters.items():
        if key in _UNSUPPORTED:
            raise ValueError(f"{key}: {_UNSUPPORTED[key]}")
        value = _param_value(p, key)
        if key in _SAMPLING_KINDS:
            out.sampling[key] = _coerce(key, _SAMPLING_KINDS[key], value)
        elif key == "stream":
            stream = _coerce(key, "bool", value)
            if out.stream is not None and out.stream != stream:
                raise ValueError("stream: the parameter and the input tensor disagree")
            out.stream = stream
        elif key == "priority":
            out.priority = _coerce(key, "int", value)
            if not -(1 << 31) <= out.priority < (1 << 31):
                raise ValueError("priority: must fit in int32")
        elif key == "triton_enable_empty_final_response":
            out.empty_final_response = _coerce(key, "bool", value)
        else:
            raise ValueError(f"{key[:64]}: unknown parameter; known: "
                             f"{', '.join(sorted([*_SAMPLING_KINDS, *_CONTROL_KINDS]))}")
    # Precedence: request parameters, then option tensors, then the sampling_parameters JSON.
    for k, v in (*tensor_sampling.items(), *json_sampling.items()):
        out.sampling.setdefault(k, v)
    if out.sampling.get("n", 1) != 1:
        raise ValueError("n: the KServe protocol returns one text_output; n must be 1")
    out.sampling.pop("n", None)
    return out
