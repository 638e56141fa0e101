# SPDX-License-Identifier: Apache-2.0
"""The ``mindie-llm`` command line.

    mindie-llm generate "What is the capital of France?" [--model X] [--max-tokens N] [--no-chat]
    mindie-llm chat [--model X] [--system "..."]          # interactive, keeps the history
    mindie-llm bench [--num-requests 16 --output-len 128]  # offline benchmark vs transformers
    mindie-llm bench serve ...                             # online benchmark (bench.serve_client)
    mindie-llm serve --config configs/default.yaml         # HTTP + gRPC (server.launcher)
    mindie-llm router --config configs/pd-cpu.yaml         # the PD router in front of PD instances

Every subcommand takes ``--config FILE`` and ``--set section.key=value`` (repeatable). Heavy
imports (torch, the model) happen inside the subcommands so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

__all__ = ["main", "build_parser"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--config", default=None, help="deployment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantization", default=None,
                   help="auto | none | int8 | gguf | w8a8 | w4a16 | awq | gptq (docs/configuration.md)")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindie-llm", description="LLM serving over a C++ continuous-batching scheduler")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt")
    g.add_argument("--no-chat", action="store_true", help="send the raw prompt (no chat template)")
    g.add_argument("--system", default=None, help="system message (chat mode)")
    _common(g)
    _sampling(g)
    c = sub.add_parser("chat", help="interactive chat; /reset clears the history, /exit quits")
    c.add_argument("--system", default=None, help="system message")
    _common(c)
    _sampling(c)
    b = sub.add_parser("bench", help="offline benchmark vs transformers; 'bench serve ...' benchmarks a server")
    from mindie_llm.bench.offline import add_arguments

    add_arguments(b)
    sub.add_parser("serve", help="serve HTTP (OpenAI) and gRPC (see --help of the server)", add_help=False)
    sub.add_parser("router", help="the PD router (serve with disaggregation.role=router)", add_help=False)
    return p


def _delegate(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            print(f"mindie-llm: {module} is not available in this installation ({e})", file=sys.stderr)
            return 2
        raise
    rc = mod.main(argv)
    return int(rc or 0)


def _llm(args: argparse.Namespace) -> Any:
    from mindie_llm.engine.llm import LLM, build_config

    cfg = build_config(args.config, args.overrides, model=args.model, dtype=args.dtype,
                       quantization=args.quantization)
    return LLM(config=cfg)


def _params(args: argparse.Namespace) -> Any:
    from mindie_llm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def _cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = _params(args)
    if args.no_chat or not getattr(llm.get_tokenizer(), "chat_template", None):
        out = llm.generate([args.prompt], params, use_tqdm=False)[0]
    else:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
        out = llm.chat(msgs, params, use_tqdm=False)[0]
    print(out.outputs[0].text.strip())
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = _params(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    base = list(history)
    print(f"chatting with {llm.engine.model_name}; /reset clears the history, /exit or Ctrl-D quits")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = list(base)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            out = llm.chat(history, params, use_tqdm=False)[0]
        except ValueError as e:   # e.g. the conversation outgrew max_model_len
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        answer = out.outputs[0].text
        print(answer.strip())
        history.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _delegate("mindie_llm.server.launcher", argv[1:])
    if argv[:1] == ["router"]:    # the PD router: serve with disaggregation.role=router
        return _delegate("mindie_llm.server.launcher", [*argv[1:], "--set", "disaggregation.role=router"])
    if argv[:2] == ["bench", "serve"]:
        return _delegate("mindie_llm.bench.serve_client", argv[2:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "chat":
            return _cmd_chat(args)
        if args.command == "bench":
            from mindie_llm.bench.offline import run

            try:
                run(args)
            except KeyboardInterrupt:   # run() has printed what it measured
                return 130
            return 0
    except ValueError as e:   # bad input or config: one line, no traceback
        print(f"mindie-llm: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
