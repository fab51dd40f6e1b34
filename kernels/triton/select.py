"""select: block importance from the compressed scores under the score stage's LSE, summed
over the G query heads of each KV head (group-consistent), forced initial and local blocks,
then the top-n blocks per (token, KV head). Twin: paged.select / reference.select.

Prefill (`_select_kernel`) rescans the compressed keys and keeps a running top-n per token
(packed int64 keys, bitonic merge); a split scan's per-split top-n are merged by
`_merge_topk_kernel`. Decode (`_select_decode_kernel`) reads no compressed key: it turns the
score stage's per-tile block sums into block importance under the final LSE and picks the
top-n by bisecting the n-th score's bit pattern.

The "bounds" scorer (merged mode, no score stage) scores blocks by the group's Quest bound:
prefill tiles in `_select_bounds_kernel` (running top-n as `_select_kernel`); decode in two
launches, `_score_bounds_decode_kernel` (the scan split over programs per row, scores into
the plan's scratch row) and `_select_bounds_decode_kernel` (the same bisection per row).
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
    overlap,
    request_of,
    tile_request,
    tile_rows,
)
from vllm_nsa.kernels.triton.launch import launch
from vllm_nsa.kernels.triton.plan import StepPlan, pow2


@triton.jit
def _keep_top(best, candidates, BLOCK_T: tl.constexpr, BB: tl.constexpr):
    """Per token, the BB largest of best ∪ candidates (both [BLOCK_T, BB]), sorted
    descending. Sorts only when some token's candidate beats that token's worst kept key."""
    improves = tl.sum((tl.max(candidates, axis=1) > tl.min(best, axis=1)).to(tl.int32), axis=0)
    if improves > 0:
        both = tl.reshape(tl.join(best, candidates), [BLOCK_T, 2 * BB])
        ranked = tl.sort(both, dim=1, descending=True)
        # Sorted descending, so the first half dominates the second element-wise.
        best = tl.max(tl.reshape(ranked, [BLOCK_T, 2, BB]), axis=1)
    return best


@triton.jit
def _store_top(best, indices_ptr, candidates_ptr, token_ids, tok_valid, kv_head,
               num_kv_heads, split, num_splits, BB: tl.constexpr, TOPK: tl.constexpr):
    """A prefill tile's kept keys: unsplit, its tokens' TOPK block indices; split, the BB
    keys of this split for `_merge_topk_kernel`."""
    block_offs = tl.arange(0, BB)
    if candidates_ptr is None:
        indices = _keys_to_indices(best, block_offs[None, :], TOPK)
        tl.store(indices_ptr + (token_ids[:, None] * num_kv_heads + kv_head) * TOPK
                 + block_offs[None, :], indices,
                 mask=tok_valid[:, None] & (block_offs[None, :] < TOPK))
    else:
        tl.store(candidates_ptr + ((token_ids[:, None] * num_kv_heads + kv_head) * num_splits
                                   + split) * BB + block_offs[None, :], best,
                 mask=tok_valid[:, None])


@triton.jit
def _keys_to_indices(keys, rank, TOPK: tl.constexpr):
    """Sorted-descending keys -> ascending block indices of the first TOPK, -1 padded last."""
    big = 0x7FFFFFFF
    taken = (keys >= 0) & (rank < TOPK)
    # The low 31 bits are 0x7FFFFFFF - block (both packings: `_pack_keys`, `_bounds_keys`).
    blocks = tl.where(taken, 0x7FFFFFFF - (keys & 0x7FFFFFFF).to(tl.int32), big)
    blocks = tl.sort(blocks)
    return tl.where(blocks == big, -1, blocks)


@triton.jit
def _ordered(scores):
    """float32 -> int32 with the same order for every non-NaN value (negative floats
    order reversed by their bits: flip their magnitude bits); non-negative floats keep
    their bit pattern."""
    bits = scores.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _bounds_keys(ranked, blocks):
    """Packed int64 sort keys of signed scores (the "bounds" scorer's logits): the order
    of `ranked` as an unsigned 32-bit value in bits 31..62, 0x7FFFFFFF - block below (the
    lower block first among equal scores); always >= 0 (-1 marks a non-candidate)."""
    order = _ordered(ranked).to(tl.int64) + 2147483648
    return (order << 31) | (0x7FFFFFFF - blocks).to(tl.int64)


@triton.jit
def _decode_position(qsl_ptr, seq_lens_ptr, req, token):
    """Position of query token `token` of request `req` (its query tokens are the last
    of its seq_len tokens)."""
    q_begin = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_begin
    return tl.load(seq_lens_ptr + req) - q_len + (token - q_begin)


@triton.jit
def _top_n_of_row(scores_row, indices_row, num_blocks, TOPK: tl.constexpr,
                  CHUNK: tl.constexpr, SIGNED: tl.constexpr):
    """The TOPK largest of the num_blocks float32 scores at scores_row (no NaN; +inf for
    forced blocks), ties to the lower block, written ascending to indices_row (every store
    inside the row; a row of fewer blocks takes them all). The TOPK-th largest is found by
    bisecting its order-preserving int32 image (`_ordered`): 31 counting passes over
    [0, +inf] for non-negative scores, 32 over every float when SIGNED, CHUNK blocks at a
    time, so the work follows the row's length."""
    offs = tl.arange(0, CHUNK)
    # Largest threshold with at least TOPK blocks scoring >= it (the minimum if fewer).
    if SIGNED:
        low = tl.full([], -2147483648, tl.int64)
    else:
        low = tl.zeros([], tl.int64)
    high = low * 0 + 0x7F800001                       # just above +inf
    for _ in range(31 + SIGNED):
        mid = low + (high - low) // 2
        count = tl.zeros([], tl.int32)
        for start in range(0, num_blocks, CHUNK):
            blocks = start + offs
            in_row = blocks < num_blocks
            key = _ordered(tl.load(scores_row + blocks, mask=in_row, other=0.0))
            count += tl.sum((in_row & (key.to(tl.int64) >= mid)).to(tl.int32), axis=0)
        enough = count >= TOPK
        low = tl.where(enough, mid, low)
        high = tl.where(enough, high, mid)
    num_above = tl.zeros([], tl.int32)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + offs
        in_row = blocks < num_blocks
        key = _ordered(tl.load(scores_row + blocks, mask=in_row, other=0.0)).to(tl.int64)
        num_above += tl.sum((in_row & (key > low)).to(tl.int32), axis=0)
    tie_budget = TOPK - num_above
    ties_before = tl.zeros([], tl.int32)
    taken_before = tl.zeros([], tl.int32)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + offs
        in_row = blocks < num_blocks
        key = _ordered(tl.load(scores_row + blocks, mask=in_row, other=0.0)).to(tl.int64)
        ties = in_row & (key == low)
        tie_rank = ties_before + tl.cumsum(ties.to(tl.int32), axis=0) - 1
        take = (in_row & (key > low)) | (ties & (tie_rank < tie_budget))
        slot = taken_before + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(indices_row + slot, blocks, mask=take & (slot < TOPK))
        ties_before += tl.sum(ties.to(tl.int32), axis=0)
        taken_before += tl.sum(take.to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["num_splits"])
def _select_kernel(
        q_ptr,              # [N, HQ, D]
        cmp_key_ptr,        # [P, page_size / d, H, D]
        table_ptr,          # [R, max_pages] int32
        tile_req_ptr,       # [tiles] int32 (None: decode)
        tile_qoff_ptr,      # [tiles] int32 (None: decode)
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        lse_ptr,            # [N, HQ] float32 natural-log LSE from `score`
        indices_ptr,        # [N, H, TOPK] int32 out (unsplit)
        candidates_ptr,     # [N, H, num_splits, BB] int64 out (split; None: unsplit)
        # strides (elements)
        q_tok, q_head, ck_page, ck_slot, ck_head, table_row,
        num_heads, num_kv_heads,
        num_splits,         # programs sharing one query tile's scan
        qk_scale,           # softmax scale * log2(e)
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
        PAGE_SIZE: tl.constexpr, COMPRESS_STRIDE: tl.constexpr,
        COMPRESS_BLOCK: tl.constexpr, SELECT_BLOCK: tl.constexpr,
        BC: tl.constexpr,   # compressed entries per scan tile
        BB: tl.constexpr,   # selection blocks per scan tile
        TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Grid (query tiles, H, num_splits), the score stage's tiles (prefill and mixed batches):
    one program rescans its split's share of the compressed keys for BLOCK_T tokens x G
    heads, turns probabilities 2^(s - LSE) into block importance (group sum, then omega),
    ranks forced blocks +inf, and keeps each token's top-n. Mirrors paged.select."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req, q_off = tile_request(tile_req_ptr, tile_qoff_ptr, tile, False)
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
    # At most n candidate blocks: all are selected whatever the scores (read no key).
    num_visible = tl.where(last_position < TOPK * SELECT_BLOCK, 0, num_visible)
    toks = tl.arange(0, BLOCK_T)
    tok_valid = q_off + toks < q_len
    current_block = (context + q_off + toks) // SELECT_BLOCK                 # [BLOCK_T]
    num_tiles = tl.cdiv(last_position // SELECT_BLOCK + 1, BB)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
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
        weights = overlap(entries[:, None], blocks[None, :], COMPRESS_BLOCK, COMPRESS_STRIDE,
                          SELECT_BLOCK)
        if BLOCK_T >= 16:
            importance = tl.dot(group_probs, weights, input_precision="ieee")
        else:
            # Explicit fp32 products: Triton may lower this pattern to a tf32 dot at >= 16
            # rows, which reorders near-ties (seen on an H100).
            importance = tl.sum(group_probs[:, :, None] * weights[None, :, :], axis=1)
        importance += tl.where(block_offs[None, :] == 0, spill[:, None], 0.0)
        next_weights = overlap(entries, c * BB + BB, COMPRESS_BLOCK, COMPRESS_STRIDE,
                               SELECT_BLOCK)
        spill = tl.sum(group_probs * next_weights[None, :], axis=1)
        candidate = (blocks[None, :] <= current_block[:, None]) & tok_valid[:, None]
        forced = candidate & ((blocks[None, :] < INIT_BLOCKS)
                              | (blocks[None, :] > current_block[:, None] - LOCAL_BLOCKS))
        # NaN scores (a NaN query) rank as 0, below every real candidate.
        ranked = tl.where(forced, float("inf"), tl.where(importance == importance,
                                                         importance, 0.0))
        # Non-negative floats order like their bit patterns; the low half
        # (0x7FFFFFFF - block) ranks the lower block first among equal scores.
        key = ((ranked.to(tl.int32, bitcast=True).to(tl.int64) << 32)
               | (0x7FFFFFFF - blocks[None, :]).to(tl.int64))
        key = tl.where(candidate & (c >= tile_lo), key, -1)
        best = _keep_top(best, key, BLOCK_T, BB)
    _store_top(best, indices_ptr, candidates_ptr, token_ids, tok_valid, kv_head, num_kv_heads,
               split, num_splits, BB, TOPK)


@triton.jit(do_not_specialize=["num_reqs", "num_splits"])
def _merge_topk_kernel(
        candidates_ptr,     # [N, H, num_splits, BB] int64 packed (score bits, 0x7FFFFFFF - block)
        qsl_ptr,            # [R+1] int32 query_start_loc
        indices_ptr,        # [N, H, TOPK] int32 out
        num_reqs, num_kv_heads, num_splits,
        BB: tl.constexpr, TOPK: tl.constexpr):
    """Grid (N, H): one program merges one (token, KV head)'s per-split top-n candidates
    into its ascending top-n indices, one split at a time (`_keep_top`: a sort of 2 BB keys
    per split that improves, not one sort over every split's keys). Padding tokens are
    skipped."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    if token < tl.load(qsl_ptr + num_reqs):
        offs = tl.arange(0, BB)[None, :]
        row = candidates_ptr + (token * num_kv_heads + kv_head) * num_splits * BB
        best = tl.full([1, BB], -1, tl.int64)
        for split in range(num_splits):
            best = _keep_top(best, tl.load(row + split * BB + offs), 1, BB)
        indices = _keys_to_indices(best, offs, TOPK)
        tl.store(indices_ptr + (token * num_kv_heads + kv_head) * TOPK + offs, indices,
                 mask=offs < TOPK)


@triton.jit(do_not_specialize=["num_reqs"])
def _select_decode_kernel(
        own_sums_ptr,       # [N, HQ, blocks_row] float32: Σ ω(i, j) 2^(s_i - m_c), i in j
        spill_sums_ptr,     # [N, HQ, blocks_row] float32: Σ ω(i, j+1) 2^(s_i - m_c), i in j
        tile_max_ptr,       # [N, HQ, tiles_row] float32: m_c
        lse_ptr,            # [N, HQ] float32 natural-log LSE from `score`
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        block_scores_ptr,   # [N, H, blocks_row] float32 scratch: group importance
        indices_ptr,        # [N, H, TOPK] int32 out, pre-filled with -1
        blocks_row, tiles_row,
        num_reqs, num_heads, num_kv_heads,
        G: tl.constexpr, COMPRESS_BLOCK: tl.constexpr, COMPRESS_STRIDE: tl.constexpr,
        SELECT_BLOCK: tl.constexpr,
        BC: tl.constexpr,   # compressed entries per scan tile
        BB: tl.constexpr,   # selection blocks per scan tile
        TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
        CHUNK: tl.constexpr):
    """Grid (N, H), decode: one program owns one (token, KV head). Block importance of its
    blocks j <= t // l' is Σ_g 2^(m_c(j),g - LSE_g) own_g[j] + 2^(m_c(j-1),g - LSE_g)
    spill_g[j-1], summed over the group's G heads (c(j): j's scan tile); forced blocks +inf,
    NaN as 0; then `_top_n_of_row`: the n-th largest score by bisection, ties to the lower
    block, the n blocks written ascending, every store inside the row. Padding tokens are
    skipped.
    Mirrors paged.select."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    req = request_of(qsl_ptr, num_reqs, token)
    if req < 0:
        return
    position = _decode_position(qsl_ptr, seq_lens_ptr, req, token)
    current_block = position // SELECT_BLOCK
    num_blocks = current_block + 1
    # Scan tiles the score stage wrote for this row; later tiles hold no visible entry. At
    # most n candidate blocks: all are selected whatever the scores (none read).
    scanned_tiles = tl.cdiv(num_compressed(position, COMPRESS_BLOCK, COMPRESS_STRIDE), BC)
    scanned_tiles = tl.where(position < TOPK * SELECT_BLOCK, 0, scanned_tiles)
    row = token * num_kv_heads + kv_head
    scores_row = block_scores_ptr + row * blocks_row
    offs = tl.arange(0, CHUNK)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + offs
        in_row = blocks < num_blocks
        scanned = in_row & (blocks // BB < scanned_tiles)
        prev = blocks - 1
        prev_scanned = in_row & (prev >= 0) & (prev // BB < scanned_tiles)
        importance = tl.zeros([CHUNK], tl.float32)
        for g in tl.static_range(G):
            head_row = token * num_heads + kv_head * G + g
            lse = tl.load(lse_ptr + head_row) * LOG2E
            safe_lse = tl.where(lse == float("-inf"), 0.0, lse)
            own_max = tl.load(tile_max_ptr + head_row * tiles_row + blocks // BB,
                              mask=scanned, other=float("-inf"))
            own = tl.load(own_sums_ptr + head_row * blocks_row + blocks, mask=scanned,
                          other=0.0)
            prev_max = tl.load(tile_max_ptr + head_row * tiles_row + prev // BB,
                               mask=prev_scanned, other=float("-inf"))
            spill = tl.load(spill_sums_ptr + head_row * blocks_row + prev,
                            mask=prev_scanned, other=0.0)
            importance += (tl.exp2(own_max - safe_lse) * own
                           + tl.exp2(prev_max - safe_lse) * spill)
        forced = (blocks < INIT_BLOCKS) | (blocks > current_block - LOCAL_BLOCKS)
        ranked = tl.where(forced, float("inf"), tl.where(importance == importance,
                                                         importance, 0.0))
        tl.store(scores_row + blocks, ranked, mask=in_row)
    tl.debug_barrier()   # the row is re-read below by other threads of this program
    _top_n_of_row(scores_row, indices_ptr + row * TOPK, num_blocks, TOPK, CHUNK, False)


def select(q: torch.Tensor, cmp_key_cache: torch.Tensor, block_table: torch.Tensor,
           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, lse: torch.Tensor,
           config: NSAConfig, scale: float, plan: StepPlan) -> torch.Tensor:
    """Block selection: block_indices [N, H, select_topk] int32, ascending, -1 padded.
    See paged.select."""
    block_indices = plan.block_indices
    if plan.num_tokens == 0:
        return block_indices
    common = dict(COMPRESS_BLOCK=config.compress_block, COMPRESS_STRIDE=config.compress_stride,
                  SELECT_BLOCK=config.select_block, BC=plan.select_tile_entries,
                  BB=plan.select_tile_blocks, TOPK=config.select_topk,
                  INIT_BLOCKS=config.init_blocks, LOCAL_BLOCKS=config.local_blocks)
    grid = (plan.num_tokens, plan.num_kv_heads)
    if plan.decode:
        launch(_select_decode_kernel, grid,
            own_sums_ptr=plan.own_sums, spill_sums_ptr=plan.spill_sums,
            tile_max_ptr=plan.tile_max, lse_ptr=lse, qsl_ptr=query_start_loc,
            seq_lens_ptr=seq_lens, block_scores_ptr=plan.block_scores,
            indices_ptr=block_indices, blocks_row=plan.blocks_row, tiles_row=plan.tiles_row,
            num_reqs=plan.num_reqs, num_heads=plan.num_heads, num_kv_heads=plan.num_kv_heads,
            G=plan.group, CHUNK=min(pow2(plan.blocks_row), 1024), **common)
        return block_indices
    q_strides = q.stride()
    cmp_key_cache_strides = cmp_key_cache.stride()
    launch(_select_kernel, (plan.num_q_tiles, plan.num_kv_heads, plan.scan_splits),
        q_ptr=q, cmp_key_ptr=cmp_key_cache, table_ptr=block_table,
        tile_req_ptr=plan.tile_req, tile_qoff_ptr=plan.tile_qoff, qsl_ptr=query_start_loc,
        seq_lens_ptr=seq_lens, lse_ptr=lse, indices_ptr=block_indices,
        candidates_ptr=plan.select_candidates,
        q_tok=q_strides[0], q_head=q_strides[1],
        ck_page=cmp_key_cache_strides[0], ck_slot=cmp_key_cache_strides[1],
        ck_head=cmp_key_cache_strides[2], table_row=block_table.stride(0),
        num_heads=plan.num_heads, num_kv_heads=plan.num_kv_heads, num_splits=plan.scan_splits,
        qk_scale=scale * LOG2E.value,
        G=plan.group, GP=plan.group_pad, BLOCK_T=plan.block_t, D=plan.head_dim,
        PAGE_SIZE=plan.page_size, DOT_PRECISION=plan.dot_precision, **common)
    if plan.select_candidates is not None:
        launch(_merge_topk_kernel, grid,
            candidates_ptr=plan.select_candidates, qsl_ptr=query_start_loc,
            indices_ptr=block_indices, num_reqs=plan.num_reqs, num_kv_heads=plan.num_kv_heads,
            num_splits=plan.scan_splits, BB=plan.select_tile_blocks,
            TOPK=config.select_topk)
    return block_indices


# ---------------------------------------------------------------- the "bounds" scorer
@triton.jit
def _bounds_tile(min_ptr, max_ptr, table_ptr, req, table_row, blocks, load, kv_head,
                 mn_page, mn_slot, mn_head, mx_page, mx_slot, mx_head,
                 PAGE_SIZE: tl.constexpr, SELECT_BLOCK: tl.constexpr, D: tl.constexpr):
    """([len(blocks), D] key min, key max) of selection blocks (0 where not `load`): block
    j's bounds live in the page of its last token j*l' + l' - 1, slot (last % page) // l'."""
    last = blocks.to(tl.int64) * SELECT_BLOCK + SELECT_BLOCK - 1
    pages = tl.load(table_ptr + req * table_row + last // PAGE_SIZE, mask=load,
                    other=0).to(tl.int64)
    slots = (last % PAGE_SIZE) // SELECT_BLOCK
    d = tl.arange(0, D)
    k_min = tl.load(min_ptr + pages[:, None] * mn_page + slots[:, None] * mn_slot
                    + kv_head * mn_head + d[None, :], mask=load[:, None], other=0.0)
    k_max = tl.load(max_ptr + pages[:, None] * mx_page + slots[:, None] * mx_slot
                    + kv_head * mx_head + d[None, :], mask=load[:, None], other=0.0)
    return k_min, k_max


@triton.jit
def _folded_query(q_ptr, tokens64, tok_valid, first_head, q_tok, q_head,
                  BLOCK_T: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """A KV group's query folded for its summed bound: (sum_g max(q_g, 0), sum_g min(q_g,
    0)) of the G heads from first_head, per token, [BLOCK_T, D] float32 each (the heads
    one at a time: a G = 16 group never holds G x BLOCK_T rows)."""
    d = tl.arange(0, D)
    rows = q_ptr + tokens64[:, None] * q_tok + d[None, :]
    q_pos = tl.zeros([BLOCK_T, D], tl.float32)
    q_neg = tl.zeros([BLOCK_T, D], tl.float32)
    for g in tl.static_range(G):
        q = tl.load(rows + (first_head + g) * q_head, mask=tok_valid[:, None],
                    other=0.0).to(tl.float32)
        q_pos += tl.maximum(q, 0.0)
        q_neg += tl.minimum(q, 0.0)
    return q_pos, q_neg


@triton.jit(do_not_specialize=["num_splits"])
def _select_bounds_kernel(
        q_ptr,              # [N, HQ, D]
        min_ptr,            # [P, bounds_per_page, H, D] key min per block
        max_ptr,            # [P, bounds_per_page, H, D] key max per block
        table_ptr,          # [R, max_pages] int32
        tile_req_ptr,       # [tiles] int32
        tile_qoff_ptr,      # [tiles] int32
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        indices_ptr,        # [N, H, TOPK] int32 out (unsplit)
        candidates_ptr,     # [N, H, num_splits, BB] int64 out (split; None: unsplit)
        # strides (elements)
        q_tok, q_head, mn_page, mn_slot, mn_head, mx_page, mx_slot, mx_head, table_row,
        num_kv_heads,
        num_splits,         # programs sharing one query tile's scan
        scale,              # softmax scale (the bounds are scaled logits)
        G: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
        PAGE_SIZE: tl.constexpr, SELECT_BLOCK: tl.constexpr,
        BB: tl.constexpr,   # selection blocks per scan tile
        TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Grid (select tiles, H, num_splits), prefill and mixed batches, "bounds" scorer: one
    program scores its split's share of the blocks for BLOCK_T tokens (the plan's select
    tiles: one row per token whatever G) of one KV head by the group's summed Quest bound
    s * ((sum_g q_g+) . max + (sum_g q_g-) . min), ranks forced blocks +inf, and keeps each
    token's top-n (packed keys, bitonic merge, as `_select_kernel`). Tiles whose tokens have
    at most n candidates read nothing (all blocks are taken). Mirrors paged.select_bounds."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req, q_off = tile_request(tile_req_ptr, tile_qoff_ptr, tile, False)
    if req < 0:
        return
    q_begin = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_begin
    context = tl.load(seq_lens_ptr + req) - q_len
    last_position = context + tl.minimum(q_off + BLOCK_T, q_len) - 1
    toks = tl.arange(0, BLOCK_T)
    tok_valid = q_off + toks < q_len
    token_ids = (q_begin + q_off + toks).to(tl.int64)
    q_pos, q_neg = _folded_query(q_ptr, token_ids, tok_valid, kv_head * G, q_tok, q_head,
                                 BLOCK_T, G, D)
    # Blocks complete at the tile's last token have bounds; none are read when every token
    # has at most n candidates.
    num_bounded = tl.where(last_position < TOPK * SELECT_BLOCK, 0,
                           (last_position + 1) // SELECT_BLOCK)
    current_block = (context + q_off + toks) // SELECT_BLOCK                 # [BLOCK_T]
    num_tiles = tl.cdiv(last_position // SELECT_BLOCK + 1, BB)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    best = tl.full([BLOCK_T, BB], -1, tl.int64)
    block_offs = tl.arange(0, BB)
    for c in range(tile_lo, tile_hi):
        blocks = c * BB + block_offs
        k_min, k_max = _bounds_tile(min_ptr, max_ptr, table_ptr, req, table_row, blocks,
                                    blocks < num_bounded, kv_head, mn_page, mn_slot,
                                    mn_head, mx_page, mx_slot, mx_head, PAGE_SIZE,
                                    SELECT_BLOCK, D)
        k_min = k_min.to(tl.float32)
        k_max = k_max.to(tl.float32)
        bound = (tl.dot(q_pos, tl.trans(k_max), input_precision=DOT_PRECISION)
                 + tl.dot(q_neg, tl.trans(k_min), input_precision=DOT_PRECISION)) * scale
        candidate = (blocks[None, :] <= current_block[:, None]) & tok_valid[:, None]
        forced = candidate & ((blocks[None, :] < INIT_BLOCKS)
                              | (blocks[None, :] > current_block[:, None] - LOCAL_BLOCKS))
        # NaN (a NaN query) ranks below every real score.
        ranked = tl.where(forced, float("inf"), tl.where(bound == bound, bound,
                                                         float("-inf")))
        key = tl.where(candidate, _bounds_keys(ranked, blocks[None, :]), -1)
        best = _keep_top(best, key, BLOCK_T, BB)
    _store_top(best, indices_ptr, candidates_ptr, token_ids, tok_valid, kv_head, num_kv_heads,
               split, num_splits, BB, TOPK)


@triton.jit(do_not_specialize=["num_reqs", "num_splits"])
def _score_bounds_decode_kernel(
        q_ptr,              # [N, HQ, D]
        min_ptr,            # [P, bounds_per_page, H, D]
        max_ptr,            # [P, bounds_per_page, H, D]
        table_ptr,          # [R, max_pages] int32
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        block_scores_ptr,   # [N, H, blocks_row] float32 out: group bounds
        q_tok, q_head, mn_page, mn_slot, mn_head, mx_page, mx_slot, mx_head, table_row,
        blocks_row, num_reqs, num_kv_heads,
        num_splits,         # programs sharing one row's blocks
        scale,
        G: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        SELECT_BLOCK: tl.constexpr, TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr,
        LOCAL_BLOCKS: tl.constexpr,
        BB: tl.constexpr):  # selection blocks per scan tile
    """Grid (N, H, num_splits), decode, "bounds" scorer: one program owns one (token, KV
    head) x the split'th share of the scan tiles of BB blocks its row reaches (shares
    follow each request's own context; splits past them exit): the group's summed bound of
    each non-forced complete block (forced blocks +inf, read nothing; NaN -inf) into the
    scratch row, every store inside the row. Rows of at most n candidates read and write
    nothing (`_select_bounds_decode_kernel` takes every block). Padding tokens are
    skipped."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = request_of(qsl_ptr, num_reqs, token)
    if req < 0:
        return
    current_block = _decode_position(qsl_ptr, seq_lens_ptr, req, token) // SELECT_BLOCK
    num_blocks = current_block + 1
    num_tiles = tl.where(num_blocks <= TOPK, 0, tl.cdiv(num_blocks, BB))
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    if tile_lo >= tile_hi:
        return
    one = tl.arange(0, 1)
    q_pos, q_neg = _folded_query(q_ptr, token + one, one < 1, kv_head * G, q_tok, q_head,
                                 1, G, D)
    scores_row = block_scores_ptr + (token * num_kv_heads + kv_head) * blocks_row
    for c in range(tile_lo, tile_hi):
        blocks = c * BB + tl.arange(0, BB)
        in_row = blocks < num_blocks
        forced = (blocks < INIT_BLOCKS) | (blocks > current_block - LOCAL_BLOCKS)
        k_min, k_max = _bounds_tile(min_ptr, max_ptr, table_ptr, req, table_row, blocks,
                                    in_row & ~forced, kv_head, mn_page, mn_slot, mn_head,
                                    mx_page, mx_slot, mx_head, PAGE_SIZE, SELECT_BLOCK, D)
        bound = tl.sum(q_pos * k_max.to(tl.float32) + q_neg * k_min.to(tl.float32),
                       axis=1) * scale
        ranked = tl.where(forced, float("inf"), tl.where(bound == bound, bound,
                                                         float("-inf")))
        tl.store(scores_row + blocks, ranked, mask=in_row)


@triton.jit(do_not_specialize=["num_reqs"])
def _select_bounds_decode_kernel(
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        block_scores_ptr,   # [N, H, blocks_row] float32: `_score_bounds_decode_kernel`'s
        indices_ptr,        # [N, H, TOPK] int32 out, pre-filled with -1
        blocks_row, num_reqs, num_kv_heads,
        SELECT_BLOCK: tl.constexpr, TOPK: tl.constexpr, CHUNK: tl.constexpr):
    """Grid (N, H), decode, "bounds" scorer: one program owns one (token, KV head) and
    picks the top-n of its scored row by `_top_n_of_row` over signed scores; at most n
    candidates: every block, nothing read. Padding tokens are skipped. With
    `_score_bounds_decode_kernel`, mirrors paged.select_bounds."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    req = request_of(qsl_ptr, num_reqs, token)
    if req < 0:
        return
    num_blocks = _decode_position(qsl_ptr, seq_lens_ptr, req, token) // SELECT_BLOCK + 1
    row = token * num_kv_heads + kv_head
    if num_blocks <= TOPK:
        for start in range(0, num_blocks, CHUNK):
            blocks = start + tl.arange(0, CHUNK)
            tl.store(indices_ptr + row * TOPK + blocks, blocks, mask=blocks < num_blocks)
    else:
        _top_n_of_row(block_scores_ptr + row * blocks_row, indices_ptr + row * TOPK,
                      num_blocks, TOPK, CHUNK, True)


def select_bounds(q: torch.Tensor, bound_min_cache: torch.Tensor,
                  bound_max_cache: torch.Tensor, block_table: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, config: NSAConfig,
                  scale: float, page_size: int, plan: StepPlan) -> torch.Tensor:
    """Block selection with the "bounds" scorer (merged mode, no score stage):
    block_indices [N, H, select_topk] int32, ascending, -1 padded. See paged.select_bounds."""
    block_indices = plan.block_indices
    if plan.num_tokens == 0:
        return block_indices
    q_strides = q.stride()
    bound_min_cache_strides = bound_min_cache.stride()
    bound_max_cache_strides = bound_max_cache.stride()
    common = dict(
        q_ptr=q, min_ptr=bound_min_cache, max_ptr=bound_max_cache, table_ptr=block_table,
        qsl_ptr=query_start_loc, seq_lens_ptr=seq_lens, q_tok=q_strides[0],
        q_head=q_strides[1], mn_page=bound_min_cache_strides[0],
        mn_slot=bound_min_cache_strides[1], mn_head=bound_min_cache_strides[2],
        mx_page=bound_max_cache_strides[0], mx_slot=bound_max_cache_strides[1],
        mx_head=bound_max_cache_strides[2], table_row=block_table.stride(0),
        num_kv_heads=plan.num_kv_heads, scale=scale, G=plan.group,
        D=plan.head_dim, PAGE_SIZE=page_size, SELECT_BLOCK=config.select_block,
        TOPK=config.select_topk, INIT_BLOCKS=config.init_blocks,
        LOCAL_BLOCKS=config.local_blocks)
    grid = (plan.num_tokens, plan.num_kv_heads)
    if plan.decode:
        launch(_score_bounds_decode_kernel, (*grid, plan.scan_splits),
            block_scores_ptr=plan.block_scores, blocks_row=plan.blocks_row,
            num_reqs=plan.num_reqs, num_splits=plan.scan_splits,
            BB=plan.select_tile_blocks, **common)
        launch(_select_bounds_decode_kernel, grid,
            qsl_ptr=query_start_loc, seq_lens_ptr=seq_lens, block_scores_ptr=plan.block_scores,
            indices_ptr=block_indices, blocks_row=plan.blocks_row, num_reqs=plan.num_reqs,
            num_kv_heads=plan.num_kv_heads, SELECT_BLOCK=config.select_block,
            TOPK=config.select_topk, CHUNK=min(pow2(plan.blocks_row), 1024))
        return block_indices
    launch(_select_bounds_kernel, (plan.num_select_tiles, plan.num_kv_heads, plan.scan_splits),
        tile_req_ptr=plan.select_tile_req, tile_qoff_ptr=plan.select_tile_qoff,
        indices_ptr=block_indices, candidates_ptr=plan.select_candidates,
        num_splits=plan.scan_splits, BLOCK_T=plan.select_block_t, BB=plan.select_tile_blocks,
        DOT_PRECISION=plan.dot_precision, **common)
    if plan.select_candidates is not None:
        launch(_merge_topk_kernel, grid,
            candidates_ptr=plan.select_candidates, qsl_ptr=query_start_loc,
            indices_ptr=block_indices, num_reqs=plan.num_reqs, num_kv_heads=plan.num_kv_heads,
            num_splits=plan.scan_splits, BB=plan.select_tile_blocks,
            TOPK=config.select_topk)
    return block_indices
