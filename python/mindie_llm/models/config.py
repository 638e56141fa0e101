# SPDX-License-Identifier: Apache-2.0
"""``LlamaArchConfig``: the architecture of one Llama-family model (Llama 2/3, Mistral, Qwen2,
SmolLM2), built from a Hugging Face ``config.json`` dict and validated field by field.

Imports nothing of the package but ``layers.rotary`` (for the list of rope types).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from mindie_llm.layers.rotary import SUPPORTED_ROPE_TYPES, rope_type_of

__all__ = ["LlamaArchConfig", "ArchConfigError"]


class ArchConfigError(ValueError):
    """A model config field is missing or impossible; ``field`` names it."""

    def __init__(self, field: str, message: str, source: str | None = None):
        self.field = field
        self.source = source
        where = f" (in {source})" if source else ""
        super().__init__(f"config.{field}: {message}{where}")


_QKV_BIAS_TYPES = ("qwen2",)


@dataclass(frozen=True)
class LlamaArchConfig:
    architecture: str                 # HF class name, e.g. "LlamaForCausalLM"
    model_type: str                   # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_sliding_windows: tuple[int | None, ...] | None = None  # per layer, when layers differ
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ArchConfigError(name, f"must be a positive integer; got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ArchConfigError("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                                  f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ArchConfigError("head_dim", f"must be even for rotary embedding; got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ArchConfigError("rms_norm_eps", f"must be > 0; got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ArchConfigError("rope_theta", f"must be > 0; got {self.rope_theta}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ArchConfigError("partial_rotary_factor", f"must be in (0, 1]; got {self.partial_rotary_factor}")
        if self.hidden_act != "silu":
            raise ArchConfigError("hidden_act", f"only 'silu' is supported; got {self.hidden_act!r}")
        rope_type = rope_type_of(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ArchConfigError("rope_scaling", f"rope_type {rope_type!r} is not supported; "
                                  f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope_type in ("linear", "llama3") and "factor" not in (self.rope_scaling or {}):
            raise ArchConfigError("rope_scaling.factor", f"required for rope_type {rope_type!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ArchConfigError("sliding_window", f"must be >= 1 or null; got {self.sliding_window}")
        if self.layer_sliding_windows is not None and len(self.layer_sliding_windows) != self.num_hidden_layers:
            raise ArchConfigError("layer_types", "must have one entry per layer")

    # ------------------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def sliding_window_of(self, layer: int) -> int | None:
        if self.layer_sliding_windows is not None:
            return self.layer_sliding_windows[layer]
        return self.sliding_window

    def num_params(self) -> int:
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        return n * per_layer + v * h * (1 if self.tie_word_embeddings else 2) + h

    def replace(self, **changes: Any) -> "LlamaArchConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str | None = None) -> "LlamaArchConfig":
        """From a parsed ``config.json``. Raises ArchConfigError naming the field that is wrong."""
        try:
            return cls._from_hf(cfg)
        except ArchConfigError as e:
            if source and e.source is None:
                raise ArchConfigError(e.field, str(e).split(": ", 1)[1], source) from None
            raise
        except (TypeError, ValueError) as e:
            raise ArchConfigError("<root>", f"malformed config: {e}", source) from None

    @classmethod
    def _from_hf(cls, cfg: Mapping[str, Any]) -> "LlamaArchConfig":
        if not isinstance(cfg, Mapping):
            raise ArchConfigError("<root>", "config.json must hold a JSON object")
        archs = cfg.get("architectures") or []
        model_type = str(cfg.get("model_type", "llama"))
        default_arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM"}.get(model_type, "LlamaForCausalLM")
        architecture = str(archs[0]) if archs else default_arch

        def need(name: str) -> Any:
            if cfg.get(name) is None:
                raise ArchConfigError(name, "missing")
            return cfg[name]

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        num_kv = cfg.get("num_key_value_heads") or num_heads
        head_dim = cfg.get("head_dim") or (hidden // num_heads if isinstance(hidden, int) and
                                          isinstance(num_heads, int) and num_heads > 0 else 0)
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling")
        if scaling:
            rope.update(scaling)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
        if rope_scaling and rope_type_of(rope_scaling) == "default" and "factor" not in rope_scaling:
            rope_scaling = None
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        sliding, per_layer = cls._sliding(cfg, model_type)
        attention_bias = bool(cfg.get("attention_bias", model_type in _QKV_BIAS_TYPES))
        return cls(
            architecture=architecture, model_type=model_type,
            vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=num_heads, num_key_value_heads=num_kv, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=rope_scaling, partial_rotary_factor=float(partial),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias, o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)), hidden_act=str(cfg.get("hidden_act", "silu")),
            sliding_window=sliding, layer_sliding_windows=per_layer,
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=tuple(int(e) for e in eos_ids),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    @staticmethod
    def _sliding(cfg: Mapping[str, Any], model_type: str) -> tuple[int | None, tuple | None]:
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            return None, None
        if window is None:
            return None, None
        layer_types = cfg.get("layer_types")
        if layer_types and any(t != "sliding_attention" for t in layer_types):
            per = tuple(window if t == "sliding_attention" else None for t in layer_types)
            return None, per
        return int(window), None
