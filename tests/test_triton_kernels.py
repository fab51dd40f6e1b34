"""The Triton kernels (kernels/triton_nsa.py) under Triton's interpreter, on the CPU, against
their torch twins (kernels/paged.py) and the float64 oracle, at small shapes.

Run as `TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py` (what `make test` does): the
interpreter must be on before anything imports Triton, and vLLM (imported by other test
modules) must not run with it, so this module gets a pytest process of its own.
"""
import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from oracle import assert_same_blocks_except_near_ties, oracle_nsa
from test_paged import scatter_to_pages
from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels import paged, triton_nsa
from vllm_nsa.kernels.reference import combine_gated

# conftest.py collects this module only when TRITON_INTERPRET=1 was set before Python
# started (`make test` runs it as its own pytest process): Triton decides at import time.
assert isinstance(triton_nsa._sparse_attention_kernel, InterpretedFunction)

CONFIGS = {
    # paper geometry (l=32, d=16, l'=64), scaled-down n and w
    "paper": NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_topk=4,
                       window=96),
    # FLA geometry l = d = l' (omega is the identity)
    "fla": NSAConfig(compress_block=16, compress_stride=16, select_block=16, select_topk=4,
                     window=40),
    # l' / d = 4 with l / d = 2, odd n, no window branch
    "fine": NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topk=5,
                      window=0),
}
# A mixed batch: decodes at and around the first compression window and the window/top-n
# boundaries, a chunked prefill with cached context, a whole short prompt, an idle request.
SEQ_LENS = [1, 31, 32, 97, 21, 300, 130]
QUERY_LENS = [1, 1, 2, 1, 21, 7, 0]
H, D = 2, 32


def build_caches(cfg, num_heads, page_size, dtype, seed):
    """Random sequences on shuffled pages (NaN elsewhere), compressed by both twins."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [(torch.randn(s, H, D, generator=gen).to(dtype).float(),
             torch.randn(s, H, D, generator=gen).to(dtype).float()) for s in SEQ_LENS]
    num_pages = sum(-(-s // page_size) for s in SEQ_LENS) + 3
    key_cache, value_cache, table = scatter_to_pages(seqs, page_size, num_pages, gen)
    key_cache, value_cache = key_cache.to(dtype), value_cache.to(dtype)
    per_page = page_size // cfg.compress_stride
    emit = [(r, i) for r, s in enumerate(SEQ_LENS) for i in range(cfg.num_compressed(s))]
    emit_req = torch.tensor([r for r, _ in emit] + [-1, -1])   # padding rows are skipped
    emit_index = torch.tensor([i for _, i in emit] + [0, 5])
    caches = {}
    for name, impl in (("twin", paged), ("triton", triton_nsa)):
        cmp_key = torch.full((num_pages, per_page, H, D), float("nan"), dtype=dtype)
        cmp_value = cmp_key.clone()
        impl.compress_paged(key_cache, value_cache, cmp_key, cmp_value, table, emit_req,
                            emit_index, cfg)
        caches[name] = (cmp_key, cmp_value)
    q = torch.randn(sum(QUERY_LENS), num_heads, D, generator=gen).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(QUERY_LENS).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, key_cache, value_cache, caches, table, q, qsl


def run_both(cfg, group, page_size, gated, dtype=torch.float32, seed=0, **hints):
    seqs, key_cache, value_cache, caches, table, q, qsl = build_caches(
        cfg, H * group, page_size, dtype, seed)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32)
    shape = (q.shape[0], H * group, 3, D) if gated else (q.shape[0], H * group, D)
    results = {}
    for name, impl in (("twin", paged), ("triton", triton_nsa)):
        output = torch.full(shape, float("nan"), dtype=dtype)   # poisoned: all must be written
        extra = hints if name == "triton" else {}
        indices = impl.nsa_paged_attention(q, key_cache, value_cache, *caches[name], table, qsl,
                                           seq_lens, cfg, D ** -0.5, output, gated, **extra)
        results[name] = (output, indices)
    return seqs, q, qsl, caches, results


@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_compress_matches_twin(page_size):
    cfg = CONFIGS["paper"]
    _, _, _, caches, _, _, _ = build_caches(cfg, H, page_size, torch.float32, seed=page_size)
    for twin, kernel in zip(caches["twin"], caches["triton"]):
        torch.testing.assert_close(kernel, twin, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("config, group, page_size, gated, hints", [
    ("paper", 1, 16, False, dict(num_splits=1)),
    ("paper", 3, 32, True, dict(num_splits=1)),
    ("paper", 4, 64, False, dict(num_splits=3)),
    ("paper", 3, 128, True, dict(num_splits=2, max_seq_len=384)),
    ("fla", 3, 16, False, dict(num_splits=2)),
    ("fine", 4, 32, True, dict()),
])
def test_attention_matches_twin(config, group, page_size, gated, hints):
    _, _, _, _, results = run_both(CONFIGS[config], group, page_size, gated, **hints)
    (twin_out, twin_idx), (out, idx) = results["twin"], results["triton"]
    assert torch.equal(idx, twin_idx)
    assert not out.isnan().any()
    torch.testing.assert_close(out, twin_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_decode_batch_with_hint(gated):
    """All-decode batch through the decode path (tile = request, split sparse attention), as
    CUDA graphs pad it: an idle request in the middle and padding tokens past the last one."""
    cfg = CONFIGS["paper"]
    gen = torch.Generator().manual_seed(7)
    seq_lens = [77, 300, 50, 1, 200]
    query_lens = [1, 1, 0, 1, 1]
    num_padding = 2
    seqs = [(torch.randn(s, H, D, generator=gen), torch.randn(s, H, D, generator=gen))
            for s in seq_lens]
    key_cache, value_cache, table = scatter_to_pages(seqs, 32, 26, gen)
    cmp_key = torch.full((26, 2, H, D), float("nan"))
    cmp_value = cmp_key.clone()
    emit = [(r, i) for r, s in enumerate(seq_lens) for i in range(cfg.num_compressed(s))]
    paged.compress_paged(key_cache, value_cache, cmp_key, cmp_value, table,
                         torch.tensor([r for r, _ in emit]), torch.tensor([i for _, i in emit]),
                         cfg)
    num_real = sum(query_lens)
    q = torch.randn(num_real + num_padding, 3 * H, D, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    shape = (q.shape[0], 3 * H, 3, D) if gated else (q.shape[0], 3 * H, D)
    outputs = []
    for impl, hints in ((paged, {}), (triton_nsa, dict(max_query_len=1, max_seq_len=320))):
        out = torch.full(shape, float("nan"))
        idx = impl.nsa_paged_attention(q, key_cache, value_cache, cmp_key, cmp_value, table,
                                       qsl, lens, cfg, D ** -0.5, out, gated, **hints)
        outputs.append((out, idx))
    (twin_out, twin_idx), (out, idx) = outputs
    assert torch.equal(idx, twin_idx)
    assert (idx[num_real:] == -1).all()
    assert out[num_real:].isnan().all()   # padding rows are not written
    torch.testing.assert_close(out[:num_real], twin_out[:num_real], atol=2e-5, rtol=1e-5)


def test_decode_top_n_with_ties():
    """_select_topk_kernel against a sort: heavy ties (to the lower block), forced blocks
    (+inf, more of them than n), rows with fewer candidates than n (-1 padded)."""
    topk, num_blocks, select_block = 5, 64, 16
    gen = torch.Generator().manual_seed(5)
    seq_lens = torch.tensor([1, 48, 165, 1000, 1024, 17], dtype=torch.int32)
    num_tokens, num_kv_heads = len(seq_lens), 2
    scores = torch.randint(0, 4, (num_tokens, num_kv_heads, num_blocks), generator=gen) / 4.0
    scores[2, 0, [0, 3, 9]] = float("inf")
    scores[3, 1, :] = float("inf")
    qsl = torch.arange(num_tokens + 1, dtype=torch.int32)
    indices = torch.full((num_tokens, num_kv_heads, topk), -1, dtype=torch.int32)
    triton_nsa._select_topk_kernel[(num_tokens, num_kv_heads)](
        scores, qsl, seq_lens, indices, num_tokens, num_kv_heads, SBLOCK=select_block,
        NUM_BLOCKS_PAD=num_blocks, TOPK=topk)
    for t, seq_len in enumerate(seq_lens.tolist()):
        candidates = (seq_len - 1) // select_block + 1
        for h in range(num_kv_heads):
            row = scores[t, h, :candidates].tolist()
            ranked = sorted(range(candidates), key=lambda b: (-row[b], b))[:topk]
            expected = sorted(ranked) + [-1] * (topk - len(ranked))
            assert indices[t, h].tolist() == expected, (t, h)


@pytest.mark.parametrize("gated", [False, True])
def test_half_precision_against_oracle(gated):
    """fp16 kernels vs the float64 oracle on the same (rounded) inputs. (The interpreter's
    bf16 tl.dot is wrong in Triton 3.9 — it returns garbage on a plain 16x16 product — so bf16
    is checked on the GPU by benchmarks/bench_kernels.py.)"""
    dtype = torch.float16
    cfg = CONFIGS["paper"]
    group = 3
    seqs, q, qsl, _, results = run_both(cfg, group, 16, gated, dtype=dtype, seed=3)
    out, idx = results["triton"]
    gen = torch.Generator().manual_seed(11)
    for r, (k, v) in enumerate(seqs):
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        if rows.start == rows.stop:
            continue
        q_rows = q[rows].double()
        _, oracle_idx, group_scores = oracle_nsa(q_rows, k, v, cfg)
        assert_same_blocks_except_near_ties(idx[rows].long(), oracle_idx, group_scores,
                                            tolerance=1e-2)
        if gated:
            gates = torch.rand(q_rows.shape[0], q_rows.shape[1], 3, generator=gen,
                               dtype=torch.float64)
            expected, _, _ = oracle_nsa(q_rows, k, v, cfg, gates=gates,
                                        block_indices=idx[rows].long())
            got = combine_gated(out[rows].double(), gates)
        else:
            expected, _, _ = oracle_nsa(q_rows, k, v, cfg, block_indices=idx[rows].long())
            got = out[rows].double()
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)
