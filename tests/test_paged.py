"""The paged torch path against the sequence reference, on shuffled block tables."""
import pytest
import torch

from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.paged import compress, nsa_paged_attention
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
    compress(key_cache, value_cache, cmp_k, cmp_v, table,
                   torch.tensor(emit_req + pad), torch.tensor(emit_index + pad), cfg)
    q = torch.randn(sum(query_lens), HQ, D, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    out = torch.empty((q.shape[0], HQ, 3, D) if gated else (q.shape[0], HQ, D))
    idx = nsa_paged_attention(q, key_cache, value_cache, cmp_k, cmp_v, table, qsl,
                              torch.tensor(seq_lens, dtype=torch.int32), cfg, D ** -0.5, out,
                              gated)
    for r, (k, v) in enumerate(seqs):
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        expected, expected_idx = nsa_forward(q[rows], k, v, cfg, gated=gated)
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(idx[rows].long(), expected_idx)


def write_all_bounds(key_cache, table, seq_lens, cfg, impl_compress=compress):
    """Bounds caches [P, bounds_per_page, H, D] (NaN poisoned) holding every complete block's
    bounds of each request, written through the stage's emission rows (padding included)."""
    num_pages, page_size, H, D = key_cache.shape
    shape = (num_pages, cfg.bounds_per_page(page_size), H, D)
    bound_min = torch.full(shape, float("nan"), dtype=key_cache.dtype)
    bound_max = bound_min.clone()
    emit = [(r, j) for r, s in enumerate(seq_lens) for j in range(cfg.num_bounded(s))]
    emit_req = torch.tensor([r for r, _ in emit] + [-1], dtype=torch.int32)
    emit_index = torch.tensor([j for _, j in emit] + [3], dtype=torch.int32)
    impl_compress(key_cache, key_cache.clone(), bound_min, bound_max, table, emit_req,
                  emit_index, cfg)
    return bound_min, bound_max


@pytest.mark.parametrize("page_size", [16, 64, 128])
def test_paged_bounds_matches_reference(page_size):
    """selection_score="bounds": bounds written per block at the page of its last token
    (one slot per page when pages are shorter than a block), selection and attention equal
    the sequence reference; requests of at most n*l' tokens select every block."""
    gen = torch.Generator().manual_seed(page_size + 1)
    cfg = NSAConfig(select_topk=4, window=96, selection_score="bounds")
    H, HQ, D = 2, 6, 16
    seq_lens = [1, 64, 255, 256, 300, 517, 700]
    query_lens = [1, 5, 1, 256, 1, 200, 3]
    seqs = [(torch.randn(s, H, D, generator=gen), torch.randn(s, H, D, generator=gen))
            for s in seq_lens]
    num_pages = sum(-(-s // page_size) for s in seq_lens) + 3
    key_cache, value_cache, table = scatter_to_pages(seqs, page_size, num_pages, gen)
    bound_min, bound_max = write_all_bounds(key_cache, table, seq_lens, cfg)
    q = torch.randn(sum(query_lens), HQ, D, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    out = torch.full((q.shape[0], HQ, D), float("nan"))
    idx = nsa_paged_attention(q, key_cache, value_cache, bound_min, bound_max, table, qsl,
                              torch.tensor(seq_lens, dtype=torch.int32), cfg, D ** -0.5, out,
                              False)
    for r, (k, v) in enumerate(seqs):
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        expected, expected_idx = nsa_forward(q[rows], k, v, cfg, gated=False)
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(idx[rows].long(), expected_idx)
    with pytest.raises(ValueError, match="merged-mode scorer"):
        nsa_paged_attention(q, key_cache, value_cache, bound_min, bound_max, table, qsl,
                            torch.tensor(seq_lens, dtype=torch.int32), cfg, D ** -0.5,
                            torch.empty(q.shape[0], HQ, 3, D), True)
