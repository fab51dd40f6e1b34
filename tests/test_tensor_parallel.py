"""Tensor parallelism on vLLM's CPU platform: TP=2 equals TP=1 under NSA, for a dense Llama
(training-free merged mode) and for the NSA model (gated; g_proj sharded with the query
heads, a single KV head replicated on both ranks)."""
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
from vllm_nsa.engine_runner import nsa_args  # noqa: E402
from vllm_nsa.tiny import build_tiny_llama, build_tiny_nsa  # noqa: E402

pytestmark = pytest.mark.engine

SPARSE = {"window": 32, "select_topk": 4}


@pytest.fixture
def two_ranks(monkeypatch, tmp_path):
    # vLLM's CPU workers bind OpenMP threads per NUMA node by default and this box has
    # one node: give each of the two ranks one core explicitly.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(read_stats.STATS_FILE_ENV, str(stats))
    return stats


def compare_tp(model, two_ranks, **engine_kwargs):
    from vllm import SamplingParams

    rng = random.Random(3)
    prompts = [random_text(rng, 60), random_text(rng, 700)]  # 700 >> window + n * l'
    sampling = SamplingParams(max_tokens=10, temperature=0, prompt_logprobs=1)
    single = run_engine(model, prompts, sampling, tensor_parallel_size=1, **TEST_ENGINE,
                        **engine_kwargs)[0]
    two_ranks.unlink()
    sharded = run_engine(model, prompts, sampling, tensor_parallel_size=2, **TEST_ENGINE,
                         **engine_kwargs)[0]
    assert tokens_of(sharded) == tokens_of(single)
    for a, b in zip(sharded, single):
        torch.testing.assert_close(prompt_logprobs_of(a), prompt_logprobs_of(b), atol=1e-4,
                                   rtol=0)
    return read_stats.read_lines(two_ranks)[0]


def test_dense_llama_tp2_equals_tp1(tmp_path, two_ranks):
    build_tiny_llama(str(tmp_path / "llama"), num_heads=4, num_kv_heads=2)
    steps = compare_tp(str(tmp_path / "llama"), two_ranks, **nsa_args(SPARSE))
    # each rank counts reads for its own KV head (2 KV heads / 2 ranks), same numbers
    assert {step["tp_rank"] for step in steps} == {0, 1}
    assert all(step["kv_heads"] == 1 for step in steps)
    by_rank = [[s["total"] for s in steps if s["tp_rank"] == rank] for rank in (0, 1)]
    assert by_rank[0] == by_rank[1]


def test_nsa_model_tp2_equals_tp1(tmp_path, two_ranks):
    build_tiny_nsa(str(tmp_path / "nsa"), num_heads=4, num_kv_heads=1)
    compare_tp(str(tmp_path / "nsa"), two_ranks)


def test_unshardable_heads_rejected_at_start(tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    build_tiny_llama(str(tmp_path / "llama"), num_heads=4, num_kv_heads=2)
    args = EngineArgs(model=str(tmp_path / "llama"), tensor_parallel_size=3,
                      **nsa_args(SPARSE))
    with pytest.raises(Exception, match=r"attention heads \(4\).*tensor parallel size \(3\)"):
        args.create_engine_config()
