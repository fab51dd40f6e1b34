"""The cache writes of a step: raw K/V into their slots (`write_kv`), then the compressed
entries their tokens complete (`compress`, phi = mean). Twins: kernels/paged.py."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.triton.bounds import write_bounds
from vllm_nsa.kernels.triton.launch import launch
from vllm_nsa.kernels.triton.plan import pow2


@triton.jit
def _write_kv_kernel(
        key_ptr,            # [N, H, D]
        value_ptr,          # [N, H, DV]
        key_cache_ptr,      # [P, page_size, H, D]
        value_cache_ptr,    # [P, page_size, H, DV]
        slot_mapping_ptr,   # [N] int64 slot = page * page_size + offset; -1 = padding
        # strides (elements)
        k_tok, k_head, v_tok, v_head,
        kc_page, kc_slot, kc_head, vc_page, vc_slot, vc_head,
        PAGE_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """Grid (N, H): one program stores one token's K and V of one KV head.
    Mirrors paged.write_kv."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        page = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        d = tl.arange(0, D)
        key = tl.load(key_ptr + token * k_tok + head * k_head + d)
        tl.store(key_cache_ptr + page * kc_page + offset * kc_slot + head * kc_head + d,
                 key.to(key_cache_ptr.dtype.element_ty))
        dv = tl.arange(0, DV)
        value = tl.load(value_ptr + token * v_tok + head * v_head + dv)
        tl.store(value_cache_ptr + page * vc_page + offset * vc_slot + head * vc_head + dv,
                 value.to(value_cache_ptr.dtype.element_ty))


@triton.jit
def _compress_kernel(
        key_cache_ptr,      # [P, page_size, H, D]
        value_cache_ptr,    # [P, page_size, H, DV]
        cmp_key_ptr,        # [P, page_size / d, H, D]
        cmp_value_ptr,      # [P, page_size / d, H, DV]
        table_ptr,          # [R, max_pages] int32
        emit_req_ptr,       # [E] int32 block-table row; -1 = padding
        emit_index_ptr,     # [E] int32 compressed index i
        # strides (elements)
        kc_page, kc_slot, kc_head, vc_page, vc_slot, vc_head,
        ck_page, ck_slot, ck_head, cv_page, cv_slot, cv_head, table_row,
        PAGE_SIZE: tl.constexpr,
        COMPRESS_STRIDE: tl.constexpr,      # d
        COMPRESS_BLOCK: tl.constexpr,       # l
        COMPRESS_BLOCK_PAD: tl.constexpr,   # l rounded up to a power of two
        D: tl.constexpr, DV: tl.constexpr):
    """Grid (E, H): one program averages the l raw keys and values of compressed entry
    emit_index[e] of request emit_req[e], KV head h, and stores the means in the page of the
    window's last raw token (slot (last % page_size) // d). Mirrors paged.compress."""
    entry = tl.program_id(0)
    head = tl.program_id(1)
    req = tl.load(emit_req_ptr + entry)
    if req >= 0:
        start = tl.load(emit_index_ptr + entry).to(tl.int64) * COMPRESS_STRIDE
        offs = tl.arange(0, COMPRESS_BLOCK_PAD)
        in_window = offs < COMPRESS_BLOCK
        positions = start + offs
        pages = tl.load(table_ptr + req * table_row + positions // PAGE_SIZE, mask=in_window,
                        other=0).to(tl.int64)
        slots = positions % PAGE_SIZE
        last = start + COMPRESS_BLOCK - 1
        dest_page = tl.load(table_ptr + req * table_row + last // PAGE_SIZE).to(tl.int64)
        dest_slot = (last % PAGE_SIZE) // COMPRESS_STRIDE
        d = tl.arange(0, D)
        keys = tl.load(key_cache_ptr + pages[:, None] * kc_page + slots[:, None] * kc_slot
                       + head * kc_head + d[None, :], mask=in_window[:, None], other=0.0)
        key_mean = tl.sum(keys.to(tl.float32), axis=0) / COMPRESS_BLOCK
        tl.store(cmp_key_ptr + dest_page * ck_page + dest_slot * ck_slot + head * ck_head + d,
                 key_mean.to(cmp_key_ptr.dtype.element_ty))
        dv = tl.arange(0, DV)
        values = tl.load(value_cache_ptr + pages[:, None] * vc_page + slots[:, None] * vc_slot
                         + head * vc_head + dv[None, :], mask=in_window[:, None], other=0.0)
        value_mean = tl.sum(values.to(tl.float32), axis=0) / COMPRESS_BLOCK
        tl.store(cmp_value_ptr + dest_page * cv_page + dest_slot * cv_slot + head * cv_head
                 + dv, value_mean.to(cmp_value_ptr.dtype.element_ty))


def check_inner_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.stride(-1) != 1:
            raise ValueError("NSA Triton kernels need unit stride in the head dimension")


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's raw K/V [N, H, D] at their slots; slot -1 (padding) is skipped on
    the device, so the launch is graph-safe. See paged.write_kv."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    check_inner_contiguous(key, value, key_cache, value_cache)
    key_strides = key.stride()
    value_strides = value.stride()
    key_cache_strides = key_cache.stride()
    value_cache_strides = value_cache.stride()
    launch(_write_kv_kernel, (num_tokens, key_cache.shape[2]),
        key_ptr=key, value_ptr=value, key_cache_ptr=key_cache, value_cache_ptr=value_cache,
        slot_mapping_ptr=slot_mapping,
        k_tok=key_strides[0], k_head=key_strides[1], v_tok=value_strides[0],
        v_head=value_strides[1],
        kc_page=key_cache_strides[0], kc_slot=key_cache_strides[1], kc_head=key_cache_strides[2],
        vc_page=value_cache_strides[0], vc_slot=value_cache_strides[1],
        vc_head=value_cache_strides[2],
        PAGE_SIZE=key_cache.shape[1], D=key_cache.shape[3], DV=value_cache.shape[3])


def compress(key_cache: torch.Tensor, value_cache: torch.Tensor,
             cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
             block_table: torch.Tensor, emit_req: torch.Tensor, emit_index: torch.Tensor,
             config: NSAConfig) -> None:
    """Write compressed entries (phi = mean) from the raw paged cache, or under
    selection_score "bounds" the block bounds (`bounds.write_bounds`; the cmp caches are
    then the min / max caches); see paged.compress. Rows with emit_req < 0 are padding
    and are skipped (fixed-size launches for graphs)."""
    num_entries = emit_req.shape[0]
    if num_entries == 0:
        return
    check_inner_contiguous(key_cache, value_cache, cmp_key_cache, cmp_value_cache)
    if config.uses_bounds:
        write_bounds(key_cache, cmp_key_cache, cmp_value_cache, block_table, emit_req,
                     emit_index, config)
        return
    key_cache_strides = key_cache.stride()
    value_cache_strides = value_cache.stride()
    cmp_key_cache_strides = cmp_key_cache.stride()
    cmp_value_cache_strides = cmp_value_cache.stride()
    launch(_compress_kernel, (num_entries, key_cache.shape[2]),
        key_cache_ptr=key_cache, value_cache_ptr=value_cache, cmp_key_ptr=cmp_key_cache,
        cmp_value_ptr=cmp_value_cache, table_ptr=block_table, emit_req_ptr=emit_req,
        emit_index_ptr=emit_index,
        kc_page=key_cache_strides[0], kc_slot=key_cache_strides[1], kc_head=key_cache_strides[2],
        vc_page=value_cache_strides[0], vc_slot=value_cache_strides[1],
        vc_head=value_cache_strides[2],
        ck_page=cmp_key_cache_strides[0], ck_slot=cmp_key_cache_strides[1],
        ck_head=cmp_key_cache_strides[2],
        cv_page=cmp_value_cache_strides[0], cv_slot=cmp_value_cache_strides[1],
        cv_head=cmp_value_cache_strides[2], table_row=block_table.stride(0),
        PAGE_SIZE=key_cache.shape[1], COMPRESS_STRIDE=config.compress_stride,
        COMPRESS_BLOCK=config.compress_block,
        COMPRESS_BLOCK_PAD=pow2(config.compress_block),
        D=key_cache.shape[3], DV=value_cache.shape[3])
