"""select: block importance from the compressed scores under the score stage's LSE, summed
over the G query heads of each KV head (group-consistent), forced initial and local blocks,
then the top-n blocks per (token, KV head). Twin: paged.select / reference.select.

Prefill keeps a running top-n per token while scanning (packed int64 keys, bitonic merge);
decode writes every block's score and `_select_topk_kernel` picks the top-n by bisecting
the n-th score's bit pattern. A split scan's per-split top-n are merged by
`_merge_topk_kernel`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.triton.common import (
    LOG2E,
    compressed_entries,
    num_compressed,
    request_of,
    tile_request,
    tile_rows,
)
from vllm_nsa.kernels.triton.plan import StepPlan, pow2


@triton.jit
def _overlap(entries, blocks, COMPRESS_BLOCK: tl.constexpr, COMPRESS_STRIDE: tl.constexpr,
             SELECT_BLOCK: tl.constexpr):
    """omega(i, j) = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d (spec Eq. 9), broadcast.
    Mirrors reference.overlap_weights."""
    lo = tl.maximum(entries * COMPRESS_STRIDE, blocks * SELECT_BLOCK)
    hi = tl.minimum(entries * COMPRESS_STRIDE + COMPRESS_BLOCK, (blocks + 1) * SELECT_BLOCK)
    return tl.maximum(hi - lo, 0).to(tl.float32) / COMPRESS_STRIDE


@triton.jit
def _keep_top(best, candidates, BLOCK_T: tl.constexpr, BB: tl.constexpr):
    """Per token, the BB largest of best ∪ candidates (both [BLOCK_T, BB]), sorted descending."""
    both = tl.reshape(tl.join(best, candidates), [BLOCK_T, 2 * BB])
    ranked = tl.sort(both, dim=1, descending=True)
    # Sorted descending, so the first half dominates the second element-wise.
    return tl.max(tl.reshape(ranked, [BLOCK_T, 2, BB]), axis=1)


@triton.jit
def _keys_to_indices(keys, rank, TOPK: tl.constexpr):
    """Sorted-descending keys -> ascending block indices of the first TOPK, -1 padded last."""
    big = 0x7FFFFFFF
    taken = (keys >= 0) & (rank < TOPK)
    # Truncating to int32 keeps the low half: 0x7FFFFFFF - block.
    blocks = tl.where(taken, 0x7FFFFFFF - keys.to(tl.int32), big)
    blocks = tl.sort(blocks)
    return tl.where(blocks == big, -1, blocks)


@triton.jit(do_not_specialize=["tiles_per_split"])
def _select_kernel(
        q_ptr,              # [N, HQ, D]
        cmp_key_ptr,        # [P, page_size / d, H, D]
        table_ptr,          # [R, max_pages] int32
        tile_req_ptr,       # [tiles] int32 (None: decode)
        tile_qoff_ptr,      # [tiles] int32 (None: decode)
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        lse_ptr,            # [N, HQ] float32 natural-log LSE from `score`
        indices_ptr,        # [N, H, TOPK] int32 out (prefill, unsplit)
        candidates_ptr,     # [N, H, SPLITS, BB] int64 out (prefill, split)
        block_scores_ptr,   # [N, H, NUM_BLOCKS_PAD] float32 out (decode)
        # strides (elements)
        q_tok, q_head, ck_page, ck_slot, ck_head, table_row,
        num_heads, num_kv_heads,
        tiles_per_split,    # scan tiles per split
        qk_scale,           # softmax scale * log2(e)
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
        PAGE_SIZE: tl.constexpr, COMPRESS_STRIDE: tl.constexpr,
        COMPRESS_BLOCK: tl.constexpr, SELECT_BLOCK: tl.constexpr,
        BC: tl.constexpr,   # compressed entries per scan tile
        BB: tl.constexpr,   # selection blocks per scan tile
        TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
        NUM_BLOCKS_PAD: tl.constexpr, SPLITS: tl.constexpr, DECODE: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Grid (query tiles, H, SPLITS), the score stage's tiles: one program rescans its
    split's compressed keys for BLOCK_T tokens x G heads, turns probabilities
    exp(s - LSE) into block importance (group sum, then omega), ranks forced blocks +inf,
    and keeps each token's top-n (prefill) or writes the block scores (decode).
    Mirrors paged.select."""
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
    lse = tl.load(lse_ptr + token64 * num_heads + head, mask=row_valid,
                  other=float("-inf")) * LOG2E
    safe_lse = tl.where(lse == float("-inf"), 0.0, lse)

    num_visible = num_compressed(last_position, COMPRESS_BLOCK, COMPRESS_STRIDE)
    toks = tl.arange(0, BLOCK_T)
    tok_valid = q_off + toks < q_len
    current_block = (context + q_off + toks) // SELECT_BLOCK                 # [BLOCK_T]
    num_tiles = tl.cdiv(last_position // SELECT_BLOCK + 1, BB)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    # The tile before a split's range only feeds the spill into the split's first block.
    first_tile = tl.where(tile_lo > 0, tile_lo - 1, 0)
    first_tile = tl.where(tile_lo < tile_hi, first_tile, tile_hi)
    token_ids = (tl.load(qsl_ptr + req) + q_off + toks).to(tl.int64)
    best = tl.full([BLOCK_T, BB], -1, tl.int64)
    spill = tl.zeros([BLOCK_T], tl.float32)
    block_offs = tl.arange(0, BB)
    for c in range(first_tile, tile_hi):
        entries = c * BC + tl.arange(0, BC)
        entry_ok = entries < num_visible
        keys = compressed_entries(cmp_key_ptr, table_ptr, req, table_row, entries, entry_ok,
                                  kv_head, ck_page, ck_slot, ck_head, PAGE_SIZE,
                                  COMPRESS_STRIDE, COMPRESS_BLOCK, D)
        scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale
        visible = ((entries[None, :] * COMPRESS_STRIDE + COMPRESS_BLOCK - 1
                    <= position[:, None]) & entry_ok[None, :] & row_valid[:, None])
        probs = tl.where(visible, tl.exp2(scores - safe_lse[:, None]), 0.0)
        blocks = c * BB + block_offs
        # omega is linear: sum the group's probabilities first (Eq. 10), then weight (Eq. 9).
        group_probs = tl.sum(tl.reshape(probs, [BLOCK_T, GP, BC]), axis=1)     # [BLOCK_T, BC]
        weights = _overlap(entries[:, None], blocks[None, :], COMPRESS_BLOCK, COMPRESS_STRIDE,
                           SELECT_BLOCK)
        if BLOCK_T >= 16:
            importance = tl.dot(group_probs, weights, input_precision="ieee")
        else:
            # Explicit fp32 products: Triton may lower this pattern to a tf32 dot at >= 16
            # rows, which reorders near-ties (seen on an H100).
            importance = tl.sum(group_probs[:, :, None] * weights[None, :, :], axis=1)
        importance += tl.where(block_offs[None, :] == 0, spill[:, None], 0.0)
        next_weights = _overlap(entries, c * BB + BB, COMPRESS_BLOCK, COMPRESS_STRIDE,
                                SELECT_BLOCK)
        spill = tl.sum(group_probs * next_weights[None, :], axis=1)
        candidate = (blocks[None, :] <= current_block[:, None]) & tok_valid[:, None]
        forced = candidate & ((blocks[None, :] < INIT_BLOCKS)
                              | (blocks[None, :] > current_block[:, None] - LOCAL_BLOCKS))
        ranked = tl.where(forced, float("inf"), importance)
        if DECODE:
            # One token per program: sorting per tile would dominate; the block scores go
            # out and `_select_topk_kernel` picks each row's top-n in one pass.
            tl.store(block_scores_ptr + (token_ids[:, None] * num_kv_heads + kv_head)
                     * NUM_BLOCKS_PAD + blocks[None, :], ranked,
                     mask=candidate & (blocks[None, :] >= tile_lo * BB))   # owned tiles
        else:
            # Non-negative floats order like their bit patterns; the low half
            # (0x7FFFFFFF - block) ranks the lower block first among equal scores.
            key = ((ranked.to(tl.int32, bitcast=True).to(tl.int64) << 32)
                   | (0x7FFFFFFF - blocks[None, :]).to(tl.int64))
            key = tl.where(candidate & (c >= tile_lo), key, -1)
            # Sort only when some token's candidate beats that token's worst kept key.
            improves = tl.sum((tl.max(key, axis=1) > tl.min(best, axis=1)).to(tl.int32),
                              axis=0)
            if improves > 0:
                best = _keep_top(best, key, BLOCK_T, BB)
    if not DECODE:
        if SPLITS == 1:
            indices = _keys_to_indices(best, block_offs[None, :], TOPK)
            tl.store(indices_ptr + (token_ids[:, None] * num_kv_heads + kv_head) * TOPK
                     + block_offs[None, :], indices,
                     mask=tok_valid[:, None] & (block_offs[None, :] < TOPK))
        else:
            tl.store(candidates_ptr + ((token_ids[:, None] * num_kv_heads + kv_head) * SPLITS
                                       + split) * BB + block_offs[None, :], best,
                     mask=tok_valid[:, None])


@triton.jit(do_not_specialize=["num_reqs"])
def _merge_topk_kernel(
        candidates_ptr,     # [N, H, SPLITS, BB] int64 packed (score bits, 0x7FFFFFFF - block)
        qsl_ptr,            # [R+1] int32 query_start_loc
        indices_ptr,        # [N, H, TOPK] int32 out
        num_reqs, num_kv_heads,
        SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BB: tl.constexpr,
        TOPK: tl.constexpr):
    """Grid (N, H): one program merges one (token, KV head)'s per-split top-n candidates
    into its ascending top-n indices. Padding tokens are skipped."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    if token < tl.load(qsl_ptr + num_reqs):
        offs = tl.arange(0, SPLITS_PAD * BB)
        keys = tl.load(candidates_ptr + (token * num_kv_heads + kv_head) * SPLITS * BB + offs,
                       mask=offs < SPLITS * BB, other=-1)
        keys = tl.sort(keys, descending=True)
        indices = _keys_to_indices(keys, offs, TOPK)
        tl.store(indices_ptr + (token * num_kv_heads + kv_head) * TOPK + offs, indices,
                 mask=offs < TOPK)


@triton.jit(do_not_specialize=["num_reqs"])
def _select_topk_kernel(
        block_scores_ptr,   # [N, H, NUM_BLOCKS_PAD] float32 (+inf forced, >= 0 otherwise)
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        indices_ptr,        # [N, H, TOPK] int32 out
        num_reqs, num_kv_heads,
        SELECT_BLOCK: tl.constexpr, NUM_BLOCKS_PAD: tl.constexpr, TOPK: tl.constexpr):
    """Grid (N, H), decode: the top-n blocks of one (token, KV head) score row (forced
    blocks score +inf; ties to the lower block), written ascending. The n-th largest score
    is found by bisecting its bit pattern (non-negative floats order like their bits): 31
    counting passes over the row instead of a sort. Padding tokens are skipped."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    req = request_of(qsl_ptr, num_reqs, token)
    if req >= 0:
        q_begin = tl.load(qsl_ptr + req)
        q_len = tl.load(qsl_ptr + req + 1) - q_begin
        position = tl.load(seq_lens_ptr + req) - q_len + (token - q_begin)
        row = token * num_kv_heads + kv_head
        blocks = tl.arange(0, NUM_BLOCKS_PAD)
        scores = tl.load(block_scores_ptr + row * NUM_BLOCKS_PAD + blocks,
                         mask=blocks <= position // SELECT_BLOCK, other=-1.0)
        bits = scores.to(tl.int32, bitcast=True)     # non-candidates (-1.0) are negative
        # Largest threshold t with at least TOPK candidates scoring >= t (0 if fewer).
        low = tl.zeros([], tl.int32)
        high = low + 0x7F800001                      # just above +inf
        for _ in range(31):
            mid = low + (high - low) // 2
            enough = tl.sum((bits >= mid).to(tl.int32), axis=0) >= TOPK
            low = tl.where(enough, mid, low)
            high = tl.where(enough, high, mid)
        above = bits > low
        ties = bits == low
        tie_rank = tl.cumsum(ties.to(tl.int32), axis=0) - 1
        take = above | (ties & (tie_rank < TOPK - tl.sum(above.to(tl.int32), axis=0)))
        slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(indices_ptr + row * TOPK + slot, blocks, mask=take)


def select(q: torch.Tensor, cmp_key_cache: torch.Tensor, block_table: torch.Tensor,
           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, lse: torch.Tensor,
           config: NSAConfig, scale: float, plan: StepPlan) -> torch.Tensor:
    """Block selection: block_indices [N, H, select_topk] int32, ascending, -1 padded.
    See paged.select."""
    block_indices = torch.full((plan.num_tokens, plan.num_kv_heads, config.select_topk), -1,
                               dtype=torch.int32, device=q.device)
    if plan.num_tokens == 0:
        return block_indices
    _select_kernel[(plan.num_q_tiles, plan.num_kv_heads, plan.scan_splits)](
        q_ptr=q, cmp_key_ptr=cmp_key_cache, table_ptr=block_table,
        tile_req_ptr=plan.tile_req, tile_qoff_ptr=plan.tile_qoff, qsl_ptr=query_start_loc,
        seq_lens_ptr=seq_lens, lse_ptr=lse, indices_ptr=block_indices,
        candidates_ptr=plan.select_candidates, block_scores_ptr=plan.block_scores,
        q_tok=q.stride(0), q_head=q.stride(1),
        ck_page=cmp_key_cache.stride(0), ck_slot=cmp_key_cache.stride(1),
        ck_head=cmp_key_cache.stride(2), table_row=block_table.stride(0),
        num_heads=plan.num_heads, num_kv_heads=plan.num_kv_heads,
        tiles_per_split=plan.tiles_per_split, qk_scale=scale * LOG2E.value,
        G=plan.group, GP=plan.group_pad, BLOCK_T=plan.block_t, D=plan.head_dim,
        PAGE_SIZE=plan.page_size, COMPRESS_STRIDE=config.compress_stride,
        COMPRESS_BLOCK=config.compress_block, SELECT_BLOCK=config.select_block,
        BC=plan.select_tile_entries, BB=plan.select_tile_blocks, TOPK=config.select_topk,
        INIT_BLOCKS=config.init_blocks, LOCAL_BLOCKS=config.local_blocks,
        NUM_BLOCKS_PAD=plan.num_blocks_pad, SPLITS=plan.scan_splits, DECODE=plan.decode,
        DOT_PRECISION=plan.dot_precision)
    grid = (plan.num_tokens, plan.num_kv_heads)
    if plan.decode:
        _select_topk_kernel[grid](
            block_scores_ptr=plan.block_scores, qsl_ptr=query_start_loc,
            seq_lens_ptr=seq_lens, indices_ptr=block_indices, num_reqs=plan.num_reqs,
            num_kv_heads=plan.num_kv_heads, SELECT_BLOCK=config.select_block,
            NUM_BLOCKS_PAD=plan.num_blocks_pad, TOPK=config.select_topk)
    elif plan.select_candidates is not None:
        _merge_topk_kernel[grid](
            candidates_ptr=plan.select_candidates, qsl_ptr=query_start_loc,
            indices_ptr=block_indices, num_reqs=plan.num_reqs, num_kv_heads=plan.num_kv_heads,
            SPLITS=plan.scan_splits, SPLITS_PAD=pow2(plan.scan_splits),
            BB=plan.select_tile_blocks, TOPK=config.select_topk)
    return block_indices
