"""score: compressed attention of every query row over its C(t) visible compressed keys,
giving the row's LSE (and o_cmp in gated mode). Twin: paged.score / reference.score.

Decode batches also keep what block selection needs from this single read of the
compressed keys: per scan tile c and query head, for each selection block j of the tile,
the sums over the entries starting in j of omega(i, j) 2^(s_i - m_c) (own) and of
omega(i, j+1) 2^(s_i - m_c) (spill into the next block), and the tile's reference max
m_c. `select` turns them into block importance once the LSE is final (kernels/README.md,
"Decode: one read").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.triton.combine import combine
from vllm_nsa.kernels.triton.common import (
    LN2,
    LOG2E,
    compressed_entries,
    log2_sum_exp,
    normalise,
    num_compressed,
    online_softmax_step,
    store_partial,
    tile_request,
    tile_rows,
)
from vllm_nsa.kernels.triton.launch import launch
from vllm_nsa.kernels.triton.plan import StepPlan


@triton.jit(do_not_specialize=["num_splits"])
def _score_kernel(
        q_ptr,              # [N, HQ, D]
        cmp_key_ptr,        # [P, page_size / d, H, D]
        cmp_value_ptr,      # [P, page_size / d, H, DV] (read when WRITE_CMP)
        table_ptr,          # [R, max_pages] int32
        tile_req_ptr,       # [tiles] int32 request of each query tile (None: decode)
        tile_qoff_ptr,      # [tiles] int32 first query offset of each tile (None: decode)
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        lse_ptr,            # [N, HQ] float32 natural-log LSE (unsplit; None: split)
        o_cmp_ptr,          # [N, HQ, DV] view (unsplit, WRITE_CMP)
        part_max_ptr,       # [N, HQ, 1, num_splits] (split)
        part_sum_ptr,       # [N, HQ, 1, num_splits] (split)
        part_acc_ptr,       # [N, HQ, 1, num_splits, DV] (split, WRITE_CMP)
        own_sums_ptr,       # [N, HQ, blocks_row] float32 out (KEEP_BLOCK_SUMS)
        spill_sums_ptr,     # [N, HQ, blocks_row] float32 out (KEEP_BLOCK_SUMS)
        tile_max_ptr,       # [N, HQ, tiles_row] float32 out: m_c (KEEP_BLOCK_SUMS)
        # strides (elements)
        q_tok, q_head, ck_page, ck_slot, ck_head, cv_page, cv_slot, cv_head, table_row,
        o_tok, o_head, blocks_row, tiles_row,
        num_heads,
        num_splits,         # programs sharing one query tile's scan
        qk_scale,           # softmax scale * log2(e)
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr,
        D: tl.constexpr, DV: tl.constexpr, PAGE_SIZE: tl.constexpr,
        COMPRESS_STRIDE: tl.constexpr, COMPRESS_BLOCK: tl.constexpr,
        SELECT_BLOCK: tl.constexpr,
        DENSE_BELOW: tl.constexpr,  # merged: positions < n*l' need no LSE (0 when gated)
        BC: tl.constexpr,   # compressed entries per scan tile
        BB: tl.constexpr,   # selection blocks per scan tile (BC * d / l')
        DECODE: tl.constexpr, WRITE_CMP: tl.constexpr,
        KEEP_BLOCK_SUMS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (query tiles, H, num_splits): one program owns a tile of BLOCK_T query tokens x the
    G query heads of one KV head, and the split'th share of the scan tiles its rows can
    see (shares follow each request's own context); online softmax over them. Unsplit it
    writes LSE (and o_cmp); split it writes partials that `combine` merges. With
    KEEP_BLOCK_SUMS (decode) it also writes each scan tile's block sums (own and spill)
    and reference max. Mirrors paged.score."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req, q_off = tile_request(tile_req_ptr, tile_qoff_ptr, tile, DECODE)
    if req < 0:
        return
    q_len, context, token, group_head, position, row_valid, last_position = \
        tile_rows(qsl_ptr, seq_lens_ptr, req, q_off, G, GP, BLOCK_T)
    head = kv_head * G + group_head
    token64 = token.to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + token64[:, None] * q_tok + head[:, None] * q_head + d[None, :],
                mask=row_valid[:, None], other=0.0)
    num_visible = num_compressed(last_position, COMPRESS_BLOCK, COMPRESS_STRIDE)
    # Rows that select every block whatever the scores skip the read (NSAConfig.dense_tokens).
    num_visible = tl.where(last_position < DENSE_BELOW, 0, num_visible)
    num_tiles = tl.cdiv(num_visible, BC)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    head_row = token64 * num_heads + head
    row_max = tl.full([BLOCK_T * GP], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_T * GP], tl.float32)
    acc = tl.zeros([BLOCK_T * GP, DV], tl.float32)
    for c in range(tile_lo, tile_hi):
        entries = c * BC + tl.arange(0, BC)
        entry_ok = entries < num_visible
        keys = compressed_entries(cmp_key_ptr, table_ptr, req, table_row, entries, entry_ok,
                                  kv_head, ck_page, ck_slot, ck_head, PAGE_SIZE,
                                  COMPRESS_STRIDE, COMPRESS_BLOCK, D)
        scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale
        visible = ((entries[None, :] * COMPRESS_STRIDE + COMPRESS_BLOCK - 1
                    <= position[:, None]) & entry_ok[None, :])
        scores = tl.where(visible, scores, float("-inf"))
        values = keys
        if WRITE_CMP:
            values = compressed_entries(cmp_value_ptr, table_ptr, req, table_row, entries,
                                        entry_ok, kv_head, cv_page, cv_slot, cv_head,
                                        PAGE_SIZE, COMPRESS_STRIDE, COMPRESS_BLOCK, DV)
        row_max, row_sum, acc, probs, reference_max = online_softmax_step(
            scores, values, row_max, row_sum, acc, WRITE_CMP, DOT_PRECISION)
        if KEEP_BLOCK_SUMS:
            # Entry k of a block starts k*d into it: omega = its overlap with the block
            # (own) and with the next one (spill), spec Eq. 9 (reference.overlap_weights).
            PER_BLOCK: tl.constexpr = SELECT_BLOCK // COMPRESS_STRIDE
            k = tl.arange(0, PER_BLOCK)
            own_weight = tl.minimum(COMPRESS_BLOCK, SELECT_BLOCK - k * COMPRESS_STRIDE)
            spill_weight = tl.maximum(k * COMPRESS_STRIDE + COMPRESS_BLOCK - SELECT_BLOCK, 0)
            by_block = tl.reshape(probs, [BLOCK_T * GP, BB, PER_BLOCK])
            own = tl.sum(by_block * (own_weight.to(tl.float32) / COMPRESS_STRIDE)[None, None, :],
                         axis=2)
            spill = tl.sum(by_block
                           * (spill_weight.to(tl.float32) / COMPRESS_STRIDE)[None, None, :],
                           axis=2)
            sums_at = head_row[:, None] * blocks_row + (c * BB + tl.arange(0, BB))[None, :]
            tl.store(own_sums_ptr + sums_at, own, mask=row_valid[:, None])
            tl.store(spill_sums_ptr + sums_at, spill, mask=row_valid[:, None])
            tl.store(tile_max_ptr + head_row * tiles_row + c, reference_max, mask=row_valid)
    if lse_ptr is not None:
        tl.store(lse_ptr + head_row, log2_sum_exp(row_max, row_sum) * LN2, mask=row_valid)
        if WRITE_CMP:
            dv = tl.arange(0, DV)
            tl.store(o_cmp_ptr + token64[:, None] * o_tok + head[:, None] * o_head
                     + dv[None, :], normalise(acc, row_sum).to(o_cmp_ptr.dtype.element_ty),
                     mask=row_valid[:, None])
    else:
        store_partial(part_max_ptr, part_sum_ptr, part_acc_ptr, head_row * num_splits + split,
                      row_max, row_sum, acc, row_valid, DV, WRITE_CMP)


def score(q: torch.Tensor, cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
          block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
          config: NSAConfig, scale: float, o_cmp: torch.Tensor | None, plan: StepPlan
          ) -> torch.Tensor:
    """Compressed attention: returns plan.lse [N, HQ] (natural log) and writes o_cmp when
    given (gated). See paged.score."""
    if plan.num_tokens == 0:
        return plan.lse
    parts = plan.score_parts
    split = parts is not None
    q_strides = q.stride()
    cmp_key_cache_strides = cmp_key_cache.stride()
    cmp_value_cache_strides = cmp_value_cache.stride()
    launch(_score_kernel, (plan.num_q_tiles, plan.num_kv_heads, plan.scan_splits),
        q_ptr=q, cmp_key_ptr=cmp_key_cache, cmp_value_ptr=cmp_value_cache,
        table_ptr=block_table, tile_req_ptr=plan.tile_req, tile_qoff_ptr=plan.tile_qoff,
        qsl_ptr=query_start_loc, seq_lens_ptr=seq_lens,
        lse_ptr=None if split else plan.lse, o_cmp_ptr=None if split else o_cmp,
        part_max_ptr=parts.row_max if split else None,
        part_sum_ptr=parts.row_sum if split else None,
        part_acc_ptr=parts.acc if split else None,
        own_sums_ptr=plan.own_sums, spill_sums_ptr=plan.spill_sums,
        tile_max_ptr=plan.tile_max,
        q_tok=q_strides[0], q_head=q_strides[1],
        ck_page=cmp_key_cache_strides[0], ck_slot=cmp_key_cache_strides[1],
        ck_head=cmp_key_cache_strides[2],
        cv_page=cmp_value_cache_strides[0], cv_slot=cmp_value_cache_strides[1],
        cv_head=cmp_value_cache_strides[2], table_row=block_table.stride(0),
        o_tok=o_cmp.stride(0) if o_cmp is not None else 0,
        o_head=o_cmp.stride(1) if o_cmp is not None else 0,
        blocks_row=plan.blocks_row, tiles_row=plan.tiles_row, num_heads=plan.num_heads,
        num_splits=plan.scan_splits,
        qk_scale=scale * LOG2E.value,
        G=plan.group, GP=plan.group_pad, BLOCK_T=plan.block_t, D=plan.head_dim,
        DV=plan.value_dim, PAGE_SIZE=plan.page_size,
        COMPRESS_STRIDE=config.compress_stride, COMPRESS_BLOCK=config.compress_block,
        SELECT_BLOCK=config.select_block,
        DENSE_BELOW=0 if o_cmp is not None else config.dense_tokens,
        BC=plan.select_tile_entries,
        BB=plan.select_tile_blocks, DECODE=plan.decode,
        WRITE_CMP=o_cmp is not None, KEEP_BLOCK_SUMS=plan.own_sums is not None,
        DOT_PRECISION=plan.dot_precision)
    if split:
        combine(parts, query_start_loc, o_cmp, 0, plan.lse)
    return plan.lse
