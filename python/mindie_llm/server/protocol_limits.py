# SPDX-License-Identifier: Apache-2.0
"""Request limits shared by the HTTP and gRPC front ends, read from the deployment config.

Owns the caps a client cannot exceed (``n``, ``max_tokens``, stop strings, ``logprobs``, body
size) and the typed error that names the offending field. Must not import the engine, torch or any
web framework.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mindie_llm.config import EngineConfig

__all__ = ["ModelNotFoundError", "RequestLimitError", "RequestLimits"]


class RequestLimitError(ValueError):
    """A request field exceeds a server limit; ``param`` is the field's name on the wire."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(f"{param}: {message}")


class ModelNotFoundError(RequestLimitError):
    """The request names a model this server does not serve (HTTP 404 ``model_not_found``)."""

    def __init__(self, model: str, served: str) -> None:
        super().__init__("model", f"the model {model[:128]!r} does not exist; this server serves {served!r}")


@dataclass(frozen=True)
class RequestLimits:
    """The caps of one server (from ``server.*`` and ``scheduler.max_n``)."""

    max_n: int = 16
    max_tokens_limit: int = 4096
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_request_body_bytes: int = 1 << 20

    @classmethod
    def from_config(cls, config: EngineConfig) -> RequestLimits:
        s = config.server
        return cls(max_n=config.scheduler.max_n, max_tokens_limit=s.max_tokens_limit,
                   max_logprobs=s.max_logprobs, max_stop_strings=s.max_stop_strings,
                   max_stop_string_length=s.max_stop_string_length,
                   max_request_body_bytes=s.max_request_body_bytes)

    def check(self, *, n: int | None = None, max_tokens: int | None = None,
              stop: str | Sequence[str] | None = None, logprobs: int | None = None,
              names: dict[str, str] | None = None) -> None:
        """Raises :class:`RequestLimitError` naming the first field over its cap.

        ``names`` maps the canonical names (``n``, ``max_tokens``, ``stop``, ``logprobs``) to the
        protocol's own (``max_completion_tokens``, ``top_logprobs``, ...).
        """
        names = names or {}

        def name(k: str) -> str:
            return names.get(k, k)

        if n is not None and not 1 <= n <= self.max_n:
            raise RequestLimitError(name("n"), f"must be in [1, {self.max_n}]; got {n}")
        if max_tokens is not None and not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestLimitError(name("max_tokens"), f"must be in [1, {self.max_tokens_limit}]; got {max_tokens}")
        if logprobs is not None and not 0 <= logprobs <= self.max_logprobs:
            raise RequestLimitError(name("logprobs"), f"must be in [0, {self.max_logprobs}]; got {logprobs}")
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else list(stop)
            if len(stops) > self.max_stop_strings:
                raise RequestLimitError(name("stop"), f"at most {self.max_stop_strings} stop strings; got {len(stops)}")
            for s in stops:
                if not isinstance(s, str) or not s:
                    raise RequestLimitError(name("stop"), "stop strings must be non-empty strings")
                if len(s) > self.max_stop_string_length:
                    raise RequestLimitError(
                        name("stop"), f"a stop string may have at most {self.max_stop_string_length} characters")
