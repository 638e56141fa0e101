# SPDX-License-Identifier: Apache-2.0
"""The signature table of the torch_npu test double: for each torch_npu function the NPU backend
calls, its schema copied verbatim from the pinned torch-npu 2.13.0 wheel (``pip download
torch-npu==2.13.0``) and the file it comes from, parsed into ``inspect.Signature`` objects that
bind every call exactly as Python would bind it against the real function.

Sources inside the wheel:
  DOCS = torch_npu/_op_plugin_docs.py            (the public op-plugin docs: "接口原型" lines)
  ATB  = torch_npu/include/third_party/op-plugin/op_plugin/include/AtbOpsInterface.h
         (ATB ops of torch_npu._npu_*; the C++ declaration, rewritten in schema syntax)
  META = torch_npu/op_plugin/meta/_meta_registrations.py   (output shapes / dtypes)
Layout and shape constraints per op live in torch_npu_double.py, each citing its source.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

__all__ = ["OpSchema", "SCHEMAS", "DOCS", "ATB", "META", "parse_schema"]

DOCS = "torch-npu 2.13.0 wheel: torch_npu/_op_plugin_docs.py"
ATB = "torch-npu 2.13.0 wheel: torch_npu/include/third_party/op-plugin/op_plugin/include/AtbOpsInterface.h"
META = "torch-npu 2.13.0 wheel: torch_npu/op_plugin/meta/_meta_registrations.py"


@dataclass(frozen=True)
class OpSchema:
    name: str
    schema: str          # verbatim (DOCS) or transcribed from the C++ declaration (ATB)
    source: str
    signature: inspect.Signature
    types: dict          # parameter name -> schema type ("Tensor", "Tensor?", "int", "float", ...)


_REQUIRED = inspect.Parameter.empty


def _default(text: str):
    text = text.strip()
    if text in ("None", "[]"):
        return None if text == "None" else []
    if text in ("True", "False"):
        return text == "True"
    if text.startswith(("'", '"')):
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_schema(schema: str) -> tuple[str, inspect.Signature, dict]:
    """``torch_npu.f(Tensor a, *, int b=0) -> Tensor`` -> (name, Signature, {param: type})."""
    m = re.match(r"\s*(?:torch_npu\.)?(\w+)\((.*)\)\s*->", schema)
    if m is None:
        raise ValueError(f"not a schema: {schema!r}")
    name, body = m.group(1), m.group(2)
    params, types, kwonly = [], {}, False
    for part in [p.strip() for p in re.split(r",(?![^\[]*\])", body) if p.strip()]:
        if part == "*":
            kwonly = True
            continue
        decl, _, default = part.partition("=")
        pieces = decl.split()
        if len(pieces) < 2:   # the docs miss a comma once ("Tensor? dequant_scale=None Tensor? ...")
            raise ValueError(f"{name}: cannot parse {part!r}")
        typ, pname = " ".join(pieces[:-1]), pieces[-1]
        kind = inspect.Parameter.KEYWORD_ONLY if kwonly else inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(pname, kind, default=_default(default) if default else _REQUIRED))
        types[pname] = typ.replace("(a!)", "").replace("(b!)", "")
    return name, inspect.Signature(params), types


# (schema, source) of every torch_npu function the backend calls.
_ROWS = [
    ("torch_npu.npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)", DOCS),
    # DOCS has no docstring for npu_add_rms_norm; META line: def npu_add_rms_norm_meta(x1, x2, gamma, epsilon=1e-6)
    # and the header CustomFunctions.h: npu_add_rms_norm(const at::Tensor & x1, const at::Tensor & x2,
    # const at::Tensor & gamma, double epsilon=1e-06) -> tuple<Tensor, Tensor, Tensor>.
    ("torch_npu.npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor, Tensor)",
     META),
    # ATB: void _npu_rotary_embedding(const at::Tensor&positions, at::Tensor&query, at::Tensor&key,
    #      int64_t head_size, const at::Tensor&cos_sin_cache, bool is_neox_style);
    ("torch_npu._npu_rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, int head_size, "
     "Tensor cos_sin_cache, bool is_neox_style) -> ()", ATB),
    ("torch_npu.npu_scatter_pa_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
     "Tensor slot_mapping, *, Tensor? compress_lens=None, Tensor? compress_seq_offsets=None, Tensor? seq_lens=None, "
     "str? cache_mode='PA_NZ') -> ()", DOCS),
    # ATB: void _npu_reshape_and_cache(const at::Tensor&key, const at::Tensor&value, at::Tensor&key_cache,
    #      at::Tensor&value_cache, const at::Tensor&slot_indices);
    ("torch_npu._npu_reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
     "Tensor slot_indices) -> ()", ATB),
    # ATB: void _npu_paged_attention(const at::Tensor&query, const at::Tensor&key_cache,
    #      const at::Tensor&value_cache, int64_t num_kv_heads, int64_t num_heads, double scale_value,
    #      const at::Tensor&block_table, const at::Tensor&context_lens, at::Tensor&out,
    #      const c10::optional<at::Tensor>&workspace);
    ("torch_npu._npu_paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, int num_kv_heads, "
     "int num_heads, float scale_value, Tensor block_table, Tensor context_lens, Tensor(a!) out, "
     "Tensor? workspace=None) -> ()", ATB),
    ("torch_npu.npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, "
     "Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, "
     "Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, Tensor? quant_scale2=None, "
     "Tensor? quant_offset2=None, Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, "
     "Tensor? block_table=None, Tensor? query_padding_size=None, Tensor? kv_padding_size=None, "
     "Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, Tensor? value_antiquant_scale=None, "
     "Tensor? value_antiquant_offset=None, Tensor? key_shared_prefix=None, Tensor? value_shared_prefix=None, "
     "Tensor? actual_shared_prefix_len=None,Tensor? query_rope=None, Tensor? key_rope=None, "
     "Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, int pre_tokens=2147483647, "
     "int next_tokens=2147483647, str input_layout=\"BSH\", int num_key_value_heads=0, int sparse_mode=0, "
     "int inner_precise=0, int block_size=0, int antiquant_mode=0, bool softmax_lse_flag=False, "
     "int key_antiquant_mode=0, int value_antiquant_mode=0) -> (Tensor, Tensor)", DOCS),
    ("torch_npu.npu_swiglu(Tensor self, int dim=-1) -> (Tensor)", DOCS),
    ("torch_npu.npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
     "Tensor? pertoken_scale=None, Tensor? bias=None, ScalarType? output_dtype=None) -> Tensor", DOCS),
    ("torch_npu.npu_dynamic_quant(Tensor x, *, Tensor? smooth_scales=None, Tensor? group_index=None, "
     "int? dst_type=None) ->(Tensor, Tensor)", DOCS),
    ("torch_npu.npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, "
     "Tensor? antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? bias=None, "
     "int antiquant_group_size=0, int inner_precise=0) -> Tensor", DOCS),
    # DOCS prints "Tensor? dequant_scale=None Tensor? pertoken_scale=None" without the comma; restored here.
    ("torch_npu.npu_mm_all_reduce_base(Tensor x1, Tensor x2, str hcom, *, str reduce_op='sum', Tensor? bias=None, "
     "Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, Tensor? x3=None, Tensor? dequant_scale=None, "
     "Tensor? pertoken_scale=None, Tensor? comm_quant_scale_1=None, Tensor? comm_quant_scale_2=None, "
     "int comm_turn=0, int antiquant_group_size=0) -> Tensor", DOCS),
]


def _build() -> dict[str, OpSchema]:
    out = {}
    for schema, source in _ROWS:
        name, sig, types = parse_schema(schema)
        out[name] = OpSchema(name, schema, source, sig, types)
    return out


SCHEMAS: dict[str, OpSchema] = _build()
