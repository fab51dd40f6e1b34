"""attend: exact attention over the selected blocks' raw tokens, then the sliding window.
Merged mode skips window tiles whose selection block was already attended (no position
counted twice) and keeps one accumulator; gated mode keeps the window as its own branch.
Two tilings of the same math: `_attend_kernel`, one program per (token, KV head) (decode,
and prefill with prefill_attend="token"), and `_attend_union_kernel`, one program per (query
tile, KV head) over the union of its tokens' blocks (prefill by default; plan.attend_union).
Twin: paged.attend / reference.attend."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.triton.combine import combine
from vllm_nsa.kernels.triton.common import (
    LOG2E,
    normalise,
    online_softmax_step,
    request_of,
    store_partial,
    tile_request,
    tile_rows,
)
from vllm_nsa.kernels.triton.launch import launch
from vllm_nsa.kernels.triton.plan import StepPlan, pow2

# Launch options of `_attend_union_kernel` (bench_kernels' "tune" part sweeps them): its
# loop walks a precomputed list, so the next block's keys can be prefetched. On an H100
# at 64k, (32, 8), with int32 key offsets and one page per key tile: 19.8 / 16.7 / 16.2 /
# 16.0 ms with 1 / 2 / 3 / 4 stages; (64, 4): 16.5 / 14.8 / 14.1 / 14.4 ms; 8 warps
# lost about 2x (255 registers a thread at 4 warps already).
UNION_LAUNCH = dict(num_warps=4, num_stages=3)


@triton.jit
def _attend_tile(q, key_cache_ptr, value_cache_ptr, table_ptr, req, table_row, start, lo, hi,
                 load_hi, kv_head, kc_page, kc_slot, kc_head, vc_page, vc_slot, vc_head,
                 qk_scale, row_max, row_sum, acc,
                 PAGE_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                 DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the BLOCK_K raw positions from `start` (a multiple of
    BLOCK_K), read through the table: key offsets 0..load_hi are loaded (none when
    load_hi < 0), row r attends offsets lo[r]..hi[r]. Everything per key or per element
    is int32 offsets from scalars: this loop is bound by instruction issue, not by the
    tensor cores (ncu, H100: integer ALU the busiest pipe with int64 positions and
    per-key pages)."""
    key_offs = tl.arange(0, BLOCK_K)
    ok = key_offs <= load_hi
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    if PAGE_SIZE % BLOCK_K == 0:
        # The tile lies in one page: one table entry, one base pointer.
        page = tl.load(table_ptr + req * table_row + start // PAGE_SIZE, mask=load_hi >= 0,
                       other=0).to(tl.int64)
        slot = start % PAGE_SIZE
        keys = tl.load(key_cache_ptr + (page * kc_page + slot * kc_slot + kv_head * kc_head)
                       + key_offs[:, None] * kc_slot + d[None, :], mask=ok[:, None],
                       other=0.0)
        values = tl.load(value_cache_ptr + (page * vc_page + slot * vc_slot
                                            + kv_head * vc_head)
                         + key_offs[:, None] * vc_slot + dv[None, :], mask=ok[:, None],
                         other=0.0)
    else:
        positions = start + key_offs
        pages = tl.load(table_ptr + req * table_row + positions // PAGE_SIZE, mask=ok,
                        other=0).to(tl.int64)
        slots = positions % PAGE_SIZE
        keys = tl.load(key_cache_ptr + pages[:, None] * kc_page + slots[:, None] * kc_slot
                       + kv_head * kc_head + d[None, :], mask=ok[:, None], other=0.0)
        values = tl.load(value_cache_ptr + pages[:, None] * vc_page + slots[:, None] * vc_slot
                         + kv_head * vc_head + dv[None, :], mask=ok[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale
    row_ok = (key_offs[None, :] >= lo[:, None]) & (key_offs[None, :] <= hi[:, None])
    scores = tl.where(row_ok, scores, float("-inf"))
    row_max, row_sum, acc, _, _ = online_softmax_step(scores, values, row_max, row_sum, acc,
                                                      True, DOT_PRECISION)
    return row_max, row_sum, acc


@triton.jit
def _finish_set(out_ptrs, part_max_ptr, part_sum_ptr, part_acc_ptr, part, row_max, row_sum,
                acc, row_valid, DV: tl.constexpr):
    """One branch set's result: normalised into its output (unsplit: no partials), or
    this split's partial."""
    if part_max_ptr is None:
        tl.store(out_ptrs, normalise(acc, row_sum).to(out_ptrs.dtype.element_ty),
                 mask=row_valid[:, None])
    else:
        store_partial(part_max_ptr, part_sum_ptr, part_acc_ptr, part, row_max, row_sum, acc,
                      row_valid, DV, True)


@triton.jit(do_not_specialize=["num_reqs", "num_splits", "steps_per_split"])
def _attend_kernel(
        q_ptr,              # [N, HQ, D]
        key_cache_ptr,      # [P, page_size, H, D]
        value_cache_ptr,    # [P, page_size, H, DV]
        table_ptr,          # [R, max_pages] int32
        qsl_ptr,            # [R+1] int32 query_start_loc
        seq_lens_ptr,       # [R] int32
        indices_ptr,        # [N, H, TOPK] int32 selected blocks, ascending, -1 padded
        out_ptr,            # [N, HQ, DV] view: o_slc (gated) or the merged output
        part_max_ptr,       # [N, HQ, SETS, num_splits] (split; None: unsplit)
        part_sum_ptr,       # [N, HQ, SETS, num_splits] (split)
        part_acc_ptr,       # [N, HQ, SETS, num_splits, DV] (split)
        # strides (elements); out_set: o_win's distance from o_slc (gated)
        q_tok, q_head, kc_page, kc_slot, kc_head, vc_page, vc_slot, vc_head, table_row,
        out_tok, out_head, out_set,
        num_reqs, num_heads, num_kv_heads,
        num_splits,         # programs sharing one (token, KV head)'s tile list
        steps_per_split,    # tiles of that list per split
        qk_scale,           # softmax scale * log2(e)
        G: tl.constexpr,
        ROWS: tl.constexpr,     # G padded to >= 16 rows for tl.dot
        D: tl.constexpr, DV: tl.constexpr, PAGE_SIZE: tl.constexpr,
        SELECT_BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,  # keys per tile
        TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, WINDOW: tl.constexpr,
        GATED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (N, H, num_splits): one program owns one token x the G query heads of one KV head
    and the split'th range of its tile list (TOPK * l'/BLOCK_K selected tiles, then the
    window's tiles). Sets: 0 = selected (+ window when merged), 1 = window (gated).
    Mirrors paged.attend."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = request_of(qsl_ptr, num_reqs, token)
    if req < 0:
        return
    q_begin = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_begin
    position = tl.load(seq_lens_ptr + req) - q_len + (token - q_begin).to(tl.int32)
    rows = tl.arange(0, ROWS)
    row_valid = rows < G
    head = kv_head * G + rows
    d = tl.arange(0, D)
    q = tl.load(q_ptr + token * q_tok + head[:, None] * q_head + d[None, :],
                mask=row_valid[:, None], other=0.0)
    index_base = indices_ptr + (token * num_kv_heads + kv_head) * TOPK
    topk_offs = tl.arange(0, TOPK_PAD)
    selected = tl.load(index_base + topk_offs, mask=topk_offs < TOPK, other=-1)
    dv = tl.arange(0, DV)
    out_ptrs = out_ptr + token * out_tok + head[:, None] * out_head + dv[None, :]
    SETS: tl.constexpr = 1 + GATED
    part = ((token * num_heads + head) * SETS) * num_splits + split

    SUB: tl.constexpr = SELECT_BLOCK // BLOCK_K
    step_lo = split * steps_per_split
    step_hi = step_lo + steps_per_split
    row_max = tl.full([ROWS], float("-inf"), tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV], tl.float32)
    # Branch-free tiles so Triton can pipeline the loop.
    zero = tl.zeros([ROWS], tl.int32)
    for step in range(step_lo, tl.minimum(step_hi, TOPK * SUB)):
        block = tl.load(index_base + step // SUB)
        start = block * SELECT_BLOCK + (step % SUB) * BLOCK_K
        # A padding block (-1) loads and attends nothing.
        load_hi = tl.where(block >= 0, position - start, -1)
        row_max, row_sum, acc = _attend_tile(
            q, key_cache_ptr, value_cache_ptr, table_ptr, req, table_row, start, zero,
            zero + load_hi, load_hi, kv_head, kc_page, kc_slot, kc_head, vc_page, vc_slot,
            vc_head, qk_scale, row_max, row_sum, acc, PAGE_SIZE, BLOCK_K, D, DV,
            DOT_PRECISION)
    if GATED:
        _finish_set(out_ptrs, part_max_ptr, part_sum_ptr, part_acc_ptr, part, row_max,
                    row_sum, acc, row_valid, DV)
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
            if GATED:
                times_attended = 0
            else:
                # Merged mode: a tile of an already attended selection block adds nothing.
                times_attended = tl.sum((selected == first // SELECT_BLOCK).to(tl.int32),
                                        axis=0)
            if times_attended == 0:
                row_max, row_sum, acc = _attend_tile(
                    q, key_cache_ptr, value_cache_ptr, table_ptr, req, table_row, first,
                    zero + (window_first - first), zero + (position - first),
                    position - first, kv_head, kc_page, kc_slot, kc_head, vc_page, vc_slot,
                    vc_head, qk_scale, row_max, row_sum, acc, PAGE_SIZE, BLOCK_K, D, DV,
                    DOT_PRECISION)
    last_set = SETS - 1
    _finish_set(out_ptrs + last_set * out_set, part_max_ptr, part_sum_ptr, part_acc_ptr,
                part + last_set * num_splits, row_max, row_sum, acc, row_valid, DV)


@triton.jit
def _distinct_combine(first_a, last_a, count_a, run_a, first_b, last_b, count_b, run_b):
    """Scan of an ascending sequence, range a before range b: (first value, last value,
    distinct values, length of the last value's run)."""
    count = count_a + count_b - (last_a == first_b).to(tl.int32)
    run = tl.where(last_a == last_b, run_a + run_b, run_b)
    return first_a, last_b, count, run


@triton.jit
def _first_run_or_combine(block_a, bits_a, block_b, bits_b):
    """Reverse scan of an ascending sequence, range b before range a: (first value, OR of
    the bits of its run)."""
    return block_b, tl.where(block_a == block_b, bits_a | bits_b, bits_b)


@triton.jit
def _union_list(selected, list_base, bits_base, BLOCK_T: tl.constexpr,
                TOPK_PAD: tl.constexpr):
    """Write the union of a tile's selected blocks ([BLOCK_T, TOPK_PAD], -1 padded) to
    list_base ascending and, per block, a bit per tile token that selected it to bits_base;
    returns its length. Reads nothing but `selected`: one sort of (block, token) keys and
    two scans, each run of one block writing its entry from its first element (a loop
    of reductions per block took 1.3 ms of 26 at 64k, (32, 8), H100)."""
    NONE: tl.constexpr = 2 ** 30
    N: tl.constexpr = BLOCK_T * TOPK_PAD
    tokens = tl.broadcast_to(tl.arange(0, BLOCK_T)[:, None], [BLOCK_T, TOPK_PAD])
    keys = tl.where(selected >= 0, selected.to(tl.int64) * 64 + tokens, NONE * 64)
    keys = tl.sort(tl.reshape(keys, [N]))        # BLOCK_T <= 64 tokens
    block = (keys // 64).to(tl.int32)
    bit = tl.full([N], 1, tl.int64) << (keys % 64)
    ones = tl.full([N], 1, tl.int32)
    _, _, count, run = tl.associative_scan((block, block, ones, ones), 0, _distinct_combine)
    _, bits = tl.associative_scan((block, bit), 0, _first_run_or_combine, reverse=True)
    valid = block < NONE
    first = valid & (run == 1)
    tl.store(list_base + count - 1, block, mask=first)
    tl.store(bits_base + count - 1, bits, mask=first)
    return tl.max(tl.where(valid, count, 0), axis=0)


@triton.jit(do_not_specialize=["num_kv_heads", "union_capacity"])
def _attend_union_kernel(
        q_ptr, key_cache_ptr, value_cache_ptr, table_ptr, qsl_ptr, seq_lens_ptr,
        indices_ptr,        # [N, H, TOPK] int32 selected blocks, ascending, -1 padded
        out_ptr,            # [N, HQ, DV] view: o_slc (gated) or the merged output
        tile_req_ptr, tile_qoff_ptr,   # the plan's attend tiles
        union_blocks_ptr,   # [tiles, H, union_capacity] int32 scratch
        union_tokens_ptr,   # [tiles, H, union_capacity] int64 scratch
        q_tok, q_head, kc_page, kc_slot, kc_head, vc_page, vc_slot, vc_head, table_row,
        out_tok, out_head, out_set,
        num_kv_heads, union_capacity,
        qk_scale,           # softmax scale * log2(e)
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr,
        D: tl.constexpr, DV: tl.constexpr, PAGE_SIZE: tl.constexpr,
        SELECT_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
        TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, WINDOW: tl.constexpr,
        GATED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (query tiles, H): one program owns BLOCK_T consecutive tokens of one request x
    the GP (padded) query heads of one KV head, BLOCK_T * GP rows of full tensor-core
    tiles. It first lists the union of its tokens' selected blocks (`_union_list`), then
    walks that list, loading each block once for all rows (a row attends only the blocks
    its token selected: one bit per token), then the tile's window span (a row attends its
    own window; merged: minus the blocks it already attended). A plain loop over a list,
    so Triton can prefetch the next block's keys. Neighbouring tokens select mostly the
    same blocks, so the union is small (benchmarks/selection_union.py). Sets as in
    _attend_kernel; no split. Mirrors paged.attend."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req, q_off = tile_request(tile_req_ptr, tile_qoff_ptr, tile, False)
    if req < 0:
        return
    q_len, context, token, group_head, position, row_valid, last_position = tile_rows(
        qsl_ptr, seq_lens_ptr, req, q_off, G, GP, BLOCK_T)
    if q_off >= q_len:
        return
    token = token.to(tl.int64)
    head = kv_head * G + group_head
    d = tl.arange(0, D)
    q = tl.load(q_ptr + token[:, None] * q_tok + head[:, None] * q_head + d[None, :],
                mask=row_valid[:, None], other=0.0)
    # Each tile token's selection once (rows repeat it GP times).
    tile_tokens = tl.arange(0, BLOCK_T)
    token_ok = q_off + tile_tokens < q_len
    first_token = tl.load(qsl_ptr + req).to(tl.int64) + q_off
    topk_offs = tl.arange(0, TOPK_PAD)
    selected = tl.load(indices_ptr + ((first_token + tile_tokens[:, None]) * num_kv_heads
                                      + kv_head) * TOPK + topk_offs[None, :],
                       mask=token_ok[:, None] & (topk_offs[None, :] < TOPK), other=-1)
    list_row = (tile * num_kv_heads + kv_head).to(tl.int64) * union_capacity
    union_size = _union_list(selected, union_blocks_ptr + list_row,
                             union_tokens_ptr + list_row, BLOCK_T, TOPK_PAD)
    tl.debug_barrier()   # the list is written by some threads and read by all
    row_token = (tl.arange(0, BLOCK_T * GP) // GP).to(tl.int64)
    dv = tl.arange(0, DV)
    out_ptrs = out_ptr + token[:, None] * out_tok + head[:, None] * out_head + dv[None, :]
    ROWS: tl.constexpr = BLOCK_T * GP
    SUB: tl.constexpr = SELECT_BLOCK // BLOCK_K
    row_max = tl.full([ROWS], float("-inf"), tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV], tl.float32)
    zero = tl.zeros([ROWS], tl.int32)
    for entry in range(0, union_size):
        block = tl.load(union_blocks_ptr + list_row + entry)
        attends = ((tl.load(union_tokens_ptr + list_row + entry) >> row_token) & 1) != 0
        for sub in tl.static_range(SUB):
            start = block * SELECT_BLOCK + sub * BLOCK_K
            row_max, row_sum, acc = _attend_tile(
                q, key_cache_ptr, value_cache_ptr, table_ptr, req, table_row, start, zero,
                tl.where(attends, position - start, -1), last_position - start, kv_head,
                kc_page, kc_slot, kc_head, vc_page, vc_slot, vc_head, qk_scale, row_max,
                row_sum, acc, PAGE_SIZE, BLOCK_K, D, DV, DOT_PRECISION)
    if GATED:
        tl.store(out_ptrs, normalise(acc, row_sum).to(out_ptrs.dtype.element_ty),
                 mask=row_valid[:, None])
        row_max = tl.full([ROWS], float("-inf"), tl.float32)
        row_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DV], tl.float32)
    if WINDOW > 0:
        first_position = context + q_off
        window_first = position - WINDOW + 1                                     # [ROWS]
        for tile_k in range(tl.maximum(first_position - WINDOW + 1, 0) // BLOCK_K,
                            last_position // BLOCK_K + 1):
            first = tile_k * BLOCK_K
            hi = position - first
            if not GATED:
                # Merged mode: a row's already attended block adds nothing here.
                taken = tl.max((selected == first // SELECT_BLOCK).to(tl.int32), axis=1)
                taken_rows = tl.reshape(tl.broadcast_to(taken[:, None], [BLOCK_T, GP]),
                                        [ROWS])
                hi = tl.where(taken_rows == 0, hi, -1)
            row_max, row_sum, acc = _attend_tile(
                q, key_cache_ptr, value_cache_ptr, table_ptr, req, table_row, first,
                window_first - first, hi, last_position - first, kv_head, kc_page, kc_slot,
                kc_head, vc_page, vc_slot, vc_head, qk_scale, row_max, row_sum, acc,
                PAGE_SIZE, BLOCK_K, D, DV, DOT_PRECISION)
    if GATED:
        out_ptrs += out_set
    tl.store(out_ptrs, normalise(acc, row_sum).to(out_ptrs.dtype.element_ty),
             mask=row_valid[:, None])


def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
           block_indices: torch.Tensor, config: NSAConfig, scale: float,
           o_slc: torch.Tensor, o_win: torch.Tensor | None, plan: StepPlan) -> None:
    """Selected blocks + sliding window into o_slc (merged) or o_slc and o_win (gated).
    See paged.attend."""
    if plan.num_tokens == 0:
        return
    gated = o_win is not None
    if gated and (o_win.stride(0), o_win.stride(1)) != (o_slc.stride(0), o_slc.stride(1)):
        raise ValueError("o_slc and o_win must be views of one [N, HQ, 3, Dv] output")
    out_set = (o_win.data_ptr() - o_slc.data_ptr()) // o_slc.element_size() if gated else 0
    if plan.attend_union:
        q_strides = q.stride()
        key_cache_strides = key_cache.stride()
        value_cache_strides = value_cache.stride()
        o_slc_strides = o_slc.stride()
        launch(_attend_union_kernel, (plan.num_attend_tiles, plan.num_kv_heads),
            q_ptr=q, key_cache_ptr=key_cache, value_cache_ptr=value_cache,
            table_ptr=block_table, qsl_ptr=query_start_loc, seq_lens_ptr=seq_lens,
            indices_ptr=block_indices, out_ptr=o_slc, tile_req_ptr=plan.attend_tile_req,
            tile_qoff_ptr=plan.attend_tile_qoff, union_blocks_ptr=plan.union_blocks,
            union_tokens_ptr=plan.union_tokens, q_tok=q_strides[0], q_head=q_strides[1],
            kc_page=key_cache_strides[0], kc_slot=key_cache_strides[1],
            kc_head=key_cache_strides[2], vc_page=value_cache_strides[0],
            vc_slot=value_cache_strides[1], vc_head=value_cache_strides[2],
            table_row=block_table.stride(0), out_tok=o_slc_strides[0],
            out_head=o_slc_strides[1], out_set=out_set, num_kv_heads=plan.num_kv_heads,
            union_capacity=plan.union_blocks.shape[2],
            qk_scale=scale * LOG2E.value, G=plan.group, GP=plan.group_pad,
            BLOCK_T=plan.attend_block_t, D=plan.head_dim, DV=plan.value_dim,
            PAGE_SIZE=plan.page_size, SELECT_BLOCK=config.select_block,
            BLOCK_K=plan.block_k, TOPK=config.select_topk,
            TOPK_PAD=pow2(config.select_topk), WINDOW=config.window, GATED=gated,
            DOT_PRECISION=plan.dot_precision, **UNION_LAUNCH)
        return
    parts = plan.attend_parts
    split = parts is not None
    q_strides = q.stride()
    key_cache_strides = key_cache.stride()
    value_cache_strides = value_cache.stride()
    o_slc_strides = o_slc.stride()
    launch(_attend_kernel, (plan.num_tokens, plan.num_kv_heads, plan.attend_splits),
        q_ptr=q, key_cache_ptr=key_cache, value_cache_ptr=value_cache, table_ptr=block_table,
        qsl_ptr=query_start_loc, seq_lens_ptr=seq_lens, indices_ptr=block_indices,
        out_ptr=o_slc,
        part_max_ptr=parts.row_max if split else None,
        part_sum_ptr=parts.row_sum if split else None,
        part_acc_ptr=parts.acc if split else None,
        q_tok=q_strides[0], q_head=q_strides[1],
        kc_page=key_cache_strides[0], kc_slot=key_cache_strides[1], kc_head=key_cache_strides[2],
        vc_page=value_cache_strides[0], vc_slot=value_cache_strides[1],
        vc_head=value_cache_strides[2], table_row=block_table.stride(0),
        out_tok=o_slc_strides[0], out_head=o_slc_strides[1], out_set=out_set,
        num_reqs=plan.num_reqs, num_heads=plan.num_heads, num_kv_heads=plan.num_kv_heads,
        num_splits=plan.attend_splits,
        steps_per_split=-(-plan.attend_steps // plan.attend_splits),
        qk_scale=scale * LOG2E.value,
        G=plan.group, ROWS=plan.attend_rows, D=plan.head_dim, DV=plan.value_dim,
        PAGE_SIZE=plan.page_size, SELECT_BLOCK=config.select_block, BLOCK_K=plan.block_k,
        TOPK=config.select_topk, TOPK_PAD=pow2(config.select_topk), WINDOW=config.window,
        GATED=gated, DOT_PRECISION=plan.dot_precision)
    if split:
        combine(parts, query_start_loc, o_slc, out_set, None)
