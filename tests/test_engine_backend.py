"""Engine-level: a tiny random dense Llama (float32) served by vLLM with
attention_backend="NSA" (training-free merged mode; the "bounds" scorer by default, the
paper's compressed one when asked) against CPU_ATTN and a torch forward."""
import json
import random

import pytest
import torch

pytest.importorskip("vllm")

from engine_utils import (  # noqa: E402
    TEST_ENGINE,
    prompt_logprobs_of,
    random_text,
    run_engine,
    tokens_of,
)
from vllm_nsa import read_stats  # noqa: E402
from vllm_nsa.config import NSAConfig  # noqa: E402
from vllm_nsa.engine_runner import nsa_args  # noqa: E402
from vllm_nsa.kernels.reference import nsa_attention  # noqa: E402
from vllm_nsa.tiny import build_tiny_llama  # noqa: E402

# Small NSA parameters so prompts of ~1.2k tokens are several times window + n * l' (288).
SPARSE = {"compress_block": 32, "compress_stride": 16, "select_block": 64,
          "select_topk": 4, "window": 32}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(str(path))
    return str(path)


def test_short_prompts_equal_dense(tiny_llama, tmp_path, monkeypatch):
    """Contexts of at most n*l' tokens (1024 with the paper's parameters and a dense model's
    defaults; some longer than the 512-token window): every block is selected, so merged
    NSA is exact dense attention, token for token, and its decode read counters equal
    dense (no scorer read)."""
    from vllm import SamplingParams

    stats_file = tmp_path / "nsa_stats.jsonl"
    monkeypatch.setenv(read_stats.STATS_FILE_ENV, str(stats_file))
    rng = random.Random(0)
    prompts = [random_text(rng, n) for n in (20, 150, 333, 480, 900)]
    sampling = SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=1)
    dense = run_engine(tiny_llama, prompts, sampling, attention_backend="CPU_ATTN",
                       **TEST_ENGINE)[0]
    nsa = run_engine(tiny_llama, prompts, sampling, **nsa_args(), **TEST_ENGINE)[0]
    longest = max(len(o.prompt_token_ids) + 12 for o in nsa)
    assert 512 < longest <= NSAConfig().dense_tokens
    assert tokens_of(nsa) == tokens_of(dense)
    for a, b in zip(nsa, dense):
        torch.testing.assert_close(prompt_logprobs_of(a), prompt_logprobs_of(b),
                                   atol=1e-4, rtol=0)
    steps, _ = read_stats.read_lines(stats_file)
    assert steps and all(step["total"] == step["dense"] for step in steps)
    assert NSAConfig(**steps[0]["config"]) == NSAConfig.for_dense_model({})


def reference_llama_logprobs(model_dir, prompt_ids, config):
    """A torch forward of the same weights with every attention replaced by the reference."""
    from transformers import AttentionInterface, LlamaForCausalLM

    def nsa_reference_attention(module, query, key, value, attention_mask, scaling=None,
                                dropout=0.0, **kwargs):
        out, _ = nsa_attention(query[0].transpose(0, 1), key[0].transpose(0, 1),
                               value[0].transpose(0, 1), config, scale=scaling)
        return out.unsqueeze(0), None

    AttentionInterface.register("nsa_reference", nsa_reference_attention)
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="nsa_reference",
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(prompt_ids[1:]).unsqueeze(1)).squeeze(1)


def test_long_prompts_scheduling_invariance_and_reference(tiny_llama, tmp_path, monkeypatch):
    """Long prompts (NSA differs from dense): chunked prefill and prefix caching on/off give
    identical greedy tokens, and prompt logprobs match a torch forward with the reference."""
    from vllm import SamplingParams

    stats_file = tmp_path / "nsa_stats.jsonl"
    monkeypatch.setenv(read_stats.STATS_FILE_ENV, str(stats_file))

    rng = random.Random(1)
    shared = random_text(rng, 700)
    prompts = [random_text(rng, 1300), shared + random_text(rng, 500),
               shared + random_text(rng, 450), random_text(rng, 900)]
    sampling = SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=1)
    chunked = run_engine(tiny_llama, prompts, sampling, **nsa_args(SPARSE), **TEST_ENGINE,
                         enable_chunked_prefill=True, max_num_batched_tokens=200,
                         enable_prefix_caching=True)
    whole = run_engine(tiny_llama, prompts, sampling, **nsa_args(SPARSE), **TEST_ENGINE,
                       enable_chunked_prefill=False, max_num_batched_tokens=2048,
                       enable_prefix_caching=False)[0]
    dense = run_engine(tiny_llama, prompts[:1], sampling, attention_backend="CPU_ATTN",
                       **TEST_ENGINE)[0]
    first, cached = chunked
    assert tokens_of(first) == tokens_of(whole) == tokens_of(cached)
    assert all(o.num_cached_tokens >= 640 for o in cached[1:3])   # the shared 700 chars
    # the stats hook saw sparse decode steps: far fewer reads than the dense context
    steps, _ = read_stats.read_lines(stats_file)
    longest = max(steps, key=lambda step: step["dense"] / step["decode_requests"])
    assert longest["total"] < longest["dense"] / 2
    assert tokens_of(first)[0] != tokens_of(dense)[0] or not torch.allclose(
        prompt_logprobs_of(first[0]), prompt_logprobs_of(dense[0]), atol=1e-3)
    expected = reference_llama_logprobs(tiny_llama, whole[0].prompt_token_ids,
                                        NSAConfig.for_dense_model(SPARSE))
    for run in (first, whole):
        torch.testing.assert_close(prompt_logprobs_of(run[0]).double(), expected,
                                   atol=1e-4, rtol=0)


TWO_ENGINES = """
import json, os, sys
from vllm import SamplingParams
from vllm_nsa import read_stats
from vllm_nsa.engine_runner import nsa_args, run_engine
model, prompt, configs, stats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
os.environ[read_stats.STATS_FILE_ENV] = stats
sampling = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1)
runs = []
for config in configs:
    open(stats, "w").close()
    output = run_engine(model, [prompt], sampling, **nsa_args(config), dtype="float32",
                        max_model_len=1024, block_size=32, seed=0, enforce_eager=True)[0][0]
    runs.append({"prompt_token_ids": output.prompt_token_ids,
                 "prompt_logprobs": [None if e is None else e[i].logprob for i, e in
                                     zip(output.prompt_token_ids, output.prompt_logprobs)],
                 "stats": read_stats.read_lines(stats)[0]})
print("RUNS " + json.dumps(runs))
"""


def test_two_engines_in_one_process_use_their_own_parameters(tiny_llama, tmp_path):
    """Two engines, one after the other in one process (engine core in-process), with
    different additional_config["nsa"]: each engine's counters name its own parameters,
    and each one's prompt logprobs match the reference at its own parameters (the layers'
    impls, KV page layout and metadata all used them)."""
    from engine_utils import run_in_fresh_process

    configs = [SPARSE, {"compress_block": 32, "compress_stride": 32, "select_block": 32,
                        "select_topk": 6, "window": 64, "selection_score": "compressed"}]
    prompt = random_text(random.Random(5), 700)   # 700 tokens >> window + n * l' (288, 256)
    proc = run_in_fresh_process(TWO_ENGINES, tiny_llama, prompt, json.dumps(configs),
                                str(tmp_path / "stats.jsonl"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RUNS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    runs = json.loads(lines[-1].removeprefix("RUNS "))
    for config, run in zip(configs, runs):
        expected = NSAConfig.for_dense_model(config)
        assert run["stats"] and all(NSAConfig(**line["config"]) == expected
                                    for line in run["stats"])
        reference = reference_llama_logprobs(tiny_llama, run["prompt_token_ids"], expected)
        got = torch.tensor([lp for lp in run["prompt_logprobs"] if lp is not None],
                           dtype=torch.float64)
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)
    assert runs[0]["prompt_logprobs"] != runs[1]["prompt_logprobs"]
