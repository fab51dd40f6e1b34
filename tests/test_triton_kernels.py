"""The Triton stages (kernels/triton/) under Triton's interpreter, on the CPU, against their
torch twins (kernels/paged.py) stage by stage and composed, and against the float64
oracle, at small shapes.

Run as `TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py` (what `make test` does): the
interpreter must be on before anything imports Triton, and vLLM (imported by other test
modules) must not run with it, so this module gets a pytest process of its own.
"""
import dataclasses
import os

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from oracle import assert_same_blocks_except_near_ties, oracle_nsa
from test_paged import scatter_to_pages, write_all_bounds
from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels import paged
from vllm_nsa.kernels import triton as triton_nsa
from vllm_nsa.kernels.pipeline import output_views
from vllm_nsa.kernels.reference import combine_gated
from vllm_nsa.kernels.triton import plan as plan_module
from vllm_nsa.kernels.triton.attend import _attend_kernel, _union_list
from vllm_nsa.kernels.triton.select import _select_decode_kernel

# conftest.py collects this module only when TRITON_INTERPRET=1 was set before Python
# started (`make test` runs it as its own pytest process): Triton decides at import time.
assert isinstance(_attend_kernel, InterpretedFunction)

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


def build_caches(cfg, num_heads, page_size, dtype, seed, head_dim=D):
    """Random sequences on shuffled pages (NaN elsewhere), compressed by both twins."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [(torch.randn(s, H, head_dim, generator=gen).to(dtype).float(),
             torch.randn(s, H, head_dim, generator=gen).to(dtype).float()) for s in SEQ_LENS]
    num_pages = sum(-(-s // page_size) for s in SEQ_LENS) + 3
    key_cache, value_cache, table = scatter_to_pages(seqs, page_size, num_pages, gen)
    key_cache, value_cache = key_cache.to(dtype), value_cache.to(dtype)
    per_page = page_size // cfg.compress_stride
    emit = [(r, i) for r, s in enumerate(SEQ_LENS) for i in range(cfg.num_compressed(s))]
    emit_req = torch.tensor([r for r, _ in emit] + [-1, -1])   # padding rows are skipped
    emit_index = torch.tensor([i for _, i in emit] + [0, 5])
    caches = {}
    for name, impl in (("twin", paged), ("triton", triton_nsa)):
        cmp_key = torch.full((num_pages, per_page, H, head_dim), float("nan"), dtype=dtype)
        cmp_value = cmp_key.clone()
        impl.compress(key_cache, value_cache, cmp_key, cmp_value, table, emit_req,
                      emit_index, cfg)
        caches[name] = (cmp_key, cmp_value)
    q = torch.randn(sum(QUERY_LENS), num_heads, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(QUERY_LENS).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, key_cache, value_cache, caches, table, q, qsl


def run_both(cfg, group, page_size, gated, dtype=torch.float32, seed=0, head_dim=D, **hints):
    seqs, key_cache, value_cache, caches, table, q, qsl = build_caches(
        cfg, H * group, page_size, dtype, seed, head_dim)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32)
    shape = (q.shape[:2] + (3, head_dim)) if gated else q.shape
    results = {}
    for name, impl in (("twin", paged), ("triton", triton_nsa)):
        output = torch.full(shape, float("nan"), dtype=dtype)   # poisoned: all must be written
        plan = impl.make_plan(q, key_cache, value_cache, table, qsl, cfg, gated, **hints)
        indices = impl.nsa_paged_attention(q, key_cache, value_cache, *caches[name], table, qsl,
                                           seq_lens, cfg, head_dim ** -0.5, output, gated, plan)
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
    ("paper", 4, 64, False, dict(num_splits=3, prefill_attend="token")),
    ("paper", 3, 128, True, dict(num_splits=2, scan_bound=384)),
    ("paper", 16, 32, False, dict(num_splits=1)),
    ("fla", 4, 16, True, dict(num_splits=4)),
    ("fla", 3, 16, False, dict(num_splits=2)),
    ("fine", 4, 32, True, dict()),
    # prefill rows by (token, KV head) program, the tiling before union tiles
    ("paper", 3, 32, True, dict(prefill_attend="token")),
    ("fine", 4, 32, False, dict(prefill_attend="token")),
])
def test_attention_matches_twin(config, group, page_size, gated, hints):
    _, _, _, _, results = run_both(CONFIGS[config], group, page_size, gated, **hints)
    (twin_out, twin_idx), (out, idx) = results["twin"], results["triton"]
    assert torch.equal(idx, twin_idx)
    assert not out.isnan().any()
    torch.testing.assert_close(out, twin_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("gated, scan_bound", [(False, 320), (True, 320), (False, 64)])
def test_decode_batch_with_hint(gated, scan_bound):
    """All-decode batch through the decode path (tile = request, split sparse attention), as
    CUDA graphs pad it: an idle request in the middle and padding tokens past the last one.
    scan_bound 64: contexts far beyond the bound the plan was sized for still read every
    block they need (work follows each request; scratch rows follow the block table)."""
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
    paged.compress(key_cache, value_cache, cmp_key, cmp_value, table,
                   torch.tensor([r for r, _ in emit]), torch.tensor([i for _, i in emit]), cfg)
    num_real = sum(query_lens)
    q = torch.randn(num_real + num_padding, 3 * H, D, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    shape = (q.shape[0], 3 * H, 3, D) if gated else (q.shape[0], 3 * H, D)
    outputs = []
    for impl in (paged, triton_nsa):
        out = torch.full(shape, float("nan"))
        plan = impl.make_plan(q, key_cache, value_cache, table, qsl, cfg, gated,
                              max_query_len=1, scan_bound=scan_bound)
        idx = impl.nsa_paged_attention(q, key_cache, value_cache, cmp_key, cmp_value, table,
                                       qsl, lens, cfg, D ** -0.5, out, gated, plan)
        outputs.append((out, idx))
    (twin_out, twin_idx), (out, idx) = outputs
    assert torch.equal(idx, twin_idx)
    assert (idx[num_real:] == -1).all()
    assert out[num_real:].isnan().all()   # padding rows are not written
    torch.testing.assert_close(out[:num_real], twin_out[:num_real], atol=2e-5, rtol=1e-5)


def test_decode_top_n_with_ties_and_nan():
    """_select_decode_kernel's top-n against a sort, with importance planted through the
    own block sums (G = 1, LSE = tile max = spill = 0): heavy ties (to the lower block), +inf blocks
    (more of them than n), NaN scores (rank as 0, never overfill a row), rows with fewer
    candidates than n (-1 padded), and rows longer than one chunk of the bisection."""
    topk, blocks_row, select_block, chunk = 5, 64, 16, 16
    gen = torch.Generator().manual_seed(5)
    seq_lens = torch.tensor([1, 48, 165, 1000, 1024, 17, 700], dtype=torch.int32)
    num_tokens, num_kv_heads = len(seq_lens), 2
    scores = torch.randint(0, 4, (num_tokens, num_kv_heads, blocks_row), generator=gen) / 4.0
    scores[2, 0, [0, 3, 9]] = float("inf")
    scores[3, 1, :] = float("inf")
    scores[6, 0, ::3] = float("nan")
    scores[6, 1, :] = float("nan")
    tiles_row = blocks_row // 16
    zeros = torch.zeros(num_tokens, num_kv_heads, tiles_row)
    qsl = torch.arange(num_tokens + 1, dtype=torch.int32)
    indices = torch.full((num_tokens + 1, num_kv_heads, topk), -1, dtype=torch.int32)
    _select_decode_kernel[(num_tokens, num_kv_heads)](
        own_sums_ptr=scores, spill_sums_ptr=torch.zeros_like(scores), tile_max_ptr=zeros,
        lse_ptr=torch.zeros(num_tokens, num_kv_heads), qsl_ptr=qsl, seq_lens_ptr=seq_lens,
        block_scores_ptr=torch.full_like(scores, float("nan")), indices_ptr=indices,
        blocks_row=blocks_row, tiles_row=tiles_row, num_reqs=num_tokens,
        num_heads=num_kv_heads, num_kv_heads=num_kv_heads, G=1, COMPRESS_BLOCK=select_block,
        COMPRESS_STRIDE=select_block, SELECT_BLOCK=select_block, BC=16, BB=16, TOPK=topk,
        INIT_BLOCKS=0, LOCAL_BLOCKS=0, CHUNK=chunk)
    assert (indices[num_tokens] == -1).all()        # the row past the last: untouched
    for t, seq_len in enumerate(seq_lens.tolist()):
        candidates = (seq_len - 1) // select_block + 1
        for h in range(num_kv_heads):
            row = scores[t, h, :candidates].nan_to_num(nan=0.0).tolist()
            ranked = sorted(range(candidates), key=lambda b: (-row[b], b))[:topk]
            expected = sorted(ranked) + [-1] * (topk - len(ranked))
            assert indices[t, h].tolist() == expected, (t, h)


@pytest.mark.parametrize("gated, prefill_attend", [(False, "token"), (True, "token"),
                                                   (False, "union"), (True, "union")])
def test_half_precision_against_oracle(gated, prefill_attend):
    """fp16 kernels vs the float64 oracle on the same (rounded) inputs, prefill rows by
    either tiling. (The interpreter's bf16 tl.dot is wrong in Triton 3.9 — it returns
    garbage on a plain 16x16 product — so bf16 is checked on the GPU by
    benchmarks/bench_kernels.py.)"""
    dtype = torch.float16
    cfg = CONFIGS["paper"]
    group = 3
    seqs, q, qsl, _, results = run_both(cfg, group, 16, gated, dtype=dtype, seed=3,
                                        prefill_attend=prefill_attend)
    assert_matches_oracle(seqs, q, qsl, *results["triton"], cfg, gated, tolerance=1e-2)


def assert_matches_oracle(seqs, q, qsl, out, idx, cfg, gated, tolerance):
    """Per request: block sets equal the float64 oracle's up to near-ties (`tolerance`), and
    the output equals the oracle's on the kernels' own blocks (random gates when gated)."""
    gen = torch.Generator().manual_seed(11)
    for r, (k, v) in enumerate(seqs):
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        if rows.start == rows.stop:
            continue
        q_rows = q[rows].double()
        _, oracle_idx, group_scores = oracle_nsa(q_rows, k, v, cfg)
        assert_same_blocks_except_near_ties(idx[rows].long(), oracle_idx, group_scores,
                                            tolerance=tolerance)
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


# ---------------------------------------------------------------- stages one by one
@pytest.mark.parametrize("config, group, gated, splits, decode", [
    ("fla", 1, False, 1, False),
    ("fla", 3, True, 2, False),
    ("fla", 4, True, 1, True),
    ("fla", 16, False, 4, True),
    ("fine", 3, False, 2, True),
])
def test_stages_match_twin(config, group, gated, splits, decode):
    """write_kv, then score, select and attend one at a time, each fed the twin's inputs,
    against the twin; decode batches take the decode tiles, the block sums and the top-n
    bisection, splits > 1 the partials and `combine`. 16-token blocks: 300 tokens span two
    scan tiles (with "fine", l > d: a tile spills into the next one's first block)."""
    cfg = CONFIGS[config]
    gen = torch.Generator().manual_seed(group)
    seq_lens = [300, 1, 130, 47] if decode else SEQ_LENS
    query_lens = [1, 1, 1, 1] if decode else QUERY_LENS
    num_heads, page_size = H * group, 16
    seqs = [(torch.randn(s, H, D, generator=gen), torch.randn(s, H, D, generator=gen))
            for s in seq_lens]
    num_pages = sum(-(-s // page_size) for s in seq_lens) + 2
    _, _, table = scatter_to_pages(seqs, page_size, num_pages, gen)
    # write_kv fills the raw caches from per-token K/V and a slot mapping (-1: padding).
    slots, keys, values = [], [], []
    for r, (k, v) in enumerate(seqs):
        for p in range(k.shape[0]):
            slots.append(int(table[r, p // page_size]) * page_size + p % page_size)
            keys.append(k[p])
            values.append(v[p])
    slot_mapping = torch.tensor(slots + [-1], dtype=torch.int64)
    key = torch.stack(keys + [keys[0]])
    value = torch.stack(values + [values[0]])
    caches = {}
    for name, impl in (("twin", paged), ("triton", triton_nsa)):
        key_cache = torch.full((num_pages, page_size, H, D), float("nan"))
        value_cache = key_cache.clone()
        impl.write_kv(key, value, key_cache, value_cache, slot_mapping)
        caches[name] = (key_cache, value_cache)
    torch.testing.assert_close(caches["triton"], caches["twin"], equal_nan=True, rtol=0, atol=0)
    key_cache, value_cache = caches["twin"]
    cmp_key = torch.full((num_pages, page_size // cfg.compress_stride, H, D), float("nan"))
    cmp_value = cmp_key.clone()
    emit = [(r, i) for r, s in enumerate(seq_lens) for i in range(cfg.num_compressed(s))]
    paged.compress(key_cache, value_cache, cmp_key, cmp_value, table,
                   torch.tensor([r for r, _ in emit]), torch.tensor([i for _, i in emit]), cfg)
    q = torch.randn(sum(query_lens), num_heads, D, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = D ** -0.5
    shape = (q.shape[0], num_heads, 3, D) if gated else (q.shape[0], num_heads, D)
    hints = dict(num_splits=splits, max_query_len=1 if decode else max(query_lens))
    outputs, lses, indices = {}, {}, {}
    for name, impl in (("twin", paged), ("triton", triton_nsa)):
        plan = impl.make_plan(q, key_cache, value_cache, table, qsl, cfg, gated, **hints)
        if plan is not None:
            assert plan.scan_tiles >= 2 and plan.decode == decode
        outputs[name] = torch.full(shape, float("nan"))
        o_cmp, o_slc, o_win = output_views(outputs[name], gated)
        lses[name] = impl.score(q, cmp_key, cmp_value, table, qsl, lens, cfg, scale, o_cmp,
                                plan)
        # select and attend get the twin's inputs, so each stage is checked on its own.
        indices[name] = impl.select(q, cmp_key, table, qsl, lens, lses["twin"], cfg, scale,
                                    plan)
        impl.attend(q, key_cache, value_cache, table, qsl, lens, indices["twin"], cfg, scale,
                    o_slc, o_win, plan)
    valid = qsl[-1]
    torch.testing.assert_close(lses["triton"][:valid], lses["twin"][:valid], atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(indices["triton"], indices["twin"])
    assert not outputs["triton"].isnan().any()
    torch.testing.assert_close(outputs["triton"], outputs["twin"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("gated, score", [(False, "compressed"), (True, "compressed"),
                                          (False, "bounds")])
def test_warm_up_runs_every_variant(gated, score):
    """The engine-start warm-up launches decode and prefill batches, split and unsplit, on
    a dummy cache whose pages hold nothing yet (NaN): it must run clean through every
    stage (under "bounds": the bounds write and both bounds select kernels)."""
    cfg = dataclasses.replace(CONFIGS["paper"], selection_score=score)
    key_cache = torch.full((2, 32, H, D), float("nan"))
    value_cache = key_cache.clone()
    cmp_key = torch.full((2, 1 if score == "bounds" else 2, H, D), float("nan"))
    cmp_value = cmp_key.clone()
    assert triton_nsa.warm_up(key_cache, value_cache, cmp_key, cmp_value, 3 * H, 8, cfg,
                              gated) == 4


# ---------------------------------------------------------------- the "bounds" scorer
# Past n*l' = 256 tokens (paper config) selection is sparse; a 12-token prefill chunk and a
# 3-token one, decodes around n*l', an idle request, a whole 256-token prompt's tail.
BOUNDS_SEQ_LENS = [1, 64, 300, 257, 450, 130, 400, 256]
BOUNDS_QUERY_LENS = [1, 1, 3, 1, 12, 0, 1, 3]


def bounds_config(name):
    return dataclasses.replace(CONFIGS[name], selection_score="bounds")


def build_bounds_caches(cfg, num_heads, page_size, dtype, seed, seq_lens, query_lens,
                        head_dim=D):
    """Random sequences on shuffled pages; bounds written by each implementation."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [(torch.randn(s, H, head_dim, generator=gen).to(dtype).float(),
             torch.randn(s, H, head_dim, generator=gen).to(dtype).float()) for s in seq_lens]
    num_pages = sum(-(-s // page_size) for s in seq_lens) + 3
    key_cache, value_cache, table = scatter_to_pages(seqs, page_size, num_pages, gen)
    key_cache, value_cache = key_cache.to(dtype), value_cache.to(dtype)
    caches = {name: write_all_bounds(key_cache, table, seq_lens, cfg, impl.compress)
              for name, impl in (("twin", paged), ("triton", triton_nsa))}
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, key_cache, value_cache, caches, table, q, qsl


def run_bounds(cfg, group, page_size, dtype=torch.float32, seed=0,
               seq_lens=BOUNDS_SEQ_LENS, query_lens=BOUNDS_QUERY_LENS, q=None, head_dim=D,
               **hints):
    seqs, key_cache, value_cache, caches, table, q_random, qsl = build_bounds_caches(
        cfg, H * group, page_size, dtype, seed, seq_lens, query_lens, head_dim)
    q = q_random if q is None else q
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    results = {}
    for name, impl in (("twin", paged), ("triton", triton_nsa)):
        output = torch.full(q.shape, float("nan"), dtype=dtype)
        plan = impl.make_plan(q, key_cache, value_cache, table, qsl, cfg, False, **hints)
        indices = impl.nsa_paged_attention(q, key_cache, value_cache, *caches[name], table,
                                           qsl, lens, cfg, head_dim ** -0.5, output, False,
                                           plan)
        results[name] = (output, indices)
    return seqs, q, qsl, caches, results


@pytest.mark.parametrize("config, page_size", [("paper", 16), ("paper", 64), ("paper", 128),
                                               ("fla", 32), ("fine", 16)])
def test_bounds_write_matches_twin(config, page_size):
    """The bounds kernel writes what the twin writes (exactly: a min or max of stored
    values), nothing else (NaN elsewhere), one slot per page when pages are shorter than
    a block."""
    cfg = bounds_config(config)
    _, _, _, caches, _, _, _ = build_bounds_caches(cfg, H, page_size, torch.float32, 1,
                                                   BOUNDS_SEQ_LENS, BOUNDS_QUERY_LENS)
    for twin, kernel in zip(caches["twin"], caches["triton"]):
        assert kernel.shape[1] == max(1, page_size // cfg.select_block)
        torch.testing.assert_close(kernel, twin, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("config, group, page_size, hints, small", [
    ("paper", 1, 16, dict(num_splits=1), False),
    ("paper", 3, 64, dict(num_splits=1), False),
    ("paper", 16, 32, dict(num_splits=1), False),
    ("fla", 3, 16, dict(num_splits=1), False),
    ("fine", 4, 32, dict(num_splits=1), False),
    # split scans and their top-n merge (its sort is slow in the interpreter: few tokens)
    ("paper", 4, 128, dict(num_splits=3, scan_bound=384), True),
    ("fla", 3, 16, dict(num_splits=2), True),
    ("paper", 16, 32, dict(prefill_attend="token"), False),
])
def test_bounds_attention_matches_twin(config, group, page_size, hints, small):
    lens = dict(seq_lens=[450, 300, 100], query_lens=[2, 1, 1]) if small else {}
    _, _, _, _, results = run_bounds(bounds_config(config), group, page_size, **lens,
                                     **hints)
    (twin_out, twin_idx), (out, idx) = results["twin"], results["triton"]
    assert torch.equal(idx, twin_idx)
    assert not out.isnan().any()
    torch.testing.assert_close(out, twin_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("group, num_splits", [(3, 1), (3, 3), (1, 1)])
def test_bounds_chunks_longer_than_a_select_tile(group, num_splits):
    """Prefill chunks over cached context that span several of the bounds select's
    64-token tiles (plan.BOUNDS_SELECT_TOKENS) and several union attention tiles (16
    tokens at G = 3; 64 at G = 1, every bit of the union lists' token masks), unsplit and
    with the scan split in three (then merged split by split): block sets and outputs
    equal the twin's."""
    _, _, _, _, results = run_bounds(bounds_config("paper"), group, 32, seq_lens=[420, 300],
                                     query_lens=[150, 70], num_splits=num_splits)
    (twin_out, twin_idx), (out, idx) = results["twin"], results["triton"]
    assert torch.equal(idx, twin_idx)
    torch.testing.assert_close(out, twin_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim, group, gated", [(64, 3, False), (128, 4, False),
                                                    (128, 4, True)])
def test_served_head_dims_match_twin(head_dim, group, gated):
    """Head dims 64 (the SmolLM2 shape) and 128 (Llama): a mixed batch with prefill chunks
    over cached context, through the default merged mode (bounds select, union
    attention) and the gated mode (compressed scorer), equals the twin."""
    if gated:
        _, _, _, _, results = run_both(CONFIGS["paper"], group, 32, True, head_dim=head_dim)
    else:
        _, _, _, _, results = run_bounds(bounds_config("paper"), group, 32, head_dim=head_dim,
                                         seq_lens=[300, 450, 100], query_lens=[40, 1, 9])
    (twin_out, twin_idx), (out, idx) = results["twin"], results["triton"]
    assert torch.equal(idx, twin_idx)
    assert not out.isnan().any()
    torch.testing.assert_close(out, twin_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("block_t", [1, 4, 16, 64])
def test_query_tiles_match_twin(block_t):
    """The plan's tile lookup (one kernel) against its torch twin, on batches of more
    requests than one scan step holds, with empty and long requests and graph padding."""
    gen = torch.Generator().manual_seed(block_t)
    for num_reqs in (1, 3, plan_module.TILE_REQS + 7):
        lens = torch.randint(0, 3 * block_t + 2, (num_reqs,), generator=gen)
        lens[0] = 1
        qsl = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
        num_tokens = int(qsl[-1]) + 5        # padding tokens past the last request
        got = plan_module.query_tiles(qsl, num_tokens, block_t)
        want = plan_module.query_tiles_torch(qsl, num_tokens, block_t)
        assert got[0].shape[0] > plan_module.TILE_IDS or num_reqs < plan_module.TILE_REQS
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@triton.jit
def _union_list_probe(selected_ptr, blocks_ptr, bits_ptr, size_ptr, BLOCK_T: tl.constexpr,
                      TOPK_PAD: tl.constexpr):
    offs = tl.arange(0, BLOCK_T)[:, None] * TOPK_PAD + tl.arange(0, TOPK_PAD)[None, :]
    size = _union_list(tl.load(selected_ptr + offs), blocks_ptr, bits_ptr, BLOCK_T, TOPK_PAD)
    tl.store(size_ptr, size)


@pytest.mark.parametrize("block_t", [1, 4, 16, 64])
def test_union_list_is_the_union_of_the_tokens_blocks(block_t):
    """A union tile's list (one sort and two scans): every block some token selected, once,
    ascending, with one bit per token that selected it, from rows of ascending blocks
    padded with -1, some empty (token 0 always; at one token the union is empty), many
    blocks shared; the last token always selects (bit 63 at 64 tokens)."""
    gen = torch.Generator().manual_seed(block_t)
    topk_pad = 16
    selected = torch.full((block_t, topk_pad), -1, dtype=torch.int32)
    for token in range(block_t):
        count = int(torch.randint(int(token == block_t - 1), 13, (1,), generator=gen))
        picks = torch.randperm(24, generator=gen)[:count].sort().values
        selected[token, :count] = picks.to(torch.int32)
    selected[0] = -1                                       # a token with no block
    capacity = block_t * topk_pad
    blocks = torch.full((capacity,), -7, dtype=torch.int32)
    bits = torch.zeros(capacity, dtype=torch.int64)
    size = torch.zeros(1, dtype=torch.int32)
    _union_list_probe[(1,)](selected, blocks, bits, size, BLOCK_T=block_t, TOPK_PAD=topk_pad)
    union = sorted({int(b) for b in selected.flatten() if b >= 0})
    want_bits = [sum(1 << t for t in range(block_t) if b in selected[t].tolist())
                 for b in union]
    as_int64 = [(x + 2 ** 63) % 2 ** 64 - 2 ** 63 for x in want_bits]
    assert int(size) == len(union)
    assert blocks[:len(union)].tolist() == union
    assert bits[:len(union)].tolist() == as_int64
    assert (blocks[len(union):] == -7).all()               # nothing written past the list


def test_prefill_attend_choice():
    """The union tiling serves prefill plans only (decode keeps one program per row), it
    is the default, and an unknown choice is refused by name."""
    cfg = CONFIGS["paper"]
    key_cache = torch.zeros(4, 16, H, D)
    table = torch.zeros(2, 4, dtype=torch.int32)
    for query_len, union in ((3, True), (1, False)):
        q = torch.zeros(2 * query_len, H * 4, D)
        qsl = torch.arange(3, dtype=torch.int32) * query_len
        plan = triton_nsa.make_plan(q, key_cache, key_cache, table, qsl, cfg, False,
                                    max_query_len=query_len, prefill_attend="union")
        assert plan.attend_union is union and (plan.attend_parts is None or not union)
        default = triton_nsa.make_plan(q, key_cache, key_cache, table, qsl, cfg, False,
                                       max_query_len=query_len)
        if "VLLM_NSA_PREFILL_ATTEND" not in os.environ:     # what a user gets with no flags
            assert default.attend_union is union
        token = triton_nsa.make_plan(q, key_cache, key_cache, table, qsl, cfg, False,
                                     max_query_len=query_len, prefill_attend="token")
        assert not token.attend_union
    with pytest.raises(ValueError, match="'tiles'.*token, union"):
        triton_nsa.make_plan(q, key_cache, key_cache, table, qsl, cfg, False,
                             prefill_attend="tiles")


@pytest.mark.parametrize("group, scan_bound", [(3, 320), (1, 64), (16, 1024)])
def test_bounds_decode_batch_matches_twin(group, scan_bound):
    """All-decode batch through the bounds decode kernel (a row per (token, KV head), the
    shared top-n bisection over signed scores), with an idle request and contexts far
    beyond the plan's scan bound."""
    seq_lens = [77, 700, 50, 1, 1000, 300]
    query_lens = [1, 1, 0, 1, 1, 1]
    _, _, _, _, results = run_bounds(bounds_config("paper"), group, 32, seq_lens=seq_lens,
                                     query_lens=query_lens, max_query_len=1,
                                     scan_bound=scan_bound)
    (twin_out, twin_idx), (out, idx) = results["twin"], results["triton"]
    assert torch.equal(idx, twin_idx)
    torch.testing.assert_close(out, twin_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("group, num_splits", [(3, 2), (1, 4)])
def test_bounds_decode_split_scan_matches_twin(group, num_splits):
    """All-decode bounds batch whose scan is split (each program scores its share of its
    own request's scan tiles of BB = 16 blocks, 1024 tokens): requests of 1 to 3 tiles
    (shares of 2+1 and 1+1+1+none), one of at most n*l' tokens (nothing scored), an idle
    one, a NaN query, padding tokens. Scores land inside each row's blocks only (the
    scratch is NaN-poisoned); block sets equal the twin's."""
    cfg = bounds_config("paper")
    seq_lens = [3000, 200, 1100, 77, 700, 2100]
    query_lens = [1, 1, 1, 0, 1, 1]
    num_padding = 2
    _, key_cache, value_cache, caches, table, q, qsl = build_bounds_caches(
        cfg, H * group, 32, torch.float32, 6, seq_lens, query_lens)
    num_real = q.shape[0]
    q = torch.cat([q, torch.randn(num_padding, *q.shape[1:])])
    q[2] = float("nan")                              # the 1100-token request's query
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    results = {}
    for name, impl in (("twin", paged), ("triton", triton_nsa)):
        out = torch.full((q.shape[0], H * group, D), float("nan"))
        plan = impl.make_plan(q, key_cache, value_cache, table, qsl, cfg, False,
                              max_query_len=1, num_splits=num_splits)
        if plan is not None:
            assert plan.scan_splits == num_splits and plan.select_tile_blocks == 16
            plan.block_scores.fill_(float("nan"))
            scratch = plan.block_scores
        idx = impl.nsa_paged_attention(q, key_cache, value_cache, *caches[name], table, qsl,
                                       lens, cfg, D ** -0.5, out, False, plan)
        results[name] = (out, idx)
    (twin_out, twin_idx), (out, idx) = results["twin"], results["triton"]
    assert torch.equal(idx, twin_idx)
    assert (idx[num_real:] == -1).all()
    assert out[num_real:].isnan().all()              # padding rows are not written
    assert out[2].isnan().all() and not out[:num_real][[0, 1, 3, 4]].isnan().any()
    torch.testing.assert_close(out[:num_real], twin_out[:num_real], atol=2e-5, rtol=1e-5,
                               equal_nan=True)
    requests = [r for r, n in enumerate(query_lens) if n]
    for token in range(q.shape[0]):
        num_blocks = ((seq_lens[requests[token]] - 1) // 64 + 1) if token < num_real else 0
        scored = num_blocks if num_blocks > cfg.select_topk else 0
        assert not scratch[token, :, :scored].isnan().any(), token
        assert scratch[token, :, scored:].isnan().all(), token


@pytest.mark.parametrize("decode", [False, True])
def test_bounds_select_a_planted_exact_match(decode):
    """A block holding a key equal to the group's query is selected by the kernels at
    every query position past it (among keys of half the query's scale)."""
    cfg = bounds_config("paper")
    gen = torch.Generator().manual_seed(4)
    seq_lens = [900, 640, 1000]
    query_lens = [1, 1, 1] if decode else [60, 1, 30]
    group = 3
    needle = torch.randn(D, generator=gen)
    q = torch.randn(sum(query_lens), H * group, D, generator=gen)
    q[:, group:] = needle                        # KV head 1's group asks for the needle
    planted = {0: 3 * 64 + 10, 1: 5 * 64 + 63, 2: 7 * 64}
    seqs, key_cache, value_cache, _, table, _, qsl = build_bounds_caches(
        cfg, H * group, 16, torch.float32, 5, seq_lens, query_lens)
    key_cache *= 0.5                              # an ordinary haystack
    for r, position in planted.items():
        page, slot = table[r, position // 16], position % 16
        key_cache[page, slot, 1] = needle
    caches = write_all_bounds(key_cache, table, seq_lens, cfg, triton_nsa.compress)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.empty(q.shape[0], H * group, D)
    plan = triton_nsa.make_plan(q, key_cache, value_cache, table, qsl, cfg, False,
                                max_query_len=max(query_lens))
    idx = triton_nsa.nsa_paged_attention(q, key_cache, value_cache, *caches, table, qsl,
                                         lens, cfg, D ** -0.5, out, False, plan)
    for r, position in planted.items():
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        assert (idx[rows, 1] == position // 64).any(dim=-1).all(), r


def test_bounds_half_precision_against_oracle():
    """fp16 bounds kernels vs the float64 oracle (selection up to near-ties, output on
    the kernels' blocks)."""
    cfg = bounds_config("paper")
    seqs, q, qsl, _, results = run_bounds(cfg, 3, 16, dtype=torch.float16, seed=3)
    assert_matches_oracle(seqs, q, qsl, *results["triton"], cfg, False, tolerance=5e-2)


def test_top_n_of_signed_scores():
    """The bounds decode kernel's top-n over signed scores (planted through a G = 1 query
    of ones and bounds min = max = score / D, scale 1): negative, equal, huge scores,
    rows longer than a chunk; ties to the lower block."""
    cfg = NSAConfig(compress_block=16, compress_stride=16, select_block=16, select_topk=5,
                    init_blocks=1, local_blocks=1, window=0, selection_score="bounds")
    gen = torch.Generator().manual_seed(9)
    seq_lens = [1600, 161, 33, 1024]
    num_pages = sum(-(-s // 16) for s in seq_lens)
    table = torch.arange(num_pages, dtype=torch.int32)
    starts = [0] + torch.tensor([-(-s // 16) for s in seq_lens]).cumsum(0).tolist()
    table = torch.stack([torch.nn.functional.pad(table[a:b], (0, 100 - (b - a)))
                         for a, b in zip(starts, starts[1:])])
    scores = torch.randint(-3, 3, (len(seq_lens), 100), generator=gen).float() / 2
    scores[0, 10:20] = -1e30
    scores[0, 30] = 1e30
    scores[3, :] = -7.0
    bounds = torch.zeros(num_pages, 1, 1, D)
    for r in range(len(seq_lens)):
        for j in range(seq_lens[r] // 16):
            bounds[table[r, j], 0, 0] = scores[r, j] / D
    key_cache = torch.zeros(num_pages, 16, 1, D)
    q = torch.ones(len(seq_lens), 1, D)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    plan = triton_nsa.make_plan(q, key_cache, key_cache, table, qsl, cfg, False,
                                max_query_len=1)
    idx = triton_nsa.select_bounds(q, bounds, bounds, table, qsl, lens, cfg, 1.0, 16, plan)
    for r, seq_len in enumerate(seq_lens):
        current = (seq_len - 1) // 16
        row = [float("inf") if j == 0 or j == current else float(scores[r, j])
               for j in range(current + 1)]
        ranked = sorted(range(current + 1), key=lambda b: (-row[b], b))[:5]
        assert idx[r, 0].tolist() == sorted(ranked) + [-1] * (5 - len(ranked)), r
