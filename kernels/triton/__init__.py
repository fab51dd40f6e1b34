"""NSA over vLLM's paged caches in Triton, one module per stage (kernels/README.md):

  compress.py  write_kv, compress   raw K/V store; phi = mean -> compressed cache
  score.py     score                compressed attention -> LSE (+ o_cmp when gated)
  select.py    select               block importance, forced blocks, top-n
               select_bounds        the "bounds" scorer's selection (no score stage)
  bounds.py    write_bounds         per-block key min/max -> bounds cache ("bounds")
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
from vllm_nsa.kernels.triton.select import select, select_bounds

__all__ = ["attend", "combine", "compress", "make_plan", "nsa_paged_attention", "score",
           "select", "select_bounds", "warm_up", "write_kv", "StepPlan"]


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


def warm_up(key_cache: torch.Tensor, value_cache: torch.Tensor, cmp_key_cache: torch.Tensor,
            cmp_value_cache: torch.Tensor, num_heads: int, block_table_width: int,
            config: NSAConfig, gated: bool) -> int:
    """Compile every kernel variant a served step can launch, before serving: the
    variants differ only by decode vs prefill tiles and split vs unsplit programs (split
    counts, batch sizes and context lengths are runtime arguments). The caches must have
    the strides of the real ones (a view of the same padded page layout); every request
    reads page 0. block_table_width: the engine's block-table width, so the selection
    scratch rows have their served size. Returns the number of batches run."""
    device = key_cache.device
    page_size, num_kv_heads, head_dim = key_cache.shape[1:]
    value_dim = value_cache.shape[3]
    dtype = key_cache.dtype
    seq_len = min(block_table_width, 4) * page_size
    block_table = torch.zeros((2, block_table_width), dtype=torch.int32, device=device)
    seq_lens = torch.full((2,), seq_len, dtype=torch.int32, device=device)
    slot_mapping = torch.arange(2, device=device) - 1            # a padding slot and slot 0
    write_kv(torch.zeros(2, num_kv_heads, head_dim, dtype=dtype, device=device),
             torch.zeros(2, num_kv_heads, value_dim, dtype=dtype, device=device),
             key_cache, value_cache, slot_mapping)
    emit = torch.tensor([0, -1], dtype=torch.int32, device=device)
    compress(key_cache, value_cache, cmp_key_cache, cmp_value_cache, block_table, emit,
             emit.abs(), config)
    batches = 0
    for query_len in (1, 3):           # decode tiles, prefill tiles
        qsl = torch.arange(3, dtype=torch.int32, device=device) * query_len
        q = torch.zeros((2 * query_len, num_heads, head_dim), dtype=dtype, device=device)
        shape = (q.shape[0], num_heads, 3, value_dim) if gated else (q.shape[0], num_heads,
                                                                      value_dim)
        output = torch.empty(shape, dtype=dtype, device=device)
        for num_splits in (1, 2):
            plan = make_plan(q, key_cache, value_cache, block_table, qsl, config, gated,
                             max_query_len=query_len, num_splits=num_splits)
            nsa_paged_attention(q, key_cache, value_cache, cmp_key_cache, cmp_value_cache,
                                block_table, qsl, seq_lens, config, 1.0, output, gated, plan)
            batches += 1
    return batches
