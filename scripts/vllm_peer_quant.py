"""vLLM (0.25.0, pinned to the GPU image's torch 2.11) on the workloads of scripts/bench_gpu.py:
Llama-3-8B shapes with dummy bf16 weights, token-id prompts (no tokenizer). One JSON line a figure.

The quantized variant of the peer script: ``python3 vllm_peer_quant.py llama3-8b --quantization fp8``
quantizes the bf16 dummy weights at load (vLLM's dynamic FP8: e4m3 weights per tensor/channel,
dynamic per-token activation scales), ``--kv-cache-dtype fp8`` an fp8 KV cache; figures are named
``vllm_<quantization>_...`` so that bench_gpu.py's quant section can be read beside them."""
import json, os, random, sys, tempfile, time

def emit(**kw):
    print(json.dumps(kw), flush=True)

def prompts(n, lo, hi, vocab, seed=1):
    r = random.Random(seed)
    return [[r.randrange(10, vocab) for _ in range(r.randint(lo, hi))] for _ in range(n)]

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                        tie_word_embeddings=True),
}

SKIP_VARIED = [False]

def main(name="llama3-8b", quantization=None, kv_cache_dtype="auto"):
    import torch, vllm
    from transformers import LlamaConfig
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    emit(figure="env", value=dict(vllm=vllm.__version__, torch=torch.__version__, gpu=torch.cuda.get_device_name()))
    d = tempfile.mkdtemp()
    cfg = LlamaConfig(**SHAPES[name]); cfg.torch_dtype = "bfloat16"; cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(d)
    t0 = time.perf_counter()
    llm = LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096, seed=0,
              quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    tag = "vllm_" + (quantization or "bf16") + ("" if kv_cache_dtype == "auto" else "_kv" + kv_cache_dtype)
    emit(model=name, figure=tag + "_startup_s", value=round(time.perf_counter() - t0, 1))
    V = cfg.vocab_size
    def run(ps, new):
        sp = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True, detokenize=False)
        torch.cuda.synchronize(); t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
        torch.cuda.synchronize(); dt = time.perf_counter() - t
        return dt, sum(len(o.outputs[0].token_ids) for o in outs)
    run(prompts(4, 64, 128, V, seed=9), 8)  # warm-up
    dt, n = run(prompts(1, 128, 128, V), 128)
    emit(model=name, figure=tag + "_bs1_tok_s", value=round(n / dt, 1), prompt=128, new=128)
    dt, n = run(prompts(1, 1024, 1024, V, seed=3), 1)
    emit(model=name, figure=tag + "_ttft_1024_ms", value=round(dt * 1e3, 1))
    dt, n = run(prompts(256, 64, 512, V), 128)
    emit(model=name, figure=tag + "_offline_out_tok_s", value=round(n / dt, 1), n=256, prompt="64-512", new=128, s=round(dt, 2), tokens=n)
    if SKIP_VARIED[0]:
        return
    r = random.Random(5); ps = prompts(256, 64, 512, V, seed=4)
    outs = [r.randint(16, 512) for _ in ps]
    sp = [SamplingParams(temperature=0.0, max_tokens=o, min_tokens=o, ignore_eos=True, detokenize=False) for o in outs]
    torch.cuda.synchronize(); t = time.perf_counter()
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    emit(model=name, figure=tag + "_offline_varied_out_tok_s", value=round(sum(outs) / dt, 1), n=256, prompt="64-512", new="16-512", s=round(dt, 2))

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--quantization", default=None, help="vLLM quantization= (fp8: dynamic FP8 of the bf16 weights)")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--skip-varied", action="store_true", help="leave out the varied-output workload")
    a = ap.parse_args()
    SKIP_VARIED[0] = a.skip_varied
    main(a.model, a.quantization, a.kv_cache_dtype)
