"""The paged torch path against the sequence reference, on shuffled block tables."""
import pytest
import torch

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.paged import compress_paged, nsa_paged_attention
from vllm_nsa.kernels.reference import nsa_forward


def scatter_to_pages(seqs, page_size, num_pages, gen):
    """Random non-contiguous pages for each sequence; returns caches and block table."""
    H, D = seqs[0][0].shape[1:]
    key_cache = torch.full((num_pages, page_size, H, D), float("nan"))
    value_cache = key_cache.clone()
    perm = torch.randperm(num_pages, generator=gen).tolist()
    max_pages = max(-(-k.shape[0] // page_size) for k, _ in seqs)
    table = torch.zeros(len(seqs), max_pages, dtype=torch.int32)
    for r, (k, v) in enumerate(seqs):
        for p in range(-(-k.shape[0] // page_size)):
            page = perm.pop()
            table[r, p] = page
            chunk = slice(p * page_size, (p + 1) * page_size)
            n = k[chunk].shape[0]
            key_cache[page, :n] = k[chunk]
            value_cache[page, :n] = v[chunk]
    return key_cache, value_cache, table


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("gated", [False, True])
def test_paged_matches_reference(page_size, gated):
    gen = torch.Generator().manual_seed(page_size)
    cfg = NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_topk=4,
                    window=96)
    H, HQ, D = 2, 6, 16
    seq_lens = [1, 31, 32, 300, 517]
    query_lens = [1, 5, 32, 1, 200]
    seqs = [(torch.randn(s, H, D, generator=gen), torch.randn(s, H, D, generator=gen))
            for s in seq_lens]
    key_cache, value_cache, table = scatter_to_pages(seqs, page_size, 64, gen)
    per_page = page_size // cfg.compress_stride
    cmp_k = torch.full((64, per_page, H, D), float("nan"))
    cmp_v = cmp_k.clone()
    emit_req, emit_index = [], []
    for r, s in enumerate(seq_lens):
        for i in range(cfg.num_compressed(s)):
            emit_req.append(r)
            emit_index.append(i)
    pad = [-1, -1]  # padding rows must be ignored
    compress_paged(key_cache, value_cache, cmp_k, cmp_v, table,
                   torch.tensor(emit_req + pad), torch.tensor(emit_index + pad), cfg)
    q = torch.randn(sum(query_lens), HQ, D, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    out = torch.empty((q.shape[0], HQ, 3, D) if gated else (q.shape[0], HQ, D))
    idx = nsa_paged_attention(q, key_cache, value_cache, cmp_k, cmp_v, table, qsl,
                              torch.tensor(seq_lens, dtype=torch.int32), cfg, D ** -0.5, out,
                              gated)
    for r, (k, v) in enumerate(seqs):
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        expected, expected_idx = nsa_forward(q[rows], k, v, cfg, branches=gated)
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(idx[rows].long(), expected_idx)
