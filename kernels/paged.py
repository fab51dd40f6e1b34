"""NSA over vLLM's paged caches, in torch: the CPU serving path and the twin of the Triton
kernels in `triton_nsa.py` (same names, same signatures).

Cache layout (one layer):
- key_cache / value_cache [num_pages, page_size, H, D]: raw K/V; position p of request r is
  at page block_table[r, p // page_size], slot p % page_size.
- cmp_key_cache / cmp_value_cache [num_pages, page_size // compress_stride, H, D]: compressed
  entry i (raw positions [i*d, i*d + l)) is stored with its LAST raw token e = i*d + l - 1:
  page block_table[r, e // page_size], slot (e % page_size) // d. It shares the raw cache's
  block table. Keying entries by their last token (not their first) makes a page's
  compressed entries a function of that page and the pages before it — exactly what vLLM's
  prefix-cache hash covers — so a shared, cached page is never rewritten by a request whose
  later tokens differ. Flattened over a request's pages, entry i sits at index
  i + l/d - 1 (`compressed_slot_offset`).
Tensors may be strided views (vLLM allocates them inside one buffer per layer).
"""
from __future__ import annotations

import torch

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.reference import nsa_forward


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, num_entries: int
                 ) -> torch.Tensor:
    """The first num_entries entries of one request's paged cache: [num_entries, H, D]."""
    per_page = cache.shape[1]
    num_pages = -(-num_entries // per_page)
    pages = block_table_row[:num_pages].long()
    return cache[pages].flatten(0, 1)[:num_entries]


def compressed_slot_offset(config: NSAConfig) -> int:
    """Flattened cache index of compressed entry 0 (entry i is at i + this)."""
    return config.compress_block // config.compress_stride - 1


def compress_paged(key_cache: torch.Tensor, value_cache: torch.Tensor,
                   cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
                   block_table: torch.Tensor, emit_req: torch.Tensor, emit_index: torch.Tensor,
                   config: NSAConfig) -> None:
    """Write compressed entries (phi = mean) from the raw paged cache.

    emit_req [E] (row of block_table) and emit_index [E] (compressed index i) list the
    entries whose window completed this step; rows with emit_req < 0 are padding (fixed-size
    launches for CUDA graphs) and are skipped.
    """
    valid = emit_req >= 0
    req = emit_req[valid].long()
    index = emit_index[valid].long()
    if req.numel() == 0:
        return
    page_size = key_cache.shape[1]
    positions = (index * config.compress_stride).unsqueeze(1) + torch.arange(
        config.compress_block, device=req.device)                       # [E, l]
    pages = block_table[req.unsqueeze(1), positions // page_size].long()
    slots = positions % page_size
    last = index * config.compress_stride + config.compress_block - 1
    dest_page = block_table[req, last // page_size].long()
    dest_slot = (last % page_size) // config.compress_stride
    for raw, compressed in ((key_cache, cmp_key_cache), (value_cache, cmp_value_cache)):
        mean = raw[pages, slots].float().mean(dim=1)                  # [E, H, D]
        compressed[dest_page, dest_slot] = mean.to(compressed.dtype)


def nsa_paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        cmp_key_cache: torch.Tensor, cmp_value_cache: torch.Tensor,
                        block_table: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, config: NSAConfig, scale: float,
                        output: torch.Tensor, branches: bool) -> torch.Tensor:
    """NSA for a batch of requests over the paged caches.

    q [N, HQ, D]: request r's query tokens are q[query_start_loc[r]:query_start_loc[r+1]],
    the LAST positions of its seq_lens[r] tokens (all already in the raw cache, compressed
    entries emitted). output: [N, HQ, Dv] merged, or [N, HQ, 3, Dv] branch outputs
    (cmp, slc, win) when `branches` (the gated mode; the model applies its gates).
    Returns block_indices [N, H, select_topk] int32 (-1 padded).
    """
    num_kv_heads = key_cache.shape[2]
    block_indices = torch.full((q.shape[0], num_kv_heads, config.select_topk), -1,
                               dtype=torch.int32, device=q.device)
    starts = query_start_loc.tolist()
    for r, seq_len in enumerate(seq_lens.tolist()):
        a, b = starts[r], starts[r + 1]
        if b == a:
            continue
        row = block_table[r]
        k = gather_pages(key_cache, row, seq_len)
        v = gather_pages(value_cache, row, seq_len)
        offset = compressed_slot_offset(config)
        num_cmp = config.num_compressed(seq_len)
        compressed = (gather_pages(cmp_key_cache, row, offset + num_cmp)[offset:],
                      gather_pages(cmp_value_cache, row, offset + num_cmp)[offset:])
        out, idx = nsa_forward(q[a:b], k, v, config, branches=branches, scale=scale,
                               compressed=compressed)
        output[a:b] = out.to(output.dtype)
        block_indices[a:b] = idx.to(torch.int32)
    return block_indices
