"""vLLM NSAForCausalLM (NSA backend, gated mode) against the torch oracle, greedy, float32.

One engine per G (num_heads / num_kv_heads); prompts are longer than
window + block_counts * block_size so the compressed, selected and window branches all
decide the output, and of different lengths so prefill and decode share batches.
"""
import json
import os

import pytest

from vllm_nsa.engine_runner import start_engine, stop_engine

pytestmark = pytest.mark.engine

# Tiny checkpoint: window 32, 3 blocks of 16 -> 80 tokens; prompts go up to 300.
PROMPT_LENGTHS = (100, 163, 300, 40)
NEW_TOKENS = 12
LOGPROB_TOLERANCE = 1e-3  # float32 everywhere; the paths differ only in summation order


def tiny_nsa_engine(model_dir):
    return dict(model=str(model_dir), dtype="float32", max_model_len=512, max_num_seqs=4,
                seed=0, enforce_eager=True)


@pytest.fixture(scope="module", params=[4, 1], ids=lambda g: f"G{g}")
def case(request, tmp_path_factory):
    """(oracle, llm) for a tiny NSA checkpoint with G = 4 query heads per KV head, or G = 1."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm_nsa.tiny import build_tiny_nsa

    group = request.param
    path = tmp_path_factory.mktemp(f"nsa_g{group}")
    oracle = build_tiny_nsa(str(path), num_heads=4, num_kv_heads=4 // group, seed=group)
    llm = start_engine(**tiny_nsa_engine(path))
    yield oracle, llm
    stop_engine(llm)


def prompts():
    return [[(7 * i + 3 * n) % 250 + 3 for i in range(n)] for n in PROMPT_LENGTHS]


def test_greedy_tokens_match_torch_model(case):
    from vllm import SamplingParams

    oracle, llm = case
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
    worst = 0.0
    for prompt, output in zip(prompts(), outputs):
        expected_tokens, expected_logprobs = oracle.greedy(prompt, NEW_TOKENS)
        completion = output.outputs[0]
        assert list(completion.token_ids) == expected_tokens, f"prompt of {len(prompt)} tokens"
        got = [step[token].logprob for step, token in zip(completion.logprobs,
                                                          completion.token_ids)]
        worst = max(worst, max(abs(a - b) for a, b in zip(got, expected_logprobs)))
    print(f"greedy equality: {len(PROMPT_LENGTHS)} prompts x {NEW_TOKENS} tokens identical; "
          f"max |logprob diff| = {worst:.2e}")
    assert worst < LOGPROB_TOLERANCE


def test_shared_prefix_reuses_cache_and_still_matches(case):
    """A second request sharing a long prefix hits vLLM's prefix cache (full pages of raw
    and compressed entries reused); its continuation must still equal the oracle's."""
    from vllm import SamplingParams

    oracle, llm = case
    base = prompts()[2]
    prompt = base[:260] + [11, 12, 13, 14, 15]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    assert list(output.outputs[0].token_ids) == oracle.greedy(prompt, 6)[0]


def write_config(directory, **overrides):
    from vllm_nsa.tiny import build_tokenizer

    build_tokenizer(str(directory))
    config = dict(model_type="nsa", architectures=["NSAForCausalLM"], hidden_size=64,
                  num_hidden_layers=1, num_heads=4, num_kv_heads=1, head_dim=32,
                  block_size=16, block_counts=3, window_size=32, vocab_size=259,
                  max_position_embeddings=512)
    config.update(overrides)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("overrides,message", [
    ({"num_heads": 6, "num_kv_heads": 4}, "num_heads=6 is not a multiple of num_kv_heads=4"),
    ({"block_counts": 2}, "select_topk=2 must be >= init_blocks"),
    ({"block_size": 0}, "block_size=0|compress_block=0"),
    ({"head_dim": 24}, "head_dim=24 is not supported"),
])
def test_bad_nsa_config_fails_at_startup_with_its_values(tmp_path, overrides, message):
    """Rejected while vLLM parses the model config, before any engine process starts."""
    write_config(tmp_path, **overrides)
    with pytest.raises(Exception, match=message):
        start_engine(**tiny_nsa_engine(tmp_path))
