"""Backend conformance without an engine: NSAAttentionImpl on a vLLM-shaped padded page
buffer, driven step by step like vLLM's scheduler would (prefill from scratch, chunked
prefill across compression windows and selection blocks, decode, prefix-cache hits on
shared pages), against the reference `nsa_attention` on each request's full sequence; both
selection scorers, whose cache entries must be written once per entry."""
import random

import pytest
import torch

pytest.importorskip("vllm")

from vllm_nsa.backend import (  # noqa: E402
    NSAAttentionImpl,
    NSAAttentionMetadata,
    compressed_to_emit,
    emission_geometry,
    page_buffer,
    split_kv_cache,
)
from vllm_nsa.config import NSAConfig  # noqa: E402
from vllm_nsa.kernels import paged  # noqa: E402
from vllm_nsa.kernels.reference import nsa_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_SIZE = 6, 2, 32

NUM_PAGES = 160


def kv_page_buffer(page_size, config, dtype=torch.float32):
    return page_buffer(NUM_PAGES, page_size, KV_HEADS, HEAD_SIZE, dtype, config)


class Request:
    def __init__(self, tokens_k, tokens_v, pages):
        self.k, self.v = tokens_k, tokens_v      # the request's whole future sequence
        self.pages = pages                       # its block table row
        self.done = 0                            # tokens in the cache


class Simulator:
    def __init__(self, page_size, config, gated, seed):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.page_size, self.config, self.gated = page_size, config, gated
        self.kv_cache = kv_page_buffer(page_size, config)
        self.free_pages = list(range(NUM_PAGES))
        self.rng.shuffle(self.free_pages)
        self.impl = NSAAttentionImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None,
                                     "auto", nsa_config=config, gated=gated)
        # (page, slot) of every scorer entry written since its page was (re)allocated.
        self.written = set()

    def record_writes(self, block_table, emit_req, emit_index):
        """Check that no scorer entry is written twice while its page stays allocated
        (prefill chunks, decodes and prefix-cache hits each write an entry exactly once)."""
        span, stride = emission_geometry(self.config)
        slot_width = self.config.select_block if self.config.uses_bounds else stride
        for r, i in zip(emit_req.tolist(), emit_index.tolist()):
            if r < 0:
                continue
            last = i * stride + span - 1
            where = (int(block_table[r, last // self.page_size]),
                     (last % self.page_size) // slot_width)
            assert where not in self.written, f"scorer entry {i} rewritten at {where}"
            self.written.add(where)

    def free(self, pages):
        self.free_pages += pages
        self.written = {(p, s) for p, s in self.written if p not in set(pages)}

    def new_request(self, length, prefix_of=None):
        k = torch.randn(length, KV_HEADS, HEAD_SIZE, generator=self.gen)
        v = torch.randn(length, KV_HEADS, HEAD_SIZE, generator=self.gen)
        pages, done = [], 0
        if prefix_of is not None:  # prefix-cache hit: share the other request's full pages
            shared = min(prefix_of.done, length - 1) // self.page_size
            k[:shared * self.page_size] = prefix_of.k[:shared * self.page_size]
            v[:shared * self.page_size] = prefix_of.v[:shared * self.page_size]
            pages, done = prefix_of.pages[:shared], shared * self.page_size
        need = -(-length // self.page_size) - len(pages)
        pages = pages + [self.free_pages.pop() for _ in range(need)]
        request = Request(k, v, pages)
        request.done = done
        return request

    def step(self, schedule):
        """schedule: list of (request, number of new tokens); decodes (1 token) first."""
        query_lens = [n for _, n in schedule]
        slots, keys, values, seq_lens = [], [], [], []
        for request, n in schedule:
            positions = range(request.done, request.done + n)
            slots += [request.pages[p // self.page_size] * self.page_size + p % self.page_size
                      for p in positions]
            keys.append(request.k[request.done:request.done + n])
            values.append(request.v[request.done:request.done + n])
            request.done += n
            seq_lens.append(request.done)
        num_tokens = sum(query_lens)
        query = torch.randn(num_tokens, HEADS, HEAD_SIZE, generator=self.gen)
        gates = torch.rand(num_tokens, HEADS, 3, generator=self.gen)
        width = max(len(r.pages) for r, _ in schedule)
        block_table = torch.tensor([r.pages + [0] * (width - len(r.pages)) for r, _ in schedule],
                                   dtype=torch.int32)
        query_start_loc = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(),
                                       dtype=torch.int32)
        seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        emit_req, emit_index = compressed_to_emit(query_start_loc, seq_lens, self.config)
        num_decodes = sum(1 for n in query_lens if n == 1)
        metadata = NSAAttentionMetadata(
            num_actual_tokens=num_tokens, max_query_len=max(query_lens),
            scan_bound=int(seq_lens.max()), query_start_loc=query_start_loc,
            seq_lens=seq_lens, block_table=block_table, slot_mapping=torch.tensor(slots),
            emit_req=emit_req, emit_index=emit_index, num_decodes=num_decodes,
)
        # vLLM pads the token dimension (CUDA-graph sizes); padding rows have slot -1.
        pad = 3
        slot_mapping = torch.tensor(slots + [-1] * pad)
        key = torch.cat(keys + [torch.zeros(pad, KV_HEADS, HEAD_SIZE)])
        value = torch.cat(values + [torch.zeros(pad, KV_HEADS, HEAD_SIZE)])
        query = torch.cat([query, torch.zeros(pad, HEADS, HEAD_SIZE)])
        width = 3 * HEAD_SIZE if self.gated else HEAD_SIZE
        output = torch.full((num_tokens + pad, HEADS * width), float("nan"))
        self.impl.do_kv_cache_update(None, key, value, self.kv_cache, slot_mapping)
        compress = paged.compress

        def checked_compress(*args):
            self.record_writes(args[4], args[5], args[6])
            compress(*args)

        paged.compress = checked_compress
        try:
            self.impl.forward(None, query, key, value, self.kv_cache, metadata,
                              output.view(-1, HEADS, HEAD_SIZE))
        finally:
            paged.compress = compress
        for r, (request, n) in enumerate(schedule):
            rows = slice(int(query_start_loc[r]), int(query_start_loc[r + 1]))
            got = output[rows].view(n, HEADS, -1)
            if self.gated:
                got = (got.view(n, HEADS, 3, HEAD_SIZE) * gates[rows].unsqueeze(-1)).sum(2)
            expected, _ = nsa_attention(query[rows], request.k[:request.done],
                                        request.v[:request.done], self.config,
                                        gates=gates[rows] if self.gated else None)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


CONFIGS = [
    NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_topk=4, window=48),
    NSAConfig(compress_block=16, compress_stride=16, select_block=16, select_topk=5, window=0),
]
BOUNDS_CONFIGS = [
    NSAConfig(select_block=64, select_topk=4, window=48, selection_score="bounds"),
    NSAConfig(compress_block=16, compress_stride=16, select_block=16, select_topk=5, window=0,
              selection_score="bounds"),
]


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("config", CONFIGS, ids=["paper-shape", "fla-shape"])
@pytest.mark.parametrize("gated", [False, True], ids=["merged", "gated"])
def test_random_batches_match_reference(page_size, config, gated):
    """~50 random scheduler steps per case (400 batches over the grid)."""
    run_simulation(Simulator(page_size, config, gated, seed=page_size + 7 * gated))


@pytest.mark.parametrize("page_size", [16, 32, 128])
@pytest.mark.parametrize("config", BOUNDS_CONFIGS, ids=["paper-shape", "fla-shape"])
def test_bounds_random_batches_match_reference(page_size, config):
    """The "bounds" scorer (merged mode): block bounds written once, in the step that
    writes the block's last token, in that token's page (one slot per page when a page is
    shorter than a block, as vLLM's default page of 16 with l' = 64)."""
    run_simulation(Simulator(page_size, config, False, seed=page_size + 3))


def run_simulation(sim):
    running = []
    for _ in range(50):
        # retire finished requests and admit new ones (some as prefix-cache hits)
        finished = [r for r in running if r.done == r.k.shape[0]]
        running = [r for r in running if r.done < r.k.shape[0]]
        in_use = {p for r in running for p in r.pages}
        sim.free(sorted({p for r in finished for p in r.pages} - in_use))
        while len(running) < 4 and len(sim.free_pages) > 24:
            base = sim.rng.choice(running) if running and sim.rng.random() < 0.4 else None
            length = sim.rng.randint(1, 380)
            if base is not None:
                length = max(length, base.done + 1)
                base = base if base.done >= sim.page_size else None
            running.append(sim.new_request(length, prefix_of=base))
        schedule = []
        for request in running:
            remaining = request.k.shape[0] - request.done
            if request.done > 0 and sim.rng.random() < 0.5:
                n = 1                                     # decode
            else:                                         # a prefill chunk of odd size
                n = sim.rng.randint(1, 97)
            schedule.append((request, min(n, remaining)))
        schedule.sort(key=lambda item: item[1] != 1)      # decodes first, as vLLM orders
        sim.step(schedule)


def test_compressed_entries_land_at_their_last_token():
    config = CONFIGS[0]
    emit_req, emit_index = compressed_to_emit(torch.tensor([0, 1, 41, 141]),
                                              torch.tensor([48, 41, 140]), config)
    # request 0 grows 47 -> 48: entry 1 (tokens 16..47) completes
    # request 1 prefills 0 -> 40: entries 0 (0..31)
    # request 2 grows 40 -> 140: entries 1..6
    assert emit_req.tolist() == [0, 1] + [2] * 6
    assert emit_index.tolist() == [1, 0, 1, 2, 3, 4, 5, 6]
    kv_cache = kv_page_buffer(16, config)
    key, value, cmp_key, cmp_value = split_kv_cache(kv_cache, HEAD_SIZE, config)
    assert key.shape == (NUM_PAGES, 16, KV_HEADS, HEAD_SIZE)
    assert cmp_key.shape == (NUM_PAGES, 1, KV_HEADS, HEAD_SIZE)
    # the compressed part of page p starts right after its raw part
    assert cmp_key.storage_offset() == 16 * KV_HEADS * 2 * HEAD_SIZE
    assert cmp_value.storage_offset() == cmp_key.storage_offset() + HEAD_SIZE


def test_bounds_land_at_their_last_token():
    config = BOUNDS_CONFIGS[0]                            # l' = 64
    emit_req, emit_index = compressed_to_emit(torch.tensor([0, 1, 41, 241]),
                                              torch.tensor([128, 41, 240]), config)
    # request 0 grows 127 -> 128: block 1 (64..127) completes; request 1: none;
    # request 2 grows 40 -> 240: blocks 0..2
    assert emit_req.tolist() == [0, 2, 2, 2]
    assert emit_index.tolist() == [1, 0, 1, 2]
    for page_size, slots in ((16, 1), (64, 1), (128, 2)):
        kv_cache = kv_page_buffer(page_size, config)
        key, value, bound_min, bound_max = split_kv_cache(kv_cache, HEAD_SIZE, config)
        assert key.shape == (NUM_PAGES, page_size, KV_HEADS, HEAD_SIZE)
        assert bound_min.shape == bound_max.shape == (NUM_PAGES, slots, KV_HEADS, HEAD_SIZE)
        raw = page_size * KV_HEADS * 2 * HEAD_SIZE
        assert bound_min.storage_offset() == raw
        assert bound_max.storage_offset() == raw + HEAD_SIZE
        assert bound_min.stride(0) == raw + slots * KV_HEADS * 2 * HEAD_SIZE


def test_page_padding_per_scorer():
    """customize_spec's padding: the compressed entries of a page, or the bounds slots of
    the selection blocks that end in it (at least one per page)."""
    import types

    from vllm_nsa.backend import scorer_page_bytes

    for page_size, compressed, bounds in ((16, 1, 1), (64, 4, 1), (128, 8, 2)):
        spec = types.SimpleNamespace(block_size=page_size, num_kv_heads=2, head_size=64,
                                     head_size_v=64, dtype=torch.bfloat16)
        assert scorer_page_bytes(spec, NSAConfig()) == compressed * 2 * 128 * 2
        assert scorer_page_bytes(spec, NSAConfig(selection_score="bounds")) == \
            bounds * 2 * 128 * 2


def test_preferred_page_holds_a_selection_block():
    """With no --block-size, vLLM asks the backend for its page size: whole selection
    blocks (vLLM's default rounded up to a multiple of one), a size the backend accepts."""
    from vllm_nsa.backend import NSAAttentionBackend

    for config, default, expected in ((NSAConfig(), 16, 64),
                                      (NSAConfig(selection_score="bounds"), 16, 64),
                                      (NSAConfig.from_fla(16, 4, 0), 16, 16),
                                      (NSAConfig(), 128, 128), (NSAConfig(), 96, 128)):
        backend = NSAAttentionBackend.for_config(config)
        size = backend.get_preferred_block_size(default)
        assert size == expected and backend.supports_block_size(size)


def test_impl_rejects_unsupported_layers():
    with pytest.raises(ValueError, match=r"head_size=48 is not supported by NSA \(supported: "):
        NSAAttentionImpl(4, 48, 1.0, 2, None, None, "auto", nsa_config=CONFIGS[0])
    with pytest.raises(ValueError, match="sliding_window=128"):
        NSAAttentionImpl(4, 64, 1.0, 2, None, 128, "auto", nsa_config=CONFIGS[0])
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'"):
        NSAAttentionImpl(4, 64, 1.0, 2, None, None, "fp8", nsa_config=CONFIGS[0])
    with pytest.raises(ValueError, match="attention type 'encoder_only'"):
        NSAAttentionImpl(4, 64, 1.0, 2, None, None, "auto", attn_type="encoder_only",
                         nsa_config=CONFIGS[0])
    with pytest.raises(ValueError, match="selection_score='bounds' is not supported by an "
                                         "NSA model"):
        NSAAttentionImpl(4, 64, 1.0, 2, None, None, "auto", nsa_config=BOUNDS_CONFIGS[0],
                         gated=True)
