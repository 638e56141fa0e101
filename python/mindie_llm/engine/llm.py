# SPDX-License-Identifier: Apache-2.0
"""LLM: the offline Python API, shaped like vLLM's.

    from mindie_llm import LLM, SamplingParams
    llm = LLM()                                           # embedded SmolLM2-135M-Instruct
    llm = LLM(model="path/to/dir_or.gguf", max_model_len=2048, dtype="bfloat16")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs = llm.chat([{"role": "user", "content": "Hi"}])

Every prompt of a batch is validated before any is scheduled: a bad one raises a ValueError
naming its index and field, and nothing runs. Must not import the server.
"""
from __future__ import annotations

from typing import Any, Sequence

from mindie_llm.config import EngineConfig
from mindie_llm.engine.llm_engine import InvalidRequestError, LLMEngine
from mindie_llm.outputs import RequestOutput
from mindie_llm.sampling_params import SamplingParams

__all__ = ["LLM", "build_config"]

PromptType = str | Sequence[int]


def _is_token_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def build_config(config_path: str | None = None, overrides: Sequence[str] = (), **kwargs: Any) -> EngineConfig:
    """A deployment from an optional YAML file, ``section.key=value`` overrides (``--set``) and
    then vLLM-style keyword arguments (None values are ignored)."""
    if config_path:
        cfg = EngineConfig.from_yaml(config_path, list(overrides))
    else:
        cfg = EngineConfig.from_overrides(list(overrides))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return EngineConfig.from_kwargs(base=cfg, **kwargs) if kwargs else cfg


class LLM:
    """An engine plus a blocking loop. ``model`` is a Hugging Face directory or a ``.gguf`` file
    (None: the embedded default); other keyword arguments are config overrides
    (``EngineConfig.from_kwargs``: ``max_model_len``, ``dtype``, ``block_size``, ``num_blocks``,
    ``enable_prefix_caching``, ``enable_chunked_prefill``, ``max_num_seqs``, ``seed``, ...).
    ``speculative_config``: the keys of the ``speculative`` section as a dict, e.g.
    ``{"method": "ngram", "num_speculative_tokens": 4}``."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 loaded_model: Any = None, speculative_config: dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        if model is not None:
            overrides["model"] = model
        if speculative_config is not None:
            if not isinstance(speculative_config, dict):
                raise InvalidRequestError("speculative_config", "must be a dict of speculative.* keys")
            for k, v in speculative_config.items():
                overrides[f"speculative__{k}"] = v
        self.config = EngineConfig.from_kwargs(base=config, **overrides)
        self.engine = LLMEngine(self.config, loaded_model=loaded_model)
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ------------------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType], sampling_params:
                 SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion; returns RequestOutputs in input order."""
        if isinstance(prompts, str) or _is_token_list(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequestError("prompts", f"must be a string, a list of strings or of token-id lists; "
                                      f"got {type(prompts).__name__}")
        prompts = [p["prompt_token_ids"] if isinstance(p, dict) and "prompt_token_ids" in p else
                   p["prompt"] if isinstance(p, dict) and "prompt" in p else p for p in prompts]
        return self._run(list(prompts), sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | Sequence[list[dict]], sampling_params:
             SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of message dicts) or a list of conversations, rendered with the
        model's chat template (sandboxed Jinja) and generated like ``generate``."""
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            convs = [list(messages)]
        elif isinstance(messages, (list, tuple)) and messages:
            convs = [list(c) if isinstance(c, (list, tuple)) else c for c in messages]
        else:
            raise InvalidRequestError("messages", "must be a conversation (a non-empty list of messages) "
                                      "or a list of conversations")
        prompts: list[PromptType] = []
        for i, conv in enumerate(convs):
            try:
                text = self.engine.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            except ValueError as e:
                raise InvalidRequestError(f"messages[{i}]", str(e)) from e
            prompts.append(self.engine._encode(text, add_special_tokens=False))
        return self._run(prompts, sampling_params, use_tqdm, texts=None)

    # ------------------------------------------------------------------------------------
    def _run(self, prompts: list[PromptType], sampling_params: Any, use_tqdm: bool,
             texts: list[str | None] | None = None) -> list[RequestOutput]:
        if sampling_params is None:
            params = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError("sampling_params", f"has {len(sampling_params)} entries for "
                                          f"{len(prompts)} prompts")
            params = list(sampling_params)
        else:
            raise InvalidRequestError("sampling_params", f"must be a SamplingParams or a list of them; "
                                      f"got {type(sampling_params).__name__}")
        if not prompts:
            return []
        engine = self.engine
        token_ids = []
        for i, (p, sp) in enumerate(zip(prompts, params)):   # validate all before scheduling any
            try:
                token_ids.append(engine.validate_request(p, sp))
            except ValueError as e:
                field = getattr(e, "field", "prompt")
                raise InvalidRequestError(f"prompts[{i}].{field}" if field else f"prompts[{i}]",
                                          str(e)) from e
        ids = []
        for p, toks, sp in zip(prompts, token_ids, params):
            rid = f"llm-{self._counter}"
            self._counter += 1
            engine.add_request(rid, p if isinstance(p, str) else toks, sp)
            ids.append(rid)
        pending = set(ids)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"the engine dropped requests {sorted(pending)} without finishing them")
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        final[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in pending:
                engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[r] for r in ids]
