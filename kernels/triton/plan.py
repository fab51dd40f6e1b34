"""The launch plan of one step: tile shapes, split counts and scratch buffers of every
stage, computed once from host-known sizes (tensor shapes, config, hints) — no host syncs
and no data-dependent allocation, so a decode step can be captured in a CUDA graph.

The backend builds one plan per step (the first layer's forward) and every NSA layer of the
step reuses it (same shapes, same scratch buffers, consumed in stream order).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.triton.launch import launch
from vllm_nsa.support import check_supported

# Rows of a query tile in the tensor-core dots (tl.dot needs >= 16).
MIN_ROWS = 16
# Tokens per prefill tile of the "bounds" selection: it scores each token's folded query
# (one row per token, not per head), so its tiles need not shrink with G. Each tile reads
# every block's bounds once for all its tokens: at 64k on an H200 the select took 16.5 /
# 9.0 / 5.6 ms at (32, 8) with 16 / 32 / 64 tokens (BENCHMARKS.md).
BOUNDS_SELECT_TOKENS = 64
# Rows (tokens x padded heads) of a union attention tile, at most 64 tokens (the union
# lists keep one bit per token in an int64). 128 rows share more blocks per token but
# lost on an H100 at 64k (bench_kernels "tune" at 5abb455, before the int32 key tiles:
# (32, 8) 26.0 ms at 64 rows vs 32.4 ms at 128 rows with 8 warps, 34.6 with 4; (64, 4)
# 21.9 vs 23.5).
UNION_ROWS = 64
UNION_MAX_TOKENS = 64
# Split counts are runtime arguments (a new batch shape never compiles a new kernel); the
# merges size their loads by this cap.
MAX_SPLITS = 64
# How prefill rows attend: "union" (one program per query tile over the union of its
# tokens' blocks: issue 15's tiling, the default since it was timed on an H200,
# BENCHMARKS.md) or "token" (one program per (token, KV head)). Read once at import.
PREFILL_ATTEND = os.environ.get("VLLM_NSA_PREFILL_ATTEND", "union")
PREFILL_ATTEND_CHOICES = ("token", "union")


def pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 16
    return torch.cuda.get_device_properties(device).multi_processor_count


def fill_splits(busy_programs: int, max_work_items: int, device: torch.device,
                waves: int = 4) -> int:
    """Programs per unit of work so about `waves` waves of programs fill the GPU, a power
    of two at most MAX_SPLITS (splits left without work cost nothing)."""
    wanted = -(-waves * num_sms(device) // max(1, busy_programs))
    return min(MAX_SPLITS, pow2(max(1, min(max_work_items, wanted))))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must score blocks exactly as the fp32 reference does (tf32 would reorder
    # near-ties); half types go through the tensor cores as they are.
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclasses.dataclass
class Partials:
    """Online-softmax partials of programs that split one row's keys, merged by `combine`:
    [N, HQ, sets, splits] running max and sum (base 2) and [..., Dv] unnormalised output
    (None when only the LSE is wanted)."""
    row_max: torch.Tensor
    row_sum: torch.Tensor
    acc: torch.Tensor | None

    @classmethod
    def empty(cls, num_tokens: int, num_heads: int, sets: int, splits: int, value_dim: int,
              with_values: bool, device: torch.device) -> "Partials":
        f32 = dict(dtype=torch.float32, device=device)
        row_max = torch.empty((num_tokens, num_heads, sets, splits), **f32)
        acc = torch.empty((*row_max.shape, value_dim), **f32) if with_values else None
        return cls(row_max, torch.empty_like(row_max), acc)

    @property
    def splits(self) -> int:
        return self.row_max.shape[-1]


@dataclasses.dataclass
class StepPlan:
    # batch
    num_tokens: int
    num_reqs: int
    num_heads: int
    num_kv_heads: int
    group: int               # G: query heads per KV head
    group_pad: int           # GP: G padded to a power of two (rows per token in a tile)
    head_dim: int
    value_dim: int
    page_size: int
    decode: bool             # one query token per request: tile r is request r
    dot_precision: str
    # score + select: query tiles of block_t tokens x GP heads over the compressed keys
    block_t: int
    num_q_tiles: int
    tile_req: torch.Tensor | None    # [num_q_tiles] int32 request (-1 unused); None: decode
    tile_qoff: torch.Tensor | None   # [num_q_tiles] int32 first query offset in the request
    # prefill "bounds" select: its own tiles of select_block_t tokens (same form as above)
    select_block_t: int
    num_select_tiles: int
    select_tile_req: torch.Tensor | None
    select_tile_qoff: torch.Tensor | None
    scan_bound: int          # longest context the split count is sized for
    select_tile_blocks: int  # BB: selection blocks per scan tile
    select_tile_entries: int  # BC: compressed entries per scan tile (BB * l' / d)
    scan_tiles: int          # scan tiles covering scan_bound
    scan_splits: int         # programs sharing one query tile's scan (each takes its share
                             # of the tiles its own request reaches; "bounds" decode: of
                             # one (token, KV head)'s bounds)
    lse: torch.Tensor        # [N, HQ] float32: the score stage's output
    # [N, H, n] int32: the select stage's output, -1 filled once per step: every layer's
    # select writes all n entries of the same rows (real tokens'), and its attend reads
    # them before the next layer's select (one torch.full per layer less).
    block_indices: torch.Tensor
    score_parts: Partials | None     # scan split: partials for combine
    # Decode selection scratch, rows sized by the block table's capacity, so no context
    # the cache can hold overflows them.
    blocks_row: int          # selection blocks per row (whole scan tiles)
    tiles_row: int           # scan tiles per row
    own_sums: torch.Tensor | None     # [N, HQ, blocks_row] block sums of each scan tile
    spill_sums: torch.Tensor | None   # [N, HQ, blocks_row] their spill into the next block
    tile_max: torch.Tensor | None     # [N, HQ, tiles_row] their reference max
    block_scores: torch.Tensor | None  # [N, H, blocks_row] group importance or bounds
    select_candidates: torch.Tensor | None  # prefill scan split: [N, H, splits, BB] top keys
    # attend: selected tiles then window tiles of block_k keys, per (token, KV head), or
    # (attend_union) per query tile over the union of its tokens' blocks, unsplit
    attend_union: bool
    # union tiles of attend_block_t tokens (same form as the score tiles) and each tile's
    # union list: its blocks ascending and, per block, a bit per tile token that selected it
    attend_block_t: int
    num_attend_tiles: int
    attend_tile_req: torch.Tensor | None
    attend_tile_qoff: torch.Tensor | None
    union_blocks: torch.Tensor | None   # [attend tiles, H, union_capacity] int32
    union_tokens: torch.Tensor | None   # [attend tiles, H, union_capacity] int64 bits
    attend_rows: int
    block_k: int
    attend_steps: int
    attend_splits: int
    attend_parts: Partials | None    # attend split: [N, HQ, sets, splits] (sets: 1 or 2)


# Query tiles per program of `_query_tiles_kernel`, and requests per step of its scan.
TILE_IDS = 128
TILE_REQS = 64


@triton.jit
def _query_tiles_kernel(qsl_ptr, tile_req_ptr, tile_qoff_ptr, num_reqs, num_tiles,
                        BLOCK_T: tl.constexpr, TILES: tl.constexpr, REQS: tl.constexpr):
    """Tiles [pid * TILES, +TILES): the request whose tiles hold each (or -1) and its first
    query offset there. Request r's tiles follow those of requests < r, ceil(len_r /
    BLOCK_T) of them; one scan over the requests, REQS at a time."""
    tiles = tl.program_id(0) * TILES + tl.arange(0, TILES)
    tile_req = tl.full([TILES], -1, tl.int32)
    tile_qoff = tl.zeros([TILES], tl.int32)
    tiles_before = tl.sum(tl.zeros([REQS], tl.int32), axis=0)
    for start in range(0, num_reqs, REQS):
        reqs = start + tl.arange(0, REQS)
        valid = reqs < num_reqs
        query_lens = (tl.load(qsl_ptr + reqs + 1, mask=valid, other=0)
                      - tl.load(qsl_ptr + reqs, mask=valid, other=0))
        counts = (query_lens + BLOCK_T - 1) // BLOCK_T
        ends = tiles_before + tl.cumsum(counts, axis=0)
        begins = ends - counts
        # At most one request's [begin, end) holds a tile.
        owns = (begins[None, :] <= tiles[:, None]) & (tiles[:, None] < ends[None, :])
        tile_req = tl.where(tl.max(owns.to(tl.int32), axis=1) > 0,
                            tl.sum(tl.where(owns, reqs[None, :], 0), axis=1), tile_req)
        tile_qoff += tl.sum(tl.where(owns, (tiles[:, None] - begins[None, :]) * BLOCK_T, 0),
                            axis=1)
        tiles_before += tl.sum(counts, axis=0)
    tl.store(tile_req_ptr + tiles, tile_req, mask=tiles < num_tiles)
    tl.store(tile_qoff_ptr + tiles, tile_qoff, mask=tiles < num_tiles)


def query_tiles(query_start_loc: torch.Tensor, num_tokens: int, block_t: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of block_t consecutive query tokens of one request: (request or -1, first query
    offset; 0 for unused tiles) for a grid sized from host-known numbers only (no sync).
    One launch (torch ops cost ~20 launches); twin: `query_tiles_torch`."""
    num_reqs = query_start_loc.shape[0] - 1
    max_tiles = -(-num_tokens // block_t) + num_reqs
    tile_req = torch.empty(max_tiles, dtype=torch.int32, device=query_start_loc.device)
    tile_qoff = torch.empty_like(tile_req)
    launch(_query_tiles_kernel, (-(-max_tiles // TILE_IDS),), qsl_ptr=query_start_loc,
           tile_req_ptr=tile_req, tile_qoff_ptr=tile_qoff, num_reqs=num_reqs,
           num_tiles=max_tiles, BLOCK_T=block_t, TILES=TILE_IDS, REQS=TILE_REQS)
    return tile_req, tile_qoff


def query_tiles_torch(query_start_loc: torch.Tensor, num_tokens: int, block_t: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of `query_tiles`."""
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
    tile_qoff = torch.where(valid, (tile_ids - first_tile) * block_t, 0).to(torch.int32)
    return tile_req, tile_qoff


def make_plan(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              block_table: torch.Tensor, query_start_loc: torch.Tensor, config: NSAConfig,
              gated: bool, *,
              max_query_len: int | None = None, scan_bound: int | None = None,
              num_splits: int | None = None, prefill_attend: str | None = None) -> StepPlan:
    """The plan of one step. Hints (host ints, CUDA-graph safe): max_query_len (1 = all
    decodes: one tile per request), scan_bound (must bound every seq_len; default: the
    block table's capacity), num_splits (programs sharing one row's scan and its
    attention; default: enough to fill the GPU), prefill_attend (PREFILL_ATTEND_CHOICES;
    default: $VLLM_NSA_PREFILL_ATTEND, else "union")."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = key_cache.shape
    value_dim = value_cache.shape[3]
    check_supported(config, "Triton NSA", head_size=head_dim, head_size_v=value_dim,
                    num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=page_size,
                    dtype=q.dtype)
    device = q.device
    num_reqs = query_start_loc.shape[0] - 1
    group = num_heads // num_kv_heads
    group_pad = pow2(group)
    decode = (max_query_len == 1) if max_query_len is not None else num_tokens <= num_reqs
    if scan_bound is None:
        scan_bound = block_table.shape[1] * page_size
    f32 = dict(dtype=torch.float32, device=device)

    # score + select: all rows of a program share the compressed-key loads.
    block_t = max(1, MIN_ROWS // group_pad) if decode else max(1, 64 // group_pad)
    tile_blocks = max(pow2(config.select_topk), 16)
    tile_entries = tile_blocks * config.select_block // config.compress_stride
    scan_tiles = -(-config.num_select_blocks(scan_bound) // tile_blocks)
    # The "bounds" scorer runs no score stage: no block sums, no score partials.
    score_stage = config.uses_compressed
    select_block_t = block_t if score_stage or decode else BOUNDS_SELECT_TOKENS
    if decode:
        tile_req = tile_qoff = select_tile_req = select_tile_qoff = None
        num_q_tiles = num_select_tiles = num_reqs
        busy_tiles = num_reqs
    else:
        tile_req, tile_qoff = query_tiles(query_start_loc, num_tokens, block_t)
        select_tile_req, select_tile_qoff = (
            (tile_req, tile_qoff) if select_block_t == block_t
            else query_tiles(query_start_loc, num_tokens, select_block_t))
        num_q_tiles = tile_req.shape[0]
        num_select_tiles = select_tile_req.shape[0]
        # The scan (score, or the bounds select) runs over the select tiles.
        busy_tiles = min(num_select_tiles, -(-num_tokens // select_block_t))
    # A split bounds prefill select pays a top-n merge per (token, KV head): split only
    # when its tiles cannot fill one wave (8k at (64, 4): 2 splits cost 2.5 ms on an H200).
    scan_waves = 4 if score_stage or decode else 1
    scan_splits = num_splits or fill_splits(num_kv_heads * max(1, busy_tiles), scan_tiles,
                                            device, scan_waves)
    tiles_row = -(-config.num_select_blocks(block_table.shape[1] * page_size) // tile_blocks)
    blocks_row = tiles_row * tile_blocks
    decode_scratch = dict(own_sums=None, spill_sums=None, tile_max=None, block_scores=None)
    if decode:
        decode_scratch["block_scores"] = torch.empty((num_tokens, num_kv_heads, blocks_row),
                                                     **f32)
    if decode and score_stage:
        decode_scratch.update(
            own_sums=torch.empty((num_tokens, num_heads, blocks_row), **f32),
            spill_sums=torch.empty((num_tokens, num_heads, blocks_row), **f32),
            tile_max=torch.empty((num_tokens, num_heads, tiles_row), **f32))
    score_parts = (Partials.empty(num_tokens, num_heads, 1, scan_splits, value_dim, gated,
                                  device) if scan_splits > 1 and score_stage else None)
    select_candidates = None
    if scan_splits > 1 and not decode:
        select_candidates = torch.empty((num_tokens, num_kv_heads, scan_splits, tile_blocks),
                                        dtype=torch.int64, device=device)

    # attend: selected tiles then window tiles, split across programs when there are too
    # few (token, KV head) pairs to fill the GPU (decode).
    block_k = min(config.select_block, 64)
    window_tiles = (config.window - 1) // block_k + 2 if config.window else 0
    attend_steps = config.select_topk * (config.select_block // block_k) + window_tiles
    prefill_attend = prefill_attend or PREFILL_ATTEND
    if prefill_attend not in PREFILL_ATTEND_CHOICES:
        raise ValueError(f"prefill_attend (VLLM_NSA_PREFILL_ATTEND) is {prefill_attend!r}; "
                         f"allowed: {', '.join(PREFILL_ATTEND_CHOICES)}")
    attend_union = prefill_attend == "union" and not decode
    attend_block_t = min(UNION_MAX_TOKENS, max(1, UNION_ROWS // group_pad))
    attend_tile_req = attend_tile_qoff = union_blocks = union_tokens = None
    num_attend_tiles = 0
    if attend_union:
        attend_tile_req, attend_tile_qoff = (
            (tile_req, tile_qoff) if attend_block_t == block_t
            else query_tiles(query_start_loc, num_tokens, attend_block_t))
        num_attend_tiles = attend_tile_req.shape[0]
        # A tile's union has at most every selection of its tokens, and at most every
        # block of the longest context.
        union_capacity = min(attend_block_t * config.select_topk,
                             config.num_select_blocks(scan_bound))
        union_blocks = torch.empty((num_attend_tiles, num_kv_heads, union_capacity),
                                   dtype=torch.int32, device=device)
        union_tokens = torch.empty(union_blocks.shape, dtype=torch.int64, device=device)
    attend_splits = 1 if attend_union else (
        num_splits or fill_splits(num_tokens * num_kv_heads, attend_steps, device))
    attend_parts = (Partials.empty(num_tokens, num_heads, 2 if gated else 1, attend_splits,
                                   value_dim, True, device) if attend_splits > 1 else None)
    return StepPlan(
        num_tokens=num_tokens, num_reqs=num_reqs, num_heads=num_heads,
        num_kv_heads=num_kv_heads, group=group, group_pad=group_pad, head_dim=head_dim,
        value_dim=value_dim, page_size=page_size, decode=decode,
        dot_precision=dot_precision(q.dtype), block_t=block_t, num_q_tiles=num_q_tiles,
        tile_req=tile_req, tile_qoff=tile_qoff, select_block_t=select_block_t,
        num_select_tiles=num_select_tiles, select_tile_req=select_tile_req,
        select_tile_qoff=select_tile_qoff, scan_bound=scan_bound,
        select_tile_blocks=tile_blocks, select_tile_entries=tile_entries,
        scan_tiles=scan_tiles, scan_splits=scan_splits,
        lse=torch.empty((num_tokens, num_heads), **f32), score_parts=score_parts,
        block_indices=torch.full((num_tokens, num_kv_heads, config.select_topk), -1,
                                 dtype=torch.int32, device=device),
        blocks_row=blocks_row, tiles_row=tiles_row, **decode_scratch,
        select_candidates=select_candidates, attend_union=attend_union,
        attend_block_t=attend_block_t, num_attend_tiles=num_attend_tiles,
        attend_tile_req=attend_tile_req, attend_tile_qoff=attend_tile_qoff,
        union_blocks=union_blocks, union_tokens=union_tokens,
        attend_rows=max(MIN_ROWS, group_pad),
        block_k=block_k, attend_steps=attend_steps, attend_splits=attend_splits,
        attend_parts=attend_parts)
