"""The vectorised torch reference against the brute-force float64 oracle and FLA."""
import itertools

import pytest
import torch

from oracle import assert_same_blocks_except_near_ties, oracle_nsa
from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.reference import (
    block_bounds,
    bound_scores,
    decode_read_counts,
    decode_read_counts_batch,
    nsa_attention,
)

# Tolerances. fp32 inputs: the reference accumulates in fp32 over <= a few hundred keys, so
# outputs (O(1) magnitude) agree with float64 to ~1e-6; 2e-5 leaves headroom. bf16 inputs:
# both sides see the same bf16 values (the oracle upcasts them), so the only extra error is
# rounding the output itself to bf16 (relative 2^-8 = 3.9e-3 of values up to ~3): 2e-2 abs.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5),
             torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}

# (l, d, l') from the issue; n, window chosen so T crosses top-n and window boundaries.
BLOCK_CONFIGS = {
    (32, 16, 64): dict(select_topk=3, window=80),
    (16, 16, 16): dict(select_topk=4, window=40),
    (64, 64, 64): dict(select_topk=3, window=100),
    (8, 4, 16): dict(select_topk=5, window=24),
}


def make_config(blocks, **overrides):
    l, d, lp = blocks
    return NSAConfig(compress_block=l, compress_stride=d, select_block=lp,
                     **(BLOCK_CONFIGS[blocks] | overrides))


def lengths_for(blocks):
    l, _, lp = blocks
    # below / at / just past the first compression window, a multiple of l', and not
    return sorted({l - 1, l, l + 1, 3 * lp, 3 * lp + 5, 5 * lp - 3})


def random_inputs(T, Q, HQ, H, D, dtype, seed, gated):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, HQ, D, generator=gen).to(dtype)
    k = torch.randn(T, H, D, generator=gen).to(dtype)
    v = torch.randn(T, H, D, generator=gen).to(dtype)
    gates = torch.rand(Q, HQ, 3, generator=gen).to(dtype) if gated else None
    return q, k, v, gates


def assert_selection_matches(ref_idx, ora_idx, group_scores):
    """fp32 reference vs float64 oracle: only near-ties within 1e-5 may differ."""
    assert_same_blocks_except_near_ties(ref_idx, ora_idx, group_scores, tolerance=1e-5)


def check_against_oracle(cfg, T, Q, HQ, H, D, dtype, gated, seed=0):
    q, k, v, gates = random_inputs(T, Q, HQ, H, D, dtype, seed, gated)
    out, idx = nsa_attention(q, k, v, cfg, gates=gates)
    assert out.dtype == dtype and out.shape == (Q, HQ, D)
    assert idx.dtype == torch.int64 and idx.shape == (Q, H, cfg.select_topk)
    _, ora_idx, group_scores = oracle_nsa(q, k, v, cfg, gates=gates)
    assert_selection_matches(idx, ora_idx, group_scores)
    expected, _, _ = oracle_nsa(q, k, v, cfg, gates=gates, block_indices=idx)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("blocks", list(BLOCK_CONFIGS))
@pytest.mark.parametrize("group", [1, 2, 3, 4, 16])
def test_matches_oracle_fp32(blocks, group):
    cfg = make_config(blocks)
    H = 2 if group < 16 else 1
    for i, (T, gated) in enumerate(itertools.product(lengths_for(blocks), (False, True))):
        check_against_oracle(cfg, T, T, H * group, H, 16, torch.float32, gated, seed=i)


@pytest.mark.parametrize("blocks", list(BLOCK_CONFIGS))
@pytest.mark.parametrize("group", [1, 3, 16])
def test_matches_oracle_bf16(blocks, group):
    cfg = make_config(blocks)
    H = 2 if group < 16 else 1
    T = lengths_for(blocks)[-1]
    for gated in (False, True):
        check_against_oracle(cfg, T, T, H * group, H, 32, torch.bfloat16, gated, seed=7)


@pytest.mark.parametrize("Q", [1, 7, 64])
def test_short_query_is_tail_of_full(Q):
    """Decode (Q=1) and a chunk of a chunked prefill equal the tail of the full prefill."""
    cfg = make_config((32, 16, 64))
    T = 300
    q, k, v, gates = random_inputs(T, T, 8, 2, 16, torch.float32, 3, True)
    for g in (None, gates):
        full, full_idx = nsa_attention(q, k, v, cfg, gates=g)
        tail, tail_idx = nsa_attention(q[-Q:], k, v, cfg, gates=None if g is None else g[-Q:])
        torch.testing.assert_close(tail, full[-Q:], atol=1e-6, rtol=1e-6)
        assert torch.equal(tail_idx, full_idx[-Q:])
        _check_decode_chunk_against_oracle(cfg, q[-Q:], k, v, None if g is None else g[-Q:])


def _check_decode_chunk_against_oracle(cfg, q, k, v, gates):
    out, idx = nsa_attention(q, k, v, cfg, gates=gates)
    _, ora_idx, scores = oracle_nsa(q, k, v, cfg, gates=gates)
    assert_selection_matches(idx, ora_idx, scores)
    expected, _, _ = oracle_nsa(q, k, v, cfg, gates=gates, block_indices=idx)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


def test_causal():
    cfg = make_config((32, 16, 64))
    T, cut = 320, 200
    q, k, v, gates = random_inputs(T, T, 6, 2, 16, torch.float32, 5, True)
    for g in (None, gates):
        base, base_idx = nsa_attention(q, k, v, cfg, gates=g)
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        k2[cut:] += 5 * torch.randn_like(k2[cut:])
        v2[cut:] -= 3
        q2[cut:] *= -1
        pert, pert_idx = nsa_attention(q2, k2, v2, cfg, gates=g)
        torch.testing.assert_close(pert[:cut], base[:cut], atol=0, rtol=0)
        assert torch.equal(pert_idx[:cut], base_idx[:cut])
        assert not torch.allclose(pert[cut:], base[cut:])


def test_forced_blocks_group_consistency_and_padding():
    cfg = NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_topk=5,
                    init_blocks=1, local_blocks=2, window=64)
    T = 1000
    q, k, v, _ = random_inputs(T, T, 12, 3, 16, torch.float32, 11, False)
    _, idx = nsa_attention(q, k, v, cfg)
    for t in range(T):
        current = t // 64
        candidates = current + 1
        for h in range(3):
            row = idx[t, h].tolist()
            chosen = [j for j in row if j >= 0]
            assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
            assert row[len(chosen):] == [-1] * (5 - len(chosen))   # -1 padding at the end
            assert len(chosen) == min(5, candidates)
            assert 0 in chosen and current in chosen
            if current >= 1:
                assert current - 1 in chosen
            assert max(chosen) <= current
    # one index set per KV head is the API; each query head of a group reads it: the merged
    # output of a query head must not change when other groups' queries change.
    q2 = q.clone()
    q2[:, 4:] = torch.randn_like(q2[:, 4:])
    out_a, _ = nsa_attention(q, k, v, cfg)
    out_b, _ = nsa_attention(q2, k, v, cfg)
    torch.testing.assert_close(out_a[:, :4], out_b[:, :4], atol=0, rtol=0)


def dense_causal(q, k, v):
    G = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(G, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(G, dim=1).transpose(0, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk, vv, is_causal=True)
    return out.transpose(0, 1)


@pytest.mark.parametrize("blocks", list(BLOCK_CONFIGS))
def test_merged_equals_dense_when_everything_is_selected(blocks):
    l, d, lp = blocks
    T = 4 * lp
    cfg = NSAConfig(compress_block=l, compress_stride=d, select_block=lp, select_topk=4,
                    window=T)
    q, k, v, _ = random_inputs(T, T, 8, 4, 16, torch.float64, 2, False)
    out, _ = nsa_attention(q, k, v, cfg)
    torch.testing.assert_close(out, dense_causal(q, k, v), atol=1e-10, rtol=1e-10)
    # window alone covers everything too (top-n smaller than the block count)
    cfg_window = NSAConfig(compress_block=l, compress_stride=d, select_block=lp,
                           select_topk=3, window=T)
    out, _ = nsa_attention(q, k, v, cfg_window)
    torch.testing.assert_close(out, dense_causal(q, k, v), atol=1e-10, rtol=1e-10)


def test_no_compressed_tokens_yet_gives_zero_not_nan():
    cfg = NSAConfig()
    q, k, v, gates = random_inputs(20, 20, 4, 2, 16, torch.float32, 1, True)
    gates = torch.zeros_like(gates)
    gates[..., 0] = 1.0        # only the compressed branch
    out, _ = nsa_attention(q, k, v, cfg, gates=gates)
    assert torch.equal(out, torch.zeros_like(out))


def test_decode_read_counts_table4():
    """Gated mode (separate branches): the spec's Table-4 counts."""
    counts = decode_read_counts(65536, NSAConfig(), gated=True)
    assert counts == {"compressed": 4095, "bounds": 0, "selected": 1024, "window": 512,
                      "total": 5631, "dense": 65536}
    small = decode_read_counts(100, NSAConfig(), gated=True)
    assert small["selected"] == 100 and small["window"] == 100 and small["compressed"] == 5
    # partial current block: 15 full blocks + the 36 tokens of the current one
    assert decode_read_counts(64 * 20 + 36, NSAConfig())["selected"] == 15 * 64 + 36


def test_decode_read_counts_match_selection():
    """The counter formula equals the tokens the reference actually selects for a decode query."""
    cfg = NSAConfig(select_topk=4, window=64)
    T = 64 * 9 + 17
    q, k, v, _ = random_inputs(T, 1, 4, 2, 16, torch.float32, 4, False)
    _, idx = nsa_attention(q, k, v, cfg)
    positions = [p for j in idx[0, 0].tolist() if j >= 0 for p in range(j * 64, (j + 1) * 64)
                 if p < T]
    assert decode_read_counts(T, cfg)["selected"] == len(positions)


# ------------------------------------------------------------------ the "bounds" scorer
@pytest.mark.parametrize("blocks", list(BLOCK_CONFIGS))
@pytest.mark.parametrize("group", [1, 3, 4])
def test_bounds_matches_oracle_fp32(blocks, group):
    cfg = make_config(blocks, selection_score="bounds")
    for i, T in enumerate(lengths_for(blocks)):
        check_against_oracle(cfg, T, min(T, 48), 2 * group, 2, 16, torch.float32, False,
                             seed=i)


@pytest.mark.parametrize("blocks", [(32, 16, 64), (16, 16, 16)])
def test_bounds_matches_oracle_bf16(blocks):
    cfg = make_config(blocks, selection_score="bounds")
    T = lengths_for(blocks)[-1]
    check_against_oracle(cfg, T, 40, 6, 2, 32, torch.bfloat16, False, seed=7)


def test_bounds_bound_the_block_logits():
    """Quest's score of a block is an upper bound of every scaled q.k in it, and is attained
    when one key of the block holds every dimension's extreme."""
    cfg = NSAConfig(select_block=16, compress_block=16, compress_stride=16, select_topk=3,
                    selection_score="bounds")
    q, k, _, _ = random_inputs(160, 20, 6, 2, 32, torch.float64, 2, False)
    k_min, k_max = block_bounds(k, cfg)
    bounds = bound_scores(q, k_min, k_max, cfg, 0.5)                   # [Q, H, G, NB]
    logits = torch.einsum("qhgd,thd->qhgt", q.view(20, 2, 3, 32), k) * 0.5
    block_max = logits.unflatten(-1, (10, 16)).amax(dim=-1)
    assert (bounds >= block_max - 1e-12).all()
    extreme = torch.where(q[0, 0] > 0, k_max[4, 0], k_min[4, 0])
    k[4 * 16 + 5, 0] = extreme
    torch.testing.assert_close(bound_scores(q[:1], *block_bounds(k, cfg), cfg, 0.5)[0, 0, 0, 4],
                               (q[0, 0] @ extreme) * 0.5)


@pytest.mark.parametrize("group", [1, 3])
def test_bounds_select_a_planted_exact_match(group):
    """A block holding a key equal to the query is selected at every later position (every
    query head of the group asks for the same vector) among ordinary haystack keys."""
    cfg = NSAConfig(select_topk=4, window=64, selection_score="bounds")
    T, H, D = 1200, 2, 32
    gen = torch.Generator().manual_seed(group)
    k = 0.5 * torch.randn(T, H, D, generator=gen)
    v = torch.randn(T, H, D, generator=gen)
    needle = torch.randn(D, generator=gen)
    planted = 5 * 64 + 17                                   # block 5, far outside the window
    k[planted, 1] = needle
    q = torch.randn(T, H * group, D, generator=gen)
    q[:, group:] = needle                                   # KV head 1's group looks for it
    _, idx = nsa_attention(q[planted + 1:], k, v, cfg)
    assert (idx[:, 1] == 5).any(dim=-1).all()


def test_bounds_gated_is_rejected():
    cfg = NSAConfig(selection_score="bounds")
    q, k, v, gates = random_inputs(10, 10, 4, 2, 16, torch.float32, 0, True)
    with pytest.raises(ValueError, match="merged-mode scorer"):
        nsa_attention(q, k, v, cfg, gates=gates)


@pytest.mark.parametrize("score", ["compressed", "bounds"])
def test_merged_read_counts_never_exceed_dense_up_to_n_blocks(score):
    """Merged mode: exact dense attention (every block selected, no scorer read) up to
    n*l' tokens, so the counters equal dense there; past it they stay within the scorer's
    reads of dense and fall below it once the window and the n blocks are full."""
    cfg = NSAConfig(selection_score=score)
    seq_lens = torch.arange(1, 16385)
    counts = decode_read_counts_batch(seq_lens, cfg)
    upto = seq_lens <= cfg.dense_tokens
    assert torch.equal(counts["total"][upto], seq_lens[upto])
    assert (counts["compressed"][upto] == 0).all() and (counts["bounds"][upto] == 0).all()
    assert (counts["selected"] + counts["window"] <= seq_lens).all()
    scorer = counts["compressed"] + counts["bounds"]
    assert (counts["total"] <= seq_lens + scorer).all()
    assert (counts["total"][seq_lens >= 1600] < seq_lens[seq_lens >= 1600]).all()
    big = decode_read_counts(65536, cfg)
    assert big["selected"] == 1024 and big["window"] == 512 - 128
    if score == "bounds":
        assert big["bounds"] == 1024 - 3 and big["compressed"] == 0
    else:
        assert big["compressed"] == 4095 and big["bounds"] == 0


def test_rejects_bad_shapes():
    cfg = NSAConfig()
    q, k, v, gates = random_inputs(10, 10, 4, 2, 16, torch.float32, 0, True)
    with pytest.raises(ValueError, match="seq_lens must be >= 1"):
        decode_read_counts(0, cfg)
    with pytest.raises(ValueError, match="q holds 11 positions"):
        nsa_attention(torch.randn(11, 4, 16), k, v, cfg)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        nsa_attention(torch.randn(10, 3, 16), k, v, cfg)
    with pytest.raises(ValueError, match="gates must be"):
        nsa_attention(q, k, v, cfg, gates=gates[..., :2])


# ------------------------------------------------------------------ FLA cross-check
fla_naive = pytest.importorskip("fla.ops.nsa.naive")


@pytest.fixture
def fla_torch_pooling(monkeypatch):
    """FLA's mean_pooling is a Triton kernel: substitute a torch mean with its semantics."""
    def mean_pooling(x, chunk_size, cu_seqlens=None):
        B, T, H, D = x.shape
        pad = (-T) % chunk_size
        counts = torch.full((T + pad,), 1.0).view(-1, chunk_size)
        counts[-1, chunk_size - pad:] = 0
        padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(B, -1, chunk_size, H, D)
        return (padded.sum(2) / counts.sum(-1).view(1, -1, 1, 1)).to(x.dtype)
    monkeypatch.setattr(fla_naive, "mean_pooling", mean_pooling)


@pytest.mark.parametrize("block_size,T", [(16, 100), (32, 256), (16, 17), (64, 300)])
def test_matches_fla_naive(fla_torch_pooling, block_size, T):
    counts = 4
    cfg = NSAConfig.from_fla(block_size=block_size, block_counts=counts, window_size=0)
    HQ, H, D = 16, 1, 32
    q, k, v, gates = random_inputs(T, T, HQ, H, D, torch.float32, 9, True)
    out, idx = nsa_attention(q, k, v, cfg, gates=gates)
    fla_out, fla_idx = fla_naive.naive_nsa(
        q[None], k[None], v[None], g_cmp=gates[None, ..., 0], g_slc=gates[None, ..., 1],
        block_counts=counts, block_size=block_size, window_size=0, return_block_indices=True)
    fla_sorted = fla_idx[0].sort(dim=-1).values
    fla_sorted = torch.where(fla_sorted < 0, fla_sorted.max() + 10, fla_sorted).sort(-1).values
    fla_sorted = torch.where(fla_sorted > fla_idx.max(), -1, fla_sorted)
    assert torch.equal(idx, fla_sorted)
    torch.testing.assert_close(out, fla_out[0], atol=2e-5, rtol=1e-5)
