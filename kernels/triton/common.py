"""Jit helpers shared by the stage kernels: written once, inlined where they are called.

Query tiles: a prefill/mixed batch is cut into tiles of BLOCK_T consecutive query tokens
of one request (`plan.query_tiles`), each row of a tile one (token, query head of the KV
group); a decode batch has one tile per request (tile r is request r, no tile table).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Scores run in base 2 (exp2/log2, the scale folded with log2(e)); stage outputs carry
# natural-log LSEs like the reference.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def num_compressed(position, CBLOCK: tl.constexpr, STRIDE: tl.constexpr):
    """C(t): compressed entries whose whole window is at or before t (mirrors
    NSAConfig.num_compressed, which counts tokens: C(t) = num_compressed(t + 1))."""
    return tl.where(position >= CBLOCK - 1, (position - CBLOCK + 1) // STRIDE + 1, 0)


@triton.jit
def tile_request(tile_req_ptr, tile_qoff_ptr, tile, DECODE: tl.constexpr):
    """(request, first query offset) of a query tile; -1 for an unused tile."""
    if DECODE:
        req = tile
        q_off = tile * 0
    else:
        req = tl.load(tile_req_ptr + tile)
        q_off = tl.load(tile_qoff_ptr + tile)
    return req, q_off


@triton.jit
def tile_rows(qsl_ptr, seq_lens_ptr, req, q_off,
              G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr):
    """The rows of a query tile: BLOCK_T consecutive tokens of one request x GP (padded)
    heads per token; row = token_in_tile * GP + head_in_group."""
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
def request_of(qsl_ptr, num_reqs, token):
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
def compressed_entries(cmp_ptr, table_ptr, req, table_row, entries, entry_ok, kv_head,
                       c_page, c_slot, c_head,
                       PAGE_SIZE: tl.constexpr, STRIDE: tl.constexpr, CBLOCK: tl.constexpr,
                       DIM: tl.constexpr):
    """[len(entries), DIM] compressed keys or values: entry i lives in the page of its last
    raw token i*d + l - 1 (kernels/README.md, "Paged cache layout")."""
    last = entries.to(tl.int64) * STRIDE + CBLOCK - 1
    pages = tl.load(table_ptr + req * table_row + last // PAGE_SIZE, mask=entry_ok,
                    other=0).to(tl.int64)
    slots = (last % PAGE_SIZE) // STRIDE
    dims = tl.arange(0, DIM)
    return tl.load(cmp_ptr + pages[:, None] * c_page + slots[:, None] * c_slot
                   + kv_head * c_head + dims[None, :], mask=entry_ok[:, None], other=0.0)


@triton.jit
def online_softmax_step(scores, values, row_max, row_sum, acc, WITH_VALUES: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores [R, K] (-inf where masked) and its values [K, DV]
    into the running (max, sum, unnormalised acc) of each row. Also returns the tile's
    probabilities 2^(s - m) [R, K] and their reference m [R] (the new running max, 0 while
    a row has seen nothing)."""
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp2(row_max - safe_max)
    probs = tl.exp2(scores - safe_max[:, None])
    row_sum = row_sum * alpha + tl.sum(probs, axis=1)
    if WITH_VALUES:
        acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values,
                                            input_precision=DOT_PRECISION)
    return new_max, row_sum, acc, probs, safe_max


@triton.jit
def overlap(entries, blocks, COMPRESS_BLOCK: tl.constexpr, COMPRESS_STRIDE: tl.constexpr,
            SELECT_BLOCK: tl.constexpr):
    """omega(i, j) = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d (spec Eq. 9), broadcast.
    Mirrors reference.overlap_weights."""
    lo = tl.maximum(entries * COMPRESS_STRIDE, blocks * SELECT_BLOCK)
    hi = tl.minimum(entries * COMPRESS_STRIDE + COMPRESS_BLOCK, (blocks + 1) * SELECT_BLOCK)
    return tl.maximum(hi - lo, 0).to(tl.float32) / COMPRESS_STRIDE


@triton.jit
def log2_sum_exp(row_max, row_sum):
    """Base-2 log-sum-exp of a finished row; -inf for a row that saw no key."""
    return tl.where(row_sum > 0, row_max + tl.log2(tl.where(row_sum > 0, row_sum, 1.0)),
                    float("-inf"))


@triton.jit
def normalise(acc, row_sum):
    """Softmax output of a finished row (0 for a row that saw no key)."""
    return acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]


@triton.jit
def store_partial(part_max_ptr, part_sum_ptr, part_acc_ptr, part, row_max, row_sum, acc,
                  row_valid, DV: tl.constexpr, WITH_VALUES: tl.constexpr):
    """One split's online-softmax partial of rows `part` (flat partial indices) for
    `combine`."""
    tl.store(part_max_ptr + part, row_max, mask=row_valid)
    tl.store(part_sum_ptr + part, row_sum, mask=row_valid)
    if WITH_VALUES:
        dv = tl.arange(0, DV)
        tl.store(part_acc_ptr + part[:, None] * DV + dv[None, :], acc,
                 mask=row_valid[:, None])
