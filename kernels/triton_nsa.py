"""NSA over vLLM's paged caches, in Triton: the CUDA twin of `paged.py` (same names, same
positional signatures, same semantics; cache layout in paged.py's docstring).

Kernels (one launch each):
- `_compress_kernel`: phi = mean over each completed compression window -> compressed cache.
- `_compressed_scan_kernel` (pass 1): online-softmax scan of the compressed cache for a tile of
  query tokens x all G query heads of one KV head; gives each row's LSE and o_cmp. Long scans
  can be split across programs (decode with few requests), partials merged in pass 2.
- `_block_select_kernel` (pass 2): rescans the compressed keys with the final LSE, turns the
  probabilities into block importance with the spec's overlap weights, sums them over the
  group (GQA-consistent), and keeps a running top-n per token (forced blocks first, ties to the
  lower index) as packed int64 keys merged with a bitonic sort.
- `_merge_topk_kernel`: merges per-split top-n candidates when the scan was split.
- `_select_topk_kernel` (decode): pass 2 writes every block's score instead of sorting per
  tile; this picks each row's top-n by bisecting the n-th score.
- `_sparse_attention_kernel`: per (token, KV head) with all G query heads: selected blocks
  through the block table, then the sliding window, online softmax. Merged mode skips window
  tiles whose selection block was already attended (no double counting); branches mode keeps
  a separate window accumulator. With few tokens (decode) the tile list is split across
  programs and `_combine_splits_kernel` merges their partials.
Decode batches (max_query_len 1) index requests by program id, and token -> request lookups
are binary searches inside the kernels: no per-layer torch ops besides the launches.

Everything is launched with host-known sizes only (tensor shapes, config, optional hints):
no host syncs and no data-dependent allocation, so decode can be captured in a CUDA graph.
The module imports without a GPU; kernels compile on first launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nsa.config import NSAConfig

_LOG2E = 1.4426950408889634
# Rows of the query tile in the tensor-core dots (tl.dot needs >= 16).
_MIN_ROWS = 16
# Integer arguments that change with the batch are marked do_not_specialize: Triton would
# otherwise compile a new variant when one first equals 1 or becomes a multiple of 16, a
# multi-second stall in the middle of serving.


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _compress_kernel(key_ptr, value_ptr, cmp_key_ptr, cmp_value_ptr, table_ptr,
                     emit_req_ptr, emit_index_ptr,
                     k_page, k_slot, k_head, v_page, v_slot, v_head,
                     ck_page, ck_slot, ck_head, cv_page, cv_slot, cv_head, table_row,
                     PAGE_SIZE: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr,
                     WINDOW_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    entry = tl.program_id(0)
    head = tl.program_id(1)
    req = tl.load(emit_req_ptr + entry)
    if req >= 0:
        start = tl.load(emit_index_ptr + entry).to(tl.int64) * STRIDE
        offs = tl.arange(0, WINDOW_PAD)
        in_window = offs < WINDOW
        positions = start + offs
        pages = tl.load(table_ptr + req * table_row + positions // PAGE_SIZE, mask=in_window,
                        other=0).to(tl.int64)
        slots = positions % PAGE_SIZE
        last = start + WINDOW - 1
        dest_page = tl.load(table_ptr + req * table_row + last // PAGE_SIZE).to(tl.int64)
        dest_slot = (last % PAGE_SIZE) // STRIDE
        d = tl.arange(0, D)
        keys = tl.load(key_ptr + pages[:, None] * k_page + slots[:, None] * k_slot
                       + head * k_head + d[None, :], mask=in_window[:, None], other=0.0)
        key_mean = tl.sum(keys.to(tl.float32), axis=0) / WINDOW
        tl.store(cmp_key_ptr + dest_page * ck_page + dest_slot * ck_slot + head * ck_head + d,
                 key_mean.to(cmp_key_ptr.dtype.element_ty))
        dv = tl.arange(0, DV)
        values = tl.load(value_ptr + pages[:, None] * v_page + slots[:, None] * v_slot
                         + head * v_head + dv[None, :], mask=in_window[:, None], other=0.0)
        value_mean = tl.sum(values.to(tl.float32), axis=0) / WINDOW
        tl.store(cmp_value_ptr + dest_page * cv_page + dest_slot * cv_slot + head * cv_head
                 + dv, value_mean.to(cmp_value_ptr.dtype.element_ty))


@triton.jit
def _tile_request(tile_req_ptr, tile_qoff_ptr, tile, DECODE: tl.constexpr):
    """(request, first query offset) of a query tile; -1 for an unused tile. Decode batches
    (one query token per request) need no tile table: tile r is request r."""
    if DECODE:
        req = tile
        q_off = tile * 0
    else:
        req = tl.load(tile_req_ptr + tile)
        q_off = tl.load(tile_qoff_ptr + tile)
    return req, q_off


@triton.jit
def _tile_rows(qsl_ptr, seq_lens_ptr, req, q_off,
               G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr):
    """A query tile: BLOCK_T consecutive tokens of one request x GP (padded) heads per row."""
    q_begin = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_begin
    context = tl.load(seq_lens_ptr + req) - q_len
    rows = tl.arange(0, BLOCK_T * GP)
    tok_in_req = q_off + rows // GP
    group_head = rows % GP
    row_valid = (group_head < G) & (tok_in_req < q_len)
    token = q_begin + tok_in_req
    position = context + tok_in_req
    last_position = context + tl.minimum(q_off + BLOCK_T, q_len) - 1
    return q_len, context, token, group_head, position, row_valid, last_position


@triton.jit
def _request_of(qsl_ptr, num_reqs, token):
    """The request a query token belongs to (binary search of query_start_loc), -1 for a
    padding token past the last request. Empty requests are never returned."""
    lo = token * 0
    hi = lo + num_reqs
    while hi - lo > 1:   # invariant: qsl[lo] <= token < qsl[hi]
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) <= token:
            lo = mid
        else:
            hi = mid
    return tl.where(token < tl.load(qsl_ptr + num_reqs), lo, -1)


@triton.jit
def _compressed_keys(cmp_ptr, table_ptr, req, table_row, entries, entry_ok, kv_head,
                     c_page, c_slot, c_head, PAGE_SIZE: tl.constexpr, STRIDE: tl.constexpr,
                     CBLOCK: tl.constexpr, DIM: tl.constexpr):
    """[len(entries), DIM] compressed entries; entry i is stored with its last raw token."""
    last = entries.to(tl.int64) * STRIDE + CBLOCK - 1
    pages = tl.load(table_ptr + req * table_row + last // PAGE_SIZE, mask=entry_ok,
                    other=0).to(tl.int64)
    slots = (last % PAGE_SIZE) // STRIDE
    dims = tl.arange(0, DIM)
    return tl.load(cmp_ptr + pages[:, None] * c_page + slots[:, None] * c_slot
                   + kv_head * c_head + dims[None, :], mask=entry_ok[:, None], other=0.0)


@triton.jit
def _num_compressed(position, CBLOCK: tl.constexpr, STRIDE: tl.constexpr):
    """C(t): compressed entries whose whole window is at or before t."""
    return tl.where(position >= CBLOCK - 1, (position - CBLOCK + 1) // STRIDE + 1, 0)


@triton.jit(do_not_specialize=["tiles_per_split"])
def _compressed_scan_kernel(
        q_ptr, cmp_key_ptr, cmp_value_ptr, table_ptr, tile_req_ptr, tile_qoff_ptr, qsl_ptr,
        seq_lens_ptr, out_ptr, lse_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
        q_tok, q_head, ck_page, ck_slot, ck_head, cv_page, cv_slot, cv_head, table_row,
        out_tok, out_head, num_heads, tiles_per_split, qk_scale,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
        DV: tl.constexpr, PAGE_SIZE: tl.constexpr, STRIDE: tl.constexpr,
        CBLOCK: tl.constexpr, BC: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DECODE: tl.constexpr, WRITE_CMP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req, q_off = _tile_request(tile_req_ptr, tile_qoff_ptr, tile, DECODE)
    if req < 0:
        return
    q_len, context, token, group_head, position, row_valid, last_position = \
        _tile_rows(qsl_ptr, seq_lens_ptr, req, q_off, G, GP, BLOCK_T)
    head = kv_head * G + group_head
    d = tl.arange(0, D)
    q = tl.load(q_ptr + token.to(tl.int64)[:, None] * q_tok + head[:, None] * q_head
                + d[None, :], mask=row_valid[:, None], other=0.0)
    num_visible = _num_compressed(last_position, CBLOCK, STRIDE)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(num_visible, BC))
    row_max = tl.full([BLOCK_T * GP], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_T * GP], tl.float32)
    acc = tl.zeros([BLOCK_T * GP, DV], tl.float32)
    for c in range(tile_lo, tile_hi):
        entries = c * BC + tl.arange(0, BC)
        entry_ok = entries < num_visible
        keys = _compressed_keys(cmp_key_ptr, table_ptr, req, table_row, entries, entry_ok,
                                kv_head, ck_page, ck_slot, ck_head, PAGE_SIZE, STRIDE, CBLOCK, D)
        scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale
        visible = (entries[None, :] * STRIDE + CBLOCK - 1 <= position[:, None]) & entry_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(row_max - safe_max)
        probs = tl.exp2(scores - safe_max[:, None])
        row_sum = row_sum * alpha + tl.sum(probs, axis=1)
        if WRITE_CMP:
            values = _compressed_keys(cmp_value_ptr, table_ptr, req, table_row, entries,
                                      entry_ok, kv_head, cv_page, cv_slot, cv_head, PAGE_SIZE,
                                      STRIDE, CBLOCK, DV)
            acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values,
                                                input_precision=DOT_PRECISION)
        row_max = new_max
    dv = tl.arange(0, DV)
    token64 = token.to(tl.int64)
    if NUM_SPLITS == 1:
        lse = tl.where(row_sum > 0, row_max + tl.log2(tl.where(row_sum > 0, row_sum, 1.0)),
                       float("-inf"))
        tl.store(lse_ptr + token64 * num_heads + head, lse, mask=row_valid)
        if WRITE_CMP:
            o_cmp = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
            tl.store(out_ptr + token64[:, None] * out_tok + head[:, None] * out_head
                     + dv[None, :], o_cmp.to(out_ptr.dtype.element_ty),
                     mask=row_valid[:, None])
    else:
        part = (token64 * num_heads + head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, row_max, mask=row_valid)
        tl.store(part_sum_ptr + part, row_sum, mask=row_valid)
        if WRITE_CMP:
            tl.store(part_acc_ptr + part[:, None] * DV + dv[None, :], acc,
                     mask=row_valid[:, None])


@triton.jit
def _overlap(entries, blocks, CBLOCK: tl.constexpr, STRIDE: tl.constexpr,
             SBLOCK: tl.constexpr):
    """omega(i, j) = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d (spec Eq. 9), broadcast."""
    lo = tl.maximum(entries * STRIDE, blocks * SBLOCK)
    hi = tl.minimum(entries * STRIDE + CBLOCK, (blocks + 1) * SBLOCK)
    return tl.maximum(hi - lo, 0).to(tl.float32) / STRIDE


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
def _block_select_kernel(
        q_ptr, cmp_key_ptr, table_ptr, tile_req_ptr, tile_qoff_ptr, qsl_ptr, seq_lens_ptr,
        out_ptr, lse_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, indices_ptr, part_keys_ptr,
        scores_ptr, q_tok, q_head, ck_page, ck_slot, ck_head, table_row, out_tok, out_head,
        num_heads, num_kv_heads, tiles_per_split, qk_scale,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
        DV: tl.constexpr, PAGE_SIZE: tl.constexpr, STRIDE: tl.constexpr,
        CBLOCK: tl.constexpr, SBLOCK: tl.constexpr, BC: tl.constexpr, BB: tl.constexpr,
        TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
        NUM_BLOCKS_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr,
        WRITE_CMP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req, q_off = _tile_request(tile_req_ptr, tile_qoff_ptr, tile, DECODE)
    if req < 0:
        return
    q_len, context, token, group_head, position, row_valid, last_position = \
        _tile_rows(qsl_ptr, seq_lens_ptr, req, q_off, G, GP, BLOCK_T)
    head = kv_head * G + group_head
    token64 = token.to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + token64[:, None] * q_tok + head[:, None] * q_head + d[None, :],
                mask=row_valid[:, None], other=0.0)
    if NUM_SPLITS == 1:
        lse = tl.load(lse_ptr + token64 * num_heads + head, mask=row_valid,
                      other=float("-inf"))
    else:
        # Combine the pass-1 partials of every split into the row's LSE (and o_cmp once).
        part = (token64 * num_heads + head) * NUM_SPLITS
        total_max = tl.full([BLOCK_T * GP], float("-inf"), tl.float32)
        for s in range(NUM_SPLITS):
            total_max = tl.maximum(total_max, tl.load(part_max_ptr + part + s, mask=row_valid,
                                                      other=float("-inf")))
        safe_max = tl.where(total_max == float("-inf"), 0.0, total_max)
        total_sum = tl.zeros([BLOCK_T * GP], tl.float32)
        dv = tl.arange(0, DV)
        acc = tl.zeros([BLOCK_T * GP, DV], tl.float32)
        for s in range(NUM_SPLITS):
            weight = tl.exp2(tl.load(part_max_ptr + part + s, mask=row_valid,
                                     other=float("-inf")) - safe_max)
            total_sum += weight * tl.load(part_sum_ptr + part + s, mask=row_valid, other=0.0)
            if WRITE_CMP:
                acc += weight[:, None] * tl.load(
                    part_acc_ptr + (part + s)[:, None] * DV + dv[None, :],
                    mask=row_valid[:, None], other=0.0)
        lse = tl.where(total_sum > 0,
                       total_max + tl.log2(tl.where(total_sum > 0, total_sum, 1.0)),
                       float("-inf"))
        if WRITE_CMP:
            if split == 0:
                o_cmp = acc / tl.where(total_sum > 0, total_sum, 1.0)[:, None]
                tl.store(out_ptr + token64[:, None] * out_tok + head[:, None] * out_head
                         + dv[None, :], o_cmp.to(out_ptr.dtype.element_ty),
                         mask=row_valid[:, None])
    safe_lse = tl.where(lse == float("-inf"), 0.0, lse)

    num_visible = _num_compressed(last_position, CBLOCK, STRIDE)
    toks = tl.arange(0, BLOCK_T)
    tok_valid = q_off + toks < q_len
    current_block = (context + q_off + toks) // SBLOCK                       # [BLOCK_T]
    num_tiles = tl.cdiv(last_position // SBLOCK + 1, BB)
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
        keys = _compressed_keys(cmp_key_ptr, table_ptr, req, table_row, entries, entry_ok,
                                kv_head, ck_page, ck_slot, ck_head, PAGE_SIZE, STRIDE, CBLOCK, D)
        scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale
        visible = ((entries[None, :] * STRIDE + CBLOCK - 1 <= position[:, None])
                   & entry_ok[None, :] & row_valid[:, None])
        probs = tl.where(visible, tl.exp2(scores - safe_lse[:, None]), 0.0)
        blocks = c * BB + block_offs
        # omega is linear: sum the group's probabilities first (Eq. 10), then weight (Eq. 9).
        group_probs = tl.sum(tl.reshape(probs, [BLOCK_T, GP, BC]), axis=1)     # [BLOCK_T, BC]
        weights = _overlap(entries[:, None], blocks[None, :], CBLOCK, STRIDE, SBLOCK)
        if BLOCK_T >= 16:
            importance = tl.dot(group_probs, weights, input_precision="ieee")
        else:
            # Explicit fp32 products: Triton may lower this pattern to a tf32 dot at >= 16
            # rows, which reorders near-ties (seen on an H100).
            importance = tl.sum(group_probs[:, :, None] * weights[None, :, :], axis=1)
        importance += tl.where(block_offs[None, :] == 0, spill[:, None], 0.0)
        next_weights = _overlap(entries, c * BB + BB, CBLOCK, STRIDE, SBLOCK)
        spill = tl.sum(group_probs * next_weights[None, :], axis=1)
        candidate = (blocks[None, :] <= current_block[:, None]) & tok_valid[:, None]
        forced = candidate & ((blocks[None, :] < INIT_BLOCKS)
                              | (blocks[None, :] > current_block[:, None] - LOCAL_BLOCKS))
        ranked = tl.where(forced, float("inf"), importance)
        if DECODE:
            # One token per program: sorting per tile would dominate; the block scores go
            # out and `_select_topk_kernel` picks each row's top-n in one pass.
            tl.store(scores_ptr + (token_ids[:, None] * num_kv_heads + kv_head)
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
    if DECODE:
        pass   # selection continues in _select_topk_kernel
    elif NUM_SPLITS == 1:
        indices = _keys_to_indices(best, block_offs[None, :], TOPK)
        tl.store(indices_ptr + (token_ids[:, None] * num_kv_heads + kv_head) * TOPK
                 + block_offs[None, :], indices,
                 mask=tok_valid[:, None] & (block_offs[None, :] < TOPK))
    else:
        tl.store(part_keys_ptr + ((token_ids[:, None] * num_kv_heads + kv_head) * NUM_SPLITS
                                  + split) * BB + block_offs[None, :], best,
                 mask=tok_valid[:, None])


@triton.jit(do_not_specialize=["num_reqs"])
def _merge_topk_kernel(part_keys_ptr, qsl_ptr, indices_ptr, num_reqs, num_kv_heads,
                       NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BB: tl.constexpr,
                       TOPK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    if token < tl.load(qsl_ptr + num_reqs):   # padding tokens have no candidates
        offs = tl.arange(0, SPLITS_PAD * BB)
        keys = tl.load(part_keys_ptr + (token * num_kv_heads + kv_head) * NUM_SPLITS * BB + offs,
                       mask=offs < NUM_SPLITS * BB, other=-1)
        keys = tl.sort(keys, descending=True)
        indices = _keys_to_indices(keys, offs, TOPK)
        tl.store(indices_ptr + (token * num_kv_heads + kv_head) * TOPK + offs, indices,
                 mask=offs < TOPK)


@triton.jit(do_not_specialize=["num_reqs"])
def _select_topk_kernel(scores_ptr, qsl_ptr, seq_lens_ptr, indices_ptr, num_reqs,
                        num_kv_heads, SBLOCK: tl.constexpr, NUM_BLOCKS_PAD: tl.constexpr,
                        TOPK: tl.constexpr):
    """Decode selection: the top-n blocks of one (token, KV head) score row (forced blocks
    score +inf; ties to the lower block), written ascending. The n-th largest score is found
    by bisecting its bit pattern (non-negative floats order like their bits): 31 counting
    passes over the row instead of a sort."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    req = _request_of(qsl_ptr, num_reqs, token)
    if req >= 0:
        q_begin = tl.load(qsl_ptr + req)
        q_len = tl.load(qsl_ptr + req + 1) - q_begin
        position = tl.load(seq_lens_ptr + req) - q_len + (token - q_begin)
        row = token * num_kv_heads + kv_head
        blocks = tl.arange(0, NUM_BLOCKS_PAD)
        scores = tl.load(scores_ptr + row * NUM_BLOCKS_PAD + blocks,
                         mask=blocks <= position // SBLOCK, other=-1.0)
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


@triton.jit
def _attend_tile(q, key_ptr, value_ptr, table_ptr, req, table_row, positions, ok, kv_head,
                 k_page, k_slot, k_head, v_page, v_slot, v_head, qk_scale,
                 row_max, row_sum, acc,
                 PAGE_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One online-softmax step over raw positions (masked by `ok`) read through the table."""
    pages = tl.load(table_ptr + req * table_row + positions // PAGE_SIZE, mask=ok,
                    other=0).to(tl.int64)
    slots = positions % PAGE_SIZE
    d = tl.arange(0, D)
    keys = tl.load(key_ptr + pages[:, None] * k_page + slots[:, None] * k_slot
                   + kv_head * k_head + d[None, :], mask=ok[:, None], other=0.0)
    dv = tl.arange(0, DV)
    values = tl.load(value_ptr + pages[:, None] * v_page + slots[:, None] * v_slot
                     + kv_head * v_head + dv[None, :], mask=ok[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale
    scores = tl.where(ok[None, :], scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp2(row_max - safe_max)
    probs = tl.exp2(scores - safe_max[:, None])
    row_sum = row_sum * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values,
                                        input_precision=DOT_PRECISION)
    return new_max, row_sum, acc


@triton.jit
def _finish_branch(out_ptrs, part, part_max_ptr, part_sum_ptr, part_acc_ptr, row_max, row_sum,
                   acc, row_valid, DV: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One branch's result: normalised into the output, or this split's online-softmax
    partial (max, sum, unnormalised acc) for `_combine_splits_kernel`."""
    if NUM_SPLITS == 1:
        result = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        tl.store(out_ptrs, result.to(out_ptrs.dtype.element_ty), mask=row_valid[:, None])
    else:
        tl.store(part_max_ptr + part, row_max, mask=row_valid)
        tl.store(part_sum_ptr + part, row_sum, mask=row_valid)
        dv = tl.arange(0, DV)
        tl.store(part_acc_ptr + part[:, None] * DV + dv[None, :], acc, mask=row_valid[:, None])


@triton.jit(do_not_specialize=["num_reqs"])
def _sparse_attention_kernel(
        q_ptr, key_ptr, value_ptr, table_ptr, qsl_ptr, seq_lens_ptr, indices_ptr, out_ptr,
        part_max_ptr, part_sum_ptr, part_acc_ptr,
        q_tok, q_head, k_page, k_slot, k_head, v_page, v_slot, v_head, table_row,
        out_tok, out_head, out_branch, num_reqs, num_heads, num_kv_heads, qk_scale,
        G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        PAGE_SIZE: tl.constexpr, SBLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
        TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, WINDOW: tl.constexpr,
        STEPS_PER_SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr, BRANCHES: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = _request_of(qsl_ptr, num_reqs, token)
    if req < 0:
        return
    q_begin = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_begin
    position = tl.load(seq_lens_ptr + req) - q_len + (token - q_begin)
    rows = tl.arange(0, ROWS)
    row_valid = rows < G
    head = kv_head * G + rows
    d = tl.arange(0, D)
    q = tl.load(q_ptr + token * q_tok + head[:, None] * q_head + d[None, :],
                mask=row_valid[:, None], other=0.0)
    index_base = indices_ptr + (token * num_kv_heads + kv_head) * TOPK
    topk_offs = tl.arange(0, TOPK_PAD)
    selected = tl.load(index_base + topk_offs, mask=topk_offs < TOPK, other=-1)
    key_offs = tl.arange(0, BLOCK_K)
    dv = tl.arange(0, DV)
    out_ptrs = out_ptr + token * out_tok + head[:, None] * out_head + dv[None, :]
    # Partials: [token, head, branch set, split]; the set is 0 (selected) / 1 (window) in
    # branches mode, 0 in merged mode.
    part = ((token * num_heads + head) * (1 + BRANCHES)) * NUM_SPLITS + split

    # The work of one (token, KV head): TOPK * SBLOCK / BLOCK_K selected tiles, then the
    # window's tiles; split `split` takes steps [step_lo, step_hi) of that list.
    SUB: tl.constexpr = SBLOCK // BLOCK_K
    step_lo = split * STEPS_PER_SPLIT
    step_hi = step_lo + STEPS_PER_SPLIT
    row_max = tl.full([ROWS], float("-inf"), tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV], tl.float32)
    # Branch-free tiles so Triton can pipeline the loop; a padding block (-1) has only
    # negative positions and is fully masked.
    for step in range(step_lo, tl.minimum(step_hi, TOPK * SUB)):
        block = tl.load(index_base + step // SUB)
        positions = block.to(tl.int64) * SBLOCK + (step % SUB) * BLOCK_K + key_offs
        row_max, row_sum, acc = _attend_tile(
            q, key_ptr, value_ptr, table_ptr, req, table_row, positions,
            (positions >= 0) & (positions <= position), kv_head, k_page, k_slot, k_head,
            v_page, v_slot, v_head, qk_scale, row_max, row_sum, acc,
            PAGE_SIZE, D, DV, DOT_PRECISION)
    if BRANCHES:
        _finish_branch(out_ptrs + out_branch, part, part_max_ptr, part_sum_ptr, part_acc_ptr,
                       row_max, row_sum, acc, row_valid, DV, NUM_SPLITS)
        row_max = tl.full([ROWS], float("-inf"), tl.float32)
        row_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DV], tl.float32)
    if WINDOW > 0:
        window_first = tl.maximum(position - WINDOW + 1, 0)
        first_tile = window_first // BLOCK_K
        last_tile = position // BLOCK_K
        window_lo = tl.maximum(step_lo - TOPK * SUB, 0)
        for tile in range(first_tile + window_lo,
                          tl.minimum(first_tile + step_hi - TOPK * SUB, last_tile + 1)):
            first = tile * BLOCK_K
            if BRANCHES:
                times_attended = 0
            else:
                # Merged mode: a tile of an already attended selection block adds nothing.
                times_attended = tl.sum((selected == first // SBLOCK).to(tl.int32), axis=0)
            if times_attended == 0:
                positions = first + key_offs
                row_max, row_sum, acc = _attend_tile(
                    q, key_ptr, value_ptr, table_ptr, req, table_row, positions,
                    (positions >= window_first) & (positions <= position), kv_head,
                    k_page, k_slot, k_head, v_page, v_slot, v_head, qk_scale,
                    row_max, row_sum, acc, PAGE_SIZE, D, DV, DOT_PRECISION)
    _finish_branch(out_ptrs + 2 * out_branch, part + BRANCHES * NUM_SPLITS, part_max_ptr,
                   part_sum_ptr, part_acc_ptr, row_max, row_sum, acc, row_valid, DV, NUM_SPLITS)


@triton.jit(do_not_specialize=["num_reqs"])
def _combine_splits_kernel(part_max_ptr, part_sum_ptr, part_acc_ptr, qsl_ptr, out_ptr,
                           out_tok, out_head, out_branch, num_reqs, num_heads,
                           DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
                           SPLITS_PAD: tl.constexpr, BRANCHES: tl.constexpr):
    """Merges the split partials of one (token, head, branch set) into the output."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    branch_set = tl.program_id(2)
    if token < tl.load(qsl_ptr + num_reqs):
        splits = tl.arange(0, SPLITS_PAD)
        part = ((token * num_heads + head) * (1 + BRANCHES) + branch_set) * NUM_SPLITS + splits
        split_ok = splits < NUM_SPLITS
        split_max = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
        total_max = tl.max(split_max, axis=0)
        weight = tl.exp2(split_max - tl.where(total_max == float("-inf"), 0.0, total_max))
        total_sum = tl.sum(weight * tl.load(part_sum_ptr + part, mask=split_ok, other=0.0),
                           axis=0)
        dv = tl.arange(0, DV)
        acc = tl.sum(weight[:, None] * tl.load(part_acc_ptr + part[:, None] * DV + dv[None, :],
                                               mask=split_ok[:, None], other=0.0), axis=0)
        result = acc / tl.where(total_sum > 0, total_sum, 1.0)
        # Output slots: merged [T, H, DV]; branches [T, H, 3, DV] as (cmp, slc, win).
        branch = (branch_set + 1) * BRANCHES
        tl.store(out_ptr + token * out_tok + head * out_head + branch * out_branch + dv,
                 result.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------- host side
def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must score blocks exactly as the fp32 reference does (tf32 would reorder
    # near-ties); half types go through the tensor cores as they are.
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 16
    return torch.cuda.get_device_properties(device).multi_processor_count


def compress_paged(key_cache: torch.Tensor, value_cache: torch.Tensor,
                   cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
                   block_table: torch.Tensor, emit_req: torch.Tensor, emit_index: torch.Tensor,
                   config: NSAConfig) -> None:
    """Write compressed entries (phi = mean) from the raw paged cache; see paged.py.

    Rows with emit_req < 0 are padding and are skipped (fixed-size launches for CUDA graphs).
    """
    num_entries = emit_req.shape[0]
    if num_entries == 0:
        return
    num_kv_heads = key_cache.shape[2]
    _check_inner_contiguous(key_cache, value_cache, cmp_key_cache, cmp_value_cache)
    _compress_kernel[(num_entries, num_kv_heads)](
        key_cache, value_cache, cmp_key_cache, cmp_value_cache, block_table,
        emit_req, emit_index,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        cmp_key_cache.stride(0), cmp_key_cache.stride(1), cmp_key_cache.stride(2),
        cmp_value_cache.stride(0), cmp_value_cache.stride(1), cmp_value_cache.stride(2),
        block_table.stride(0),
        PAGE_SIZE=key_cache.shape[1], STRIDE=config.compress_stride,
        WINDOW=config.compress_block, WINDOW_PAD=_pow2(config.compress_block),
        D=key_cache.shape[3], DV=value_cache.shape[3])


def _fill_splits(busy_programs: int, max_work_items: int, device: torch.device) -> int:
    """Programs per unit of work so about 4 waves of programs fill the GPU. Powers of two
    only: NUM_SPLITS is a compile-time constant, so serving new batch shapes and context
    lengths reuses a handful of compiled kernels instead of compiling mid-serve (splits
    left without work cost nothing)."""
    wanted = -(-4 * _num_sms(device) // max(1, busy_programs))
    return _pow2(max(1, min(max_work_items, wanted)))


def _check_inner_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError("NSA Triton kernels need unit stride in the head dimension")


def _query_tiles(query_start_loc: torch.Tensor, num_tokens: int, block_t: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of block_t consecutive query tokens of one request: (request or -1, first query
    offset) for a grid sized from host-known numbers only (no sync)."""
    num_reqs = query_start_loc.shape[0] - 1
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).to(torch.int64)
    tiles_per_req = (q_lens + block_t - 1) // block_t
    tile_end = torch.cumsum(tiles_per_req, 0)
    max_tiles = -(-num_tokens // block_t) + num_reqs
    tile_ids = torch.arange(max_tiles, device=query_start_loc.device)
    req = torch.searchsorted(tile_end, tile_ids, right=True)
    valid = req < num_reqs
    req = req.clamp(max=num_reqs - 1)
    first_tile = tile_end[req] - tiles_per_req[req]
    tile_req = torch.where(valid, req, -1).to(torch.int32)
    tile_qoff = ((tile_ids - first_tile) * block_t).to(torch.int32)
    return tile_req, tile_qoff


def nsa_paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
                        block_table: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, config: NSAConfig, scale: float,
                        output: torch.Tensor, branches: bool, *,
                        max_query_len: int | None = None, max_seq_len: int | None = None,
                        num_splits: int | None = None) -> torch.Tensor:
    """NSA for a batch of requests over the paged caches; see paged.py for the contract.

    Optional hints (host ints, CUDA-graph safe): max_query_len (1 = all decodes: small query
    tiles, one per request), max_seq_len (must bound every seq_len; default: the block
    table's capacity), num_splits (programs sharing one query's compressed scan and its
    sparse attention; default: enough to fill the GPU).
    Returns block_indices [N, H, select_topk] int32, ascending, -1 padded.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = key_cache.shape
    value_dim = value_cache.shape[3]
    group = num_heads // num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} not a multiple of kv heads {num_kv_heads}")
    select_block = config.select_block
    if select_block < 16 or select_block & (select_block - 1):
        raise ValueError(f"Triton NSA needs select_block a power of two >= 16, got {select_block}")
    if page_size % config.compress_stride:
        raise ValueError(f"page_size {page_size} must be a multiple of compress_stride")
    for dim in (head_dim, value_dim):
        if dim < 16 or dim & (dim - 1):
            raise ValueError(f"head dims must be powers of two >= 16, got {dim}")
    _check_inner_contiguous(q, key_cache, value_cache, cmp_key_cache, cmp_value_cache, output)
    topk = config.select_topk
    block_indices = torch.full((num_tokens, num_kv_heads, topk), -1, dtype=torch.int32,
                               device=q.device)
    if num_tokens == 0:
        return block_indices
    device = q.device
    num_reqs = query_start_loc.shape[0] - 1
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * page_size
    decode_only = (max_query_len == 1) if max_query_len is not None else num_tokens <= num_reqs
    qk_scale = scale * _LOG2E
    precision = _dot_precision(q.dtype)
    f32 = dict(dtype=torch.float32, device=device)

    # Pass 1 + 2 tiles: BLOCK_T tokens x GP heads; all rows in a program share K/V loads.
    gp = _pow2(group)
    block_t = max(1, _MIN_ROWS // gp) if decode_only else max(1, 64 // gp)
    block_blocks = max(_pow2(topk), 16)                # BB: selection blocks per scan tile
    block_entries = block_blocks * select_block // config.compress_stride   # BC
    max_scan_tiles = -(-(-(-max_seq_len // select_block)) // block_blocks)
    if decode_only:   # tile r is request r: no tile table to build
        tile_req = tile_qoff = query_start_loc
        num_q_tiles = num_reqs
    else:
        tile_req, tile_qoff = _query_tiles(query_start_loc, num_tokens, block_t)
        num_q_tiles = tile_req.shape[0]
    # Occupied programs without splitting: one tile per request when decoding, else about
    # num_tokens / block_t tiles; the sparse attention has one per token.
    scan_busy = num_kv_heads * max(1, min(num_q_tiles, num_reqs if decode_only
                                          else -(-num_tokens // block_t)))
    scan_splits = num_splits or _fill_splits(scan_busy, max_scan_tiles, device)
    tiles_per_split = -(-max_scan_tiles // scan_splits)

    lse = torch.empty((num_tokens, num_heads), **f32)
    # Decode: per-block scores of each (token, KV head) for _select_topk_kernel.
    num_blocks_pad = _pow2(max_scan_tiles * block_blocks)
    scores = (torch.empty((num_tokens, num_kv_heads, num_blocks_pad), **f32) if decode_only
              else lse)
    if scan_splits > 1:
        part_max = torch.empty((num_tokens, num_heads, scan_splits), **f32)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((num_tokens, num_heads, scan_splits, value_dim) if branches
                               else (1,), **f32)
        part_keys = (lse if decode_only else
                     torch.empty((num_tokens, num_kv_heads, scan_splits, block_blocks),
                                 dtype=torch.int64, device=device))
    else:
        part_max = part_sum = part_acc = part_keys = lse
    out_tok, out_head = output.stride(0), output.stride(1)
    out_branch = output.stride(2) if branches else 0
    common = dict(G=group, GP=gp, BLOCK_T=block_t, D=head_dim, DV=value_dim,
                  PAGE_SIZE=page_size, STRIDE=config.compress_stride,
                  CBLOCK=config.compress_block, BC=block_entries, NUM_SPLITS=scan_splits,
                  DECODE=decode_only, WRITE_CMP=branches, DOT_PRECISION=precision)
    grid = (num_q_tiles, num_kv_heads, scan_splits)
    _compressed_scan_kernel[grid](
        q, cmp_key_cache, cmp_value_cache, block_table, tile_req, tile_qoff, query_start_loc,
        seq_lens, output, lse, part_max, part_sum, part_acc,
        q.stride(0), q.stride(1), cmp_key_cache.stride(0), cmp_key_cache.stride(1),
        cmp_key_cache.stride(2), cmp_value_cache.stride(0), cmp_value_cache.stride(1),
        cmp_value_cache.stride(2), block_table.stride(0), out_tok, out_head, num_heads,
        tiles_per_split, qk_scale, **common)
    _block_select_kernel[grid](
        q, cmp_key_cache, block_table, tile_req, tile_qoff, query_start_loc, seq_lens,
        output, lse, part_max, part_sum, part_acc, block_indices, part_keys, scores,
        q.stride(0), q.stride(1), cmp_key_cache.stride(0), cmp_key_cache.stride(1),
        cmp_key_cache.stride(2), block_table.stride(0), out_tok, out_head,
        num_heads, num_kv_heads, tiles_per_split, qk_scale,
        SBLOCK=select_block, BB=block_blocks, TOPK=topk, INIT_BLOCKS=config.init_blocks,
        LOCAL_BLOCKS=config.local_blocks, NUM_BLOCKS_PAD=num_blocks_pad, **common)
    if decode_only:
        _select_topk_kernel[(num_tokens, num_kv_heads)](
            scores, query_start_loc, seq_lens, block_indices, num_reqs, num_kv_heads,
            SBLOCK=select_block, NUM_BLOCKS_PAD=num_blocks_pad, TOPK=topk)
    elif scan_splits > 1:
        _merge_topk_kernel[(num_tokens, num_kv_heads)](
            part_keys, query_start_loc, block_indices, num_reqs, num_kv_heads,
            NUM_SPLITS=scan_splits, SPLITS_PAD=_pow2(scan_splits), BB=block_blocks, TOPK=topk)

    # Sparse attention: selected tiles then window tiles, split across programs when there
    # are too few (token, KV head) pairs to fill the GPU (decode).
    block_k = min(select_block, 64)
    window_tiles = (config.window - 1) // block_k + 2 if config.window else 0
    attention_steps = topk * (select_block // block_k) + window_tiles
    attention_splits = num_splits or _fill_splits(num_tokens * num_kv_heads,
                                                  attention_steps, device)
    branch_sets = 2 if branches else 1
    if attention_splits > 1:
        part_max = torch.empty((num_tokens, num_heads, branch_sets, attention_splits), **f32)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((*part_max.shape, value_dim), **f32)
    _sparse_attention_kernel[(num_tokens, num_kv_heads, attention_splits)](
        q, key_cache, value_cache, block_table, query_start_loc, seq_lens, block_indices,
        output, part_max, part_sum, part_acc,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), value_cache.stride(0), value_cache.stride(1),
        value_cache.stride(2), block_table.stride(0), out_tok, out_head, out_branch,
        num_reqs, num_heads, num_kv_heads, qk_scale,
        G=group, ROWS=max(_MIN_ROWS, gp), D=head_dim, DV=value_dim, PAGE_SIZE=page_size,
        SBLOCK=select_block, BLOCK_K=block_k, TOPK=topk, TOPK_PAD=_pow2(topk),
        WINDOW=config.window, STEPS_PER_SPLIT=-(-attention_steps // attention_splits),
        NUM_SPLITS=attention_splits, BRANCHES=branches, DOT_PRECISION=precision)
    if attention_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads, branch_sets)](
            part_max, part_sum, part_acc, query_start_loc, output, out_tok, out_head,
            out_branch, num_reqs, num_heads, DV=value_dim, NUM_SPLITS=attention_splits,
            SPLITS_PAD=_pow2(attention_splits), BRANCHES=branches)
    return block_indices
