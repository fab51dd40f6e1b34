"""The "bounds" selection scorer's cache writes: per complete selection block, the
elementwise min and max of its keys (Quest), stored in the page of the block's last raw
token (kernels/README.md, "Paged cache layout"). Twin: paged.write_bounds."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.triton.launch import launch


@triton.jit
def _bounds_kernel(
        key_cache_ptr,      # [P, page_size, H, D]
        bound_min_ptr,      # [P, bounds_per_page, H, D]
        bound_max_ptr,      # [P, bounds_per_page, H, D]
        table_ptr,          # [R, max_pages] int32
        emit_req_ptr,       # [E] int32 block-table row; -1 = padding
        emit_block_ptr,     # [E] int32 selection block j
        # strides (elements)
        kc_page, kc_slot, kc_head, mn_page, mn_slot, mn_head, mx_page, mx_slot, mx_head,
        table_row,
        PAGE_SIZE: tl.constexpr, SELECT_BLOCK: tl.constexpr, D: tl.constexpr):
    """Grid (E, H): one program takes the l' raw keys of block emit_block[e] of request
    emit_req[e], KV head h, and stores their min and max at the page of the block's last
    token, slot (last % page_size) // l'. Mirrors paged.write_bounds."""
    entry = tl.program_id(0)
    head = tl.program_id(1)
    req = tl.load(emit_req_ptr + entry)
    if req >= 0:
        start = tl.load(emit_block_ptr + entry).to(tl.int64) * SELECT_BLOCK
        positions = start + tl.arange(0, SELECT_BLOCK)
        pages = tl.load(table_ptr + req * table_row + positions // PAGE_SIZE).to(tl.int64)
        slots = positions % PAGE_SIZE
        d = tl.arange(0, D)
        keys = tl.load(key_cache_ptr + pages[:, None] * kc_page + slots[:, None] * kc_slot
                       + head * kc_head + d[None, :])
        last = start + SELECT_BLOCK - 1
        dest_page = tl.load(table_ptr + req * table_row + last // PAGE_SIZE).to(tl.int64)
        dest_slot = (last % PAGE_SIZE) // SELECT_BLOCK
        tl.store(bound_min_ptr + dest_page * mn_page + dest_slot * mn_slot + head * mn_head + d,
                 tl.min(keys, axis=0).to(bound_min_ptr.dtype.element_ty))
        tl.store(bound_max_ptr + dest_page * mx_page + dest_slot * mx_slot + head * mx_head + d,
                 tl.max(keys, axis=0).to(bound_max_ptr.dtype.element_ty))


def write_bounds(key_cache: torch.Tensor, bound_min_cache: torch.Tensor,
                 bound_max_cache: torch.Tensor, block_table: torch.Tensor,
                 emit_req: torch.Tensor, emit_block: torch.Tensor, config: NSAConfig) -> None:
    """Store the key bounds of the blocks listed by (emit_req, emit_block); rows with
    emit_req < 0 are padding and are skipped on the device (graph-safe)."""
    num_entries = emit_req.shape[0]
    if num_entries == 0:
        return
    key_cache_strides = key_cache.stride()
    bound_min_cache_strides = bound_min_cache.stride()
    bound_max_cache_strides = bound_max_cache.stride()
    launch(_bounds_kernel, (num_entries, key_cache.shape[2]),
        key_cache_ptr=key_cache, bound_min_ptr=bound_min_cache,
        bound_max_ptr=bound_max_cache, table_ptr=block_table, emit_req_ptr=emit_req,
        emit_block_ptr=emit_block,
        kc_page=key_cache_strides[0], kc_slot=key_cache_strides[1], kc_head=key_cache_strides[2],
        mn_page=bound_min_cache_strides[0], mn_slot=bound_min_cache_strides[1],
        mn_head=bound_min_cache_strides[2],
        mx_page=bound_max_cache_strides[0], mx_slot=bound_max_cache_strides[1],
        mx_head=bound_max_cache_strides[2], table_row=block_table.stride(0),
        PAGE_SIZE=key_cache.shape[1], SELECT_BLOCK=config.select_block,
        D=key_cache.shape[3])
