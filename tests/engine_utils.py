"""Helpers for tests that start vLLM engines (one at a time on this 2-core machine).
Starting and stopping engines is `vllm_nsa.engine_runner`'s (shared with evals and
benchmarks); this module holds what only the tests use."""
import os
import subprocess
import sys

import torch

from vllm_nsa.engine_runner import run_engine  # noqa: F401  (the tests' engine helper)

BLOCK_SIZE = 32   # CPU_ATTN needs a multiple of 32; NSA a multiple of compress_stride
# The engine settings of the equality tests: float32, eager, reproducible.
TEST_ENGINE = {"dtype": "float32", "max_model_len": 2048, "block_size": BLOCK_SIZE, "seed": 0,
               "enforce_eager": True}


def random_text(rng, num_chars):
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(num_chars // 5)]
    return " ".join(words)[:num_chars]


def tokens_of(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def prompt_logprobs_of(output):
    """Log-probability vLLM assigned to each actual prompt token (from position 1)."""
    ids = output.prompt_token_ids
    return torch.tensor([entry[ids[i]].logprob for i, entry in enumerate(output.prompt_logprobs)
                         if entry is not None])


def run_in_fresh_process(code: str, *args: str, timeout: float = 600
                         ) -> subprocess.CompletedProcess:
    """Run `code` (python -c) in a new interpreter with vLLM's engine core in that process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0: an engine's exceptions reach the caller, and several
    engines can run one after the other). vLLM's in-process engines leave process state
    behind (e.g. kernel registrations), hence a fresh process rather than pytest's."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
