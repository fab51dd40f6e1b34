"""Helpers for tests that start vLLM engines (one at a time on this 2-core machine)."""
import gc

import torch

BLOCK_SIZE = 32   # CPU_ATTN needs a multiple of 32; NSA a multiple of compress_stride


def random_text(rng, num_chars):
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(num_chars // 5)]
    return " ".join(words)[:num_chars]


def run_engine(model, prompts, sampling, **engine_kwargs):
    """Start an engine, generate, shut it down (one engine at a time on this machine).
    With prefix caching on, the prompts run a second time without prompt logprobs (which
    bypass the prefix cache), now reading their prefixes from it."""
    from vllm import LLM

    engine_kwargs = {"dtype": "float32", "max_model_len": 2048, "block_size": BLOCK_SIZE,
                     "seed": 0, "enforce_eager": True, **engine_kwargs}
    llm = LLM(model=model, **engine_kwargs)
    try:
        outputs = [llm.generate(prompts, sampling, use_tqdm=False)]
        if engine_kwargs.get("enable_prefix_caching"):  # again: now from prefix-cache hits
            from vllm import SamplingParams
            plain = SamplingParams(max_tokens=sampling.max_tokens, temperature=0)
            outputs.append(llm.generate(prompts, plain, use_tqdm=False))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return outputs


def tokens_of(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def prompt_logprobs_of(output):
    """Log-probability vLLM assigned to each actual prompt token (from position 1)."""
    ids = output.prompt_token_ids
    return torch.tensor([entry[ids[i]].logprob for i, entry in enumerate(output.prompt_logprobs)
                         if entry is not None])
