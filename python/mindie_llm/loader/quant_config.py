# SPDX-License-Identifier: Apache-2.0
"""Which quantization scheme a checkpoint needs: the ``quantization_config`` of an HF config.json
(AWQ, GPTQ, compressed-tensors W8A8 and FP8) read into ``(scheme name, scheme kwargs)``, and the choice
between it and ``model.quantization``. Every refusal is one line naming the config field.

Must not import the engine, executor or server; the schemes themselves are in layers/.
"""
from __future__ import annotations

from typing import Any, Mapping

from mindie_llm.loader.errors import CorruptCheckpointError

__all__ = ["detect_quantization", "choose_scheme"]


def _fail(source: str, field: str, msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(source, f"quantization_config.{field}: {msg}")


def detect_quantization(cfg: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]] | None:
    """None for a float checkpoint; else the scheme the checkpoint's tensors are in."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise _fail(source, "", "must be a JSON object")
    method = str(qc.get("quant_method", "")).lower()
    if method in ("awq", "gptq"):
        if qc.get("bits", qc.get("w_bit", 4)) != 4:
            raise _fail(source, "bits", f"{qc.get('bits')!r}: only 4-bit {method} is supported")
        group = qc.get("group_size", qc.get("q_group_size"))
        if group not in (32, 64, 128):
            raise _fail(source, "group_size", f"{group!r}: supported group sizes are 32, 64 and 128")
        if method == "awq":
            if str(qc.get("version", "gemm")).lower() != "gemm":
                raise _fail(source, "version", f"{qc.get('version')!r}: only the AWQ GEMM layout is supported")
            if qc.get("zero_point", True) is not True:
                raise _fail(source, "zero_point", "AWQ without zero points is not supported")
            return "awq", {"group_size": group}
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _fail(source, "checkpoint_format", f"{fmt!r}: expected gptq or gptq_v2")
        return "gptq", {"group_size": group, "gptq_v2": fmt == "gptq_v2"}
    if method == "compressed-tensors":
        groups = qc.get("config_groups")
        if not isinstance(groups, Mapping) or len(groups) != 1:
            raise _fail(source, "config_groups", "exactly one group (W8A8) is supported")
        (group,) = groups.values()
        w, a = (group or {}).get("weights") or {}, (group or {}).get("input_activations") or {}
        ignore = tuple(str(x) for x in qc.get("ignore", ["lm_head"]))
        if any(x.startswith("re:") for x in ignore):
            raise _fail(source, "ignore", "regular-expression entries are not supported")
        if w.get("type") == "float":    # FP8 (llm-compressor FP8_DYNAMIC): e4m3 weights, dynamic token scales
            ok_w = w.get("num_bits") == 8 and w.get("strategy") in ("channel", "tensor") and w.get("symmetric", True)
            ok_a = (a.get("num_bits") == 8 and a.get("type") == "float" and a.get("strategy") == "token"
                    and a.get("dynamic") is True)
            if not (ok_w and ok_a):
                raise _fail(source, "config_groups", "only FP8 e4m3 weights (per channel or tensor) with dynamic "
                                                     "per-token activations is supported")
            return "fp8", {"ignore": ignore}
        ok_w = (w.get("num_bits") == 8 and w.get("type", "int") == "int" and w.get("strategy") == "channel"
                and w.get("symmetric", True))
        ok_a = (a.get("num_bits") == 8 and a.get("type", "int") == "int" and a.get("strategy") == "token"
                and a.get("dynamic") is True and a.get("symmetric", True))
        if not (ok_w and ok_a):
            raise _fail(source, "config_groups", "only W8A8 int8 (weights per channel, activations per "
                                                 "token, dynamic, symmetric) is supported")
        return "w8a8", {"ignore": ignore}
    raise _fail(source, "quant_method", f"{method!r} is not supported (awq, gptq, compressed-tensors W8A8 / FP8)")


# what model.quantization may say for a checkpoint detected as <key>
_COMPATIBLE = {"awq": ("awq", "w4a16"), "gptq": ("gptq", "w4a16"), "w8a8": ("w8a8",), "fp8": ("fp8",)}


def choose_scheme(asked: str | None, detected: tuple[str, dict[str, Any]] | None,
                  source: str) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint scheme to load with (``None``: none of layers/quant_*), given
    ``model.quantization`` and what the checkpoint holds."""
    if detected is None:
        if asked in ("w8a8", "w4a16", "fp8"):
            return asked, {"from_float": True}
        if asked in ("awq", "gptq"):
            raise CorruptCheckpointError(source, f"model.quantization={asked} needs a {asked} checkpoint "
                                                 "(config.json has no quantization_config)")
        return None
    name, kwargs = detected
    if asked in (None, "auto") or asked in _COMPATIBLE[name]:
        return name, kwargs
    raise CorruptCheckpointError(source, f"model.quantization={asked} cannot load this {name} checkpoint "
                                         f"(use auto or {_COMPATIBLE[name][0]})")
