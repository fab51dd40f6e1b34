"""NSA over vLLM's paged caches, in torch: the CPU serving path and the twin of the Triton
stages in `triton/` (same function names, same signatures; the Triton `plan` argument is
accepted and ignored). Cache layout: kernels/README.md, "Paged cache layout".

The two caches after the raw K/V (`cmp_key_cache`, `cmp_value_cache` in the signatures) hold
the selection scorer's entries: the compressed K/V under selection_score "compressed", the
per-block key bounds (min, max) under "bounds" ([P, bounds_per_page, H, D] each).

Each stage gathers a request's pages and runs the sequence reference (`reference.py`) on
them, so the twin is the reference by construction. Tensors may be strided views (vLLM
allocates them inside one buffer per layer).
"""
from __future__ import annotations

import sys

import torch

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels import reference
from vllm_nsa.kernels.pipeline import run_stages


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, num_entries: int
                 ) -> torch.Tensor:
    """The first num_entries entries of one request's paged cache: [num_entries, H, D]."""
    per_page = cache.shape[1]
    num_pages = -(-num_entries // per_page)
    pages = block_table_row[:num_pages].long()
    return cache[pages].flatten(0, 1)[:num_entries]


def gather_compressed(cmp_cache: torch.Tensor, block_table_row: torch.Tensor,
                      num_tokens: int, config: NSAConfig) -> torch.Tensor:
    """The C(num_tokens - 1) compressed entries of one request: [C, H, D]."""
    offset = config.compressed_slot_offset
    return gather_pages(cmp_cache, block_table_row,
                        offset + config.num_compressed(num_tokens))[offset:]


def bounds_location(block: torch.Tensor, block_table_row: torch.Tensor, page_size: int,
                    config: NSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, slot) of selection block j's bounds: the page of its last token
    e = j*l' + l' - 1, slot (e % page_size) // l' (0 when a page is shorter than a block)."""
    last = config.bounds_entry_end(block)
    return block_table_row[last // page_size].long(), (last % page_size) // config.select_block


def gather_bounds(bounds_cache: torch.Tensor, block_table_row: torch.Tensor, num_tokens: int,
                  page_size: int, config: NSAConfig) -> torch.Tensor:
    """The bounds of the num_bounded(num_tokens) complete blocks of one request: [NBc, H, D]."""
    blocks = torch.arange(config.num_bounded(num_tokens), device=bounds_cache.device)
    pages, slots = bounds_location(blocks, block_table_row, page_size, config)
    return bounds_cache[pages, slots]


def _requests(query_start_loc: torch.Tensor, seq_lens: torch.Tensor):
    """(request, its query rows, its query positions, its seq_len) of each non-empty request."""
    starts = query_start_loc.tolist()
    for r, seq_len in enumerate(seq_lens.tolist()):
        rows = slice(starts[r], starts[r + 1])
        if rows.stop > rows.start:
            positions = reference.query_positions(rows.stop - rows.start, seq_len,
                                                  query_start_loc.device)
            yield r, rows, positions, seq_len


# ---------------------------------------------------------------- stage: write (raw K/V)
def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's raw K/V [N, H, D] at their slots (page * page_size + offset);
    slot -1 marks a padding token and is skipped."""
    num_tokens = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    page_size = key_cache.shape[1]
    pages, offsets = slots // page_size, slots % page_size
    key_cache[pages, offsets] = key[:num_tokens][valid].to(key_cache.dtype)
    value_cache[pages, offsets] = value[:num_tokens][valid].to(value_cache.dtype)


# ---------------------------------------------------------------- stage: compress
def compress(key_cache: torch.Tensor, value_cache: torch.Tensor,
             cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
             block_table: torch.Tensor, emit_req: torch.Tensor, emit_index: torch.Tensor,
             config: NSAConfig) -> None:
    """Write the selection scorer's entries that this step's tokens complete, from the raw
    paged cache: compressed entries (phi = mean), or under selection_score "bounds" the key
    bounds of selection blocks (`write_bounds`; cmp_key_cache / cmp_value_cache are then
    the min / max caches).

    emit_req [E] (row of block_table) and emit_index [E] (compressed index i, or block j)
    list the entries whose last raw token was written this step; rows with emit_req < 0
    are padding (fixed-size launches for CUDA graphs) and are skipped.
    """
    valid = emit_req >= 0
    req = emit_req[valid].long()
    index = emit_index[valid].long()
    if req.numel() == 0:
        return
    if config.uses_bounds:
        write_bounds(key_cache, cmp_key_cache, cmp_value_cache, block_table, req, index,
                     config)
        return
    page_size = key_cache.shape[1]
    positions = (index * config.compress_stride).unsqueeze(1) + torch.arange(
        config.compress_block, device=req.device)                       # [E, l]
    pages = block_table[req.unsqueeze(1), positions // page_size].long()
    slots = positions % page_size
    last = config.compressed_entry_end(index)
    dest_page = block_table[req, last // page_size].long()
    dest_slot = (last % page_size) // config.compress_stride
    for raw, compressed in ((key_cache, cmp_key_cache), (value_cache, cmp_value_cache)):
        mean = raw[pages, slots].float().mean(dim=1)                  # [E, H, D]
        compressed[dest_page, dest_slot] = mean.to(compressed.dtype)


def write_bounds(key_cache: torch.Tensor, bound_min_cache: torch.Tensor,
                 bound_max_cache: torch.Tensor, block_table: torch.Tensor, req: torch.Tensor,
                 block: torch.Tensor, config: NSAConfig) -> None:
    """The key min and max of selection block `block` [E] of request `req` [E] (no padding
    rows), stored at the page and slot of the block's last token (`bounds_location`)."""
    page_size = key_cache.shape[1]
    positions = (block * config.select_block).unsqueeze(1) + torch.arange(
        config.select_block, device=req.device)                       # [E, l']
    keys = key_cache[block_table[req.unsqueeze(1), positions // page_size].long(),
                     positions % page_size]                           # [E, l', H, D]
    last = config.bounds_entry_end(block)
    dest_page = block_table[req, last // page_size].long()
    dest_slot = (last % page_size) // config.select_block
    bound_min_cache[dest_page, dest_slot] = keys.amin(dim=1).to(bound_min_cache.dtype)
    bound_max_cache[dest_page, dest_slot] = keys.amax(dim=1).to(bound_max_cache.dtype)


def make_plan(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              block_table: torch.Tensor, query_start_loc: torch.Tensor, config: NSAConfig,
              gated: bool, **hints) -> None:
    """The torch twin launches nothing: no plan (the Triton one is kernels/triton/plan.py)."""
    return None


def warm_up(key_cache: torch.Tensor, value_cache: torch.Tensor, cmp_key_cache: torch.Tensor,
            cmp_value_cache: torch.Tensor, num_heads: int, block_table_width: int,
            config: NSAConfig, gated: bool) -> int:
    """Nothing to compile in torch (the Triton one compiles every kernel variant)."""
    return 0


# ---------------------------------------------------------------- stage: score
def score(q: torch.Tensor, cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
          block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
          config: NSAConfig, scale: float, o_cmp: torch.Tensor | None, plan=None
          ) -> torch.Tensor:
    """Compressed attention of each query token: returns LSE [N, HQ] float32 (natural log
    of the scaled scores, -inf while C(t) = 0) and writes o_cmp [N, HQ, Dv] when given
    (gated mode). Rows of padding tokens keep LSE -inf."""
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for r, rows, positions, seq_len in _requests(query_start_loc, seq_lens):
        if o_cmp is None and seq_len <= config.dense_tokens:
            continue    # merged and every block selected: nothing needs the LSE
        table_row = block_table[r]
        k_cmp = gather_compressed(cmp_key_cache, table_row, seq_len, config)
        v_cmp = gather_compressed(cmp_value_cache, table_row, seq_len, config)
        out, lse[rows] = reference.score(q[rows], k_cmp, v_cmp, positions, config, scale)
        if o_cmp is not None:
            o_cmp[rows] = out.to(o_cmp.dtype)
    return lse


# ---------------------------------------------------------------- stage: select
def _select_all(block_indices: torch.Tensor, rows: slice, positions: torch.Tensor,
                seq_len: int, config: NSAConfig) -> None:
    """Every block j <= t // l' of each row (a request of at most n*l' tokens)."""
    num_blocks = config.num_select_blocks(seq_len)
    blocks = torch.arange(num_blocks, dtype=torch.int32, device=block_indices.device)
    chosen = torch.where(blocks <= positions.view(-1, 1, 1) // config.select_block, blocks, -1)
    block_indices[rows, :, :num_blocks] = chosen


def select(q: torch.Tensor, cmp_key_cache: torch.Tensor, block_table: torch.Tensor,
           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, lse: torch.Tensor,
           config: NSAConfig, scale: float, plan=None) -> torch.Tensor:
    """Block selection from the compressed scores under the score stage's LSE: returns
    block_indices [N, H, select_topk] int32, ascending, -1 padded (padding tokens: all -1).
    Requests of at most n*l' tokens select every block (`NSAConfig.dense_tokens`) and read
    no compressed key."""
    num_kv_heads = cmp_key_cache.shape[2]
    block_indices = torch.full((q.shape[0], num_kv_heads, config.select_topk), -1,
                               dtype=torch.int32, device=q.device)
    for r, rows, positions, seq_len in _requests(query_start_loc, seq_lens):
        if seq_len <= config.dense_tokens:   # every block, whatever the scores
            _select_all(block_indices, rows, positions, seq_len, config)
            continue
        k_cmp = gather_compressed(cmp_key_cache, block_table[r], seq_len, config)
        block_indices[rows] = reference.select(q[rows], k_cmp, lse[rows], positions, seq_len,
                                               config, scale).to(torch.int32)
    return block_indices


def select_bounds(q: torch.Tensor, bound_min_cache: torch.Tensor,
                  bound_max_cache: torch.Tensor, block_table: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, config: NSAConfig,
                  scale: float, page_size: int, plan=None) -> torch.Tensor:
    """Block selection with the "bounds" scorer (merged mode; no score stage): returns
    block_indices [N, H, select_topk] int32 as `select`. Requests of at most n*l' tokens
    select every block and read no bounds."""
    num_kv_heads = bound_min_cache.shape[2]
    block_indices = torch.full((q.shape[0], num_kv_heads, config.select_topk), -1,
                               dtype=torch.int32, device=q.device)
    for r, rows, positions, seq_len in _requests(query_start_loc, seq_lens):
        if seq_len <= config.dense_tokens:
            _select_all(block_indices, rows, positions, seq_len, config)
            continue
        k_min, k_max = (gather_bounds(cache, block_table[r], seq_len, page_size, config)
                        for cache in (bound_min_cache, bound_max_cache))
        block_indices[rows] = reference.select_by_bounds(
            q[rows], k_min, k_max, positions, seq_len, config, scale).to(torch.int32)
    return block_indices


# ---------------------------------------------------------------- stage: attend
def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
           block_indices: torch.Tensor, config: NSAConfig, scale: float,
           o_slc: torch.Tensor, o_win: torch.Tensor | None, plan=None) -> None:
    """Exact attention over the selected blocks and the sliding window of the raw cache.
    Merged (o_win None): o_slc gets selected blocks ∪ window, each position once. Gated:
    o_slc and o_win get the two branches."""
    for r, rows, positions, seq_len in _requests(query_start_loc, seq_lens):
        table_row = block_table[r]
        k = gather_pages(key_cache, table_row, seq_len)
        v = gather_pages(value_cache, table_row, seq_len)
        out_slc, out_win = reference.attend(q[rows], k, v, block_indices[rows].long(),
                                            positions, config, scale, o_win is not None)
        o_slc[rows] = out_slc.to(o_slc.dtype)
        if o_win is not None:
            o_win[rows] = out_win.to(o_win.dtype)


def nsa_paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
                        block_table: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, config: NSAConfig, scale: float,
                        output: torch.Tensor, gated: bool, plan=None) -> torch.Tensor:
    """NSA for a batch of requests over the paged caches (score -> select -> attend).

    q [N, HQ, D]: request r's query tokens are q[query_start_loc[r]:query_start_loc[r+1]],
    the LAST positions of its seq_lens[r] tokens (all already in the raw cache, compressed
    entries emitted). output: [N, HQ, Dv] merged, or [N, HQ, 3, Dv] branch outputs in
    BRANCHES order (cmp, slc, win) when `gated` (the model applies its gates).
    Returns block_indices [N, H, select_topk] int32 (-1 padded).
    """
    return run_stages(sys.modules[__name__], q, key_cache, value_cache, cmp_key_cache,
                      cmp_value_cache, block_table, query_start_loc, seq_lens, config, scale,
                      output, gated, plan)
