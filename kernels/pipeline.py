"""The stage order of NSA over the paged caches, shared by the torch twin (`paged.py`) and
the Triton path (`triton/`): score -> select -> attend, each stage a function of the given
module with the same signature in both (kernels/README.md, "Stages")."""
from __future__ import annotations

import torch

from vllm_nsa.config import BRANCHES, NSAConfig


def output_views(output: torch.Tensor, gated: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(o_cmp, o_slc, o_win) views of the attention output: gated [N, HQ, 3, Dv] holds the
    three branches in BRANCHES order; merged [N, HQ, Dv] is one output (o_slc: selected
    blocks ∪ window) and no compressed or separate window output."""
    if not gated:
        return None, output, None
    return tuple(output[:, :, BRANCHES.index(name)] for name in BRANCHES)


def run_stages(stages, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
               block_table: torch.Tensor, query_start_loc: torch.Tensor,
               seq_lens: torch.Tensor, config: NSAConfig, scale: float,
               output: torch.Tensor, gated: bool, plan) -> torch.Tensor:
    """NSA for a batch of requests with `stages` (a module with score/select/attend);
    the scorer entries of this step must already be emitted (`compress`). Returns
    block_indices [N, H, select_topk] int32, ascending, -1 padded.

    selection_score "bounds" (merged mode only): cmp_key_cache / cmp_value_cache hold the
    block bounds (key min / max), and select_bounds replaces score + select."""
    o_cmp, o_slc, o_win = output_views(output, gated)
    if config.uses_bounds:
        if gated:
            raise ValueError("selection_score='bounds' is a merged-mode scorer; the gated "
                             "mode scores with its compressed branch")
        block_indices = stages.select_bounds(q, cmp_key_cache, cmp_value_cache, block_table,
                                             query_start_loc, seq_lens, config, scale,
                                             key_cache.shape[1], plan)
        stages.attend(q, key_cache, value_cache, block_table, query_start_loc, seq_lens,
                      block_indices, config, scale, o_slc, o_win, plan)
        return block_indices
    lse = stages.score(q, cmp_key_cache, cmp_value_cache, block_table, query_start_loc,
                       seq_lens, config, scale, o_cmp, plan)
    block_indices = stages.select(q, cmp_key_cache, block_table, query_start_loc, seq_lens,
                                  lse, config, scale, plan)
    stages.attend(q, key_cache, value_cache, block_table, query_start_loc, seq_lens,
                  block_indices, config, scale, o_slc, o_win, plan)
    return block_indices
