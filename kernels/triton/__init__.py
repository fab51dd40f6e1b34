"""NSA over vLLM's paged caches in Triton, one module per stage (kernels/README.md):

  compress.py  write_kv, compress   raw K/V store; phi = mean -> compressed cache
  score.py     score                compressed attention -> LSE (+ o_cmp when gated)
  select.py    select               block importance, forced blocks, top-n
  attend.py    attend               selected blocks + sliding window
  combine.py   combine              merge of split online-softmax partials
  plan.py      make_plan            tiles, splits and scratch of one step
  common.py    jit helpers shared by the stage kernels

Each stage function has a torch twin of the same name and signature in kernels/paged.py.
Everything is launched with host-known sizes only, so a decode step can be captured in a
CUDA graph. The package imports without a GPU; kernels compile on first launch.
"""
from __future__ import annotations

import sys

import torch

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.pipeline import run_stages
from vllm_nsa.kernels.triton.attend import attend
from vllm_nsa.kernels.triton.combine import combine
from vllm_nsa.kernels.triton.compress import check_inner_contiguous, compress, write_kv
from vllm_nsa.kernels.triton.plan import StepPlan, make_plan
from vllm_nsa.kernels.triton.score import score
from vllm_nsa.kernels.triton.select import select

__all__ = ["attend", "combine", "compress", "make_plan", "nsa_paged_attention", "score",
           "select", "write_kv", "StepPlan"]


def nsa_paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
                        block_table: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, config: NSAConfig, scale: float,
                        output: torch.Tensor, gated: bool, plan: StepPlan | None = None
                        ) -> torch.Tensor:
    """NSA for a batch of requests over the paged caches; see paged.nsa_paged_attention.
    plan: the step's launch plan (make_plan); a default one is made when None."""
    check_inner_contiguous(q, key_cache, value_cache, cmp_key_cache, cmp_value_cache, output)
    if plan is None:
        plan = make_plan(q, key_cache, value_cache, block_table, query_start_loc, config, gated)
    return run_stages(sys.modules[__name__], q, key_cache, value_cache, cmp_key_cache,
                      cmp_value_cache, block_table, query_start_loc, seq_lens, config, scale,
                      output, gated, plan)
