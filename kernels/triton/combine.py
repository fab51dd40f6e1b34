"""combine: merge the online-softmax partials of programs that split one row's keys (the
score stage's compressed scan and the attend stage's selected + window tiles, when a batch
has too few rows to fill the GPU). Twin: reference.combine_by_lse (two disjoint key sets;
here any number of splits)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nsa.kernels.triton.common import LN2, log2_sum_exp
from vllm_nsa.kernels.triton.launch import launch
from vllm_nsa.kernels.triton.plan import MAX_SPLITS, Partials


@triton.jit(do_not_specialize=["num_reqs", "num_splits"])
def _combine_kernel(
        part_max_ptr,       # [N, HQ, SETS, num_splits] float32 running max (base 2)
        part_sum_ptr,       # [N, HQ, SETS, num_splits] float32 running sum
        part_acc_ptr,       # [N, HQ, SETS, num_splits, DV] float32 unnormalised output
        qsl_ptr,            # [R+1] int32 query_start_loc
        out_ptr,            # set 0's output [N, HQ, DV] view (None: LSE only)
        lse_ptr,            # [N, HQ] float32 natural-log LSE of set 0 (None: not wanted)
        # strides (elements): out_set is the distance between the sets' outputs
        out_tok, out_head, out_set,
        num_reqs,
        num_heads,
        num_splits,
        DV: tl.constexpr,
        SETS: tl.constexpr,
        SPLITS_PAD: tl.constexpr):   # a power of two >= num_splits
    """Grid (N, HQ, SETS): one program merges the num_splits partials of one (token, head,
    set) into its normalised output and/or its LSE. Padding tokens are skipped."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    branch_set = tl.program_id(2)
    if token < tl.load(qsl_ptr + num_reqs):
        splits = tl.arange(0, SPLITS_PAD)
        part = ((token * num_heads + head) * SETS + branch_set) * num_splits + splits
        split_ok = splits < num_splits
        split_max = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
        total_max = tl.max(split_max, axis=0)
        weight = tl.exp2(split_max - tl.where(total_max == float("-inf"), 0.0, total_max))
        total_sum = tl.sum(weight * tl.load(part_sum_ptr + part, mask=split_ok, other=0.0),
                           axis=0)
        if lse_ptr is not None:
            tl.store(lse_ptr + token * num_heads + head,
                     log2_sum_exp(total_max, total_sum) * LN2)
        if out_ptr is not None:
            dv = tl.arange(0, DV)
            acc = tl.sum(weight[:, None] * tl.load(
                part_acc_ptr + part[:, None] * DV + dv[None, :], mask=split_ok[:, None],
                other=0.0), axis=0)
            result = acc / tl.where(total_sum > 0, total_sum, 1.0)
            tl.store(out_ptr + token * out_tok + head * out_head + branch_set * out_set + dv,
                     result.to(out_ptr.dtype.element_ty))


def combine(parts: Partials, query_start_loc: torch.Tensor, output: torch.Tensor | None,
            out_set: int, lse: torch.Tensor | None) -> None:
    """Merge `parts` into output (set s at output + s * out_set elements) and/or into
    lse (natural log, set 0). Padding tokens past the last request are left alone."""
    num_tokens, num_heads, sets, splits = parts.row_max.shape
    launch(_combine_kernel, (num_tokens, num_heads, sets),
        part_max_ptr=parts.row_max, part_sum_ptr=parts.row_sum, part_acc_ptr=parts.acc,
        qsl_ptr=query_start_loc, out_ptr=output, lse_ptr=lse,
        out_tok=output.stride(0) if output is not None else 0,
        out_head=output.stride(1) if output is not None else 0, out_set=out_set,
        num_reqs=query_start_loc.shape[0] - 1, num_heads=num_heads, num_splits=splits,
        DV=parts.acc.shape[-1] if parts.acc is not None else 16, SETS=sets,
        SPLITS_PAD=MAX_SPLITS)
