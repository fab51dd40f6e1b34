"""CUDA-graph readiness of the NSA metadata builder, checked on the CPU: decode batches get
their compression emission from `decode_emission` (device ops into static per-request
buffers, the same entries as the host `compressed_to_emit`), graph-padded requests emit
nothing, and batches with a prefill keep the host path."""
import random
import types

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backend import (  # noqa: E402
    AttentionCGSupport,
    CommonAttentionMetadata,
)

import vllm_nsa.backend as backend  # noqa: E402
from vllm_nsa.backend import (  # noqa: E402
    NSAMetadataBuilder,
    compressed_to_emit,
    decode_emission,
    emission_geometry,
)
from vllm_nsa.config import NSAConfig  # noqa: E402
from vllm_nsa.read_stats import STATS_FILE_ENV  # noqa: E402

CONFIGS = [NSAConfig(), NSAConfig(compress_block=16, compress_stride=16, select_block=32),
           NSAConfig(compress_block=64, compress_stride=16, select_block=64),
           NSAConfig(selection_score="bounds"),
           NSAConfig(select_block=128, selection_score="bounds")]
MAX_SEQS = 24
MAX_MODEL_LEN = 4096


def emitted(emit_req, emit_index):
    """The (request, index) pairs a padded emission list names."""
    return sorted((int(r), int(i)) for r, i in zip(emit_req, emit_index) if r >= 0)


def decode_batch(rng, num_real, num_padded, config):
    """Seq lens around the scorer entries' boundaries (compressed windows, or selection
    blocks under "bounds"); padded requests have query length 0 and, to prove they are
    ignored, a stale length that would emit if it were a decode."""
    span, stride = emission_geometry(config)
    seq_lens = []
    for _ in range(num_real):
        base = span + stride * rng.randrange(0, 300)
        seq_lens.append(max(1, base + rng.choice([0, 0, 1, -1, 5, -span])))
    seq_lens += [span + stride] * num_padded
    query_start_loc = list(range(num_real + 1)) + [num_real] * num_padded
    return torch.tensor(query_start_loc, dtype=torch.int32), torch.tensor(seq_lens,
                                                                           dtype=torch.int32)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"l{c.compress_block}"
                         f"d{c.compress_stride}s{c.select_block}-{c.selection_score}")
def test_decode_emission_matches_host_emission(config):
    rng = random.Random(config.compress_block)
    for _ in range(50):
        num_real, num_padded = rng.randrange(1, 17), rng.randrange(0, 5)
        query_start_loc, seq_lens = decode_batch(rng, num_real, num_padded, config)
        rows = num_real + num_padded
        emit_req = torch.zeros(rows, dtype=torch.int32)
        emit_index = torch.zeros(rows, dtype=torch.int32)
        decode_emission(query_start_loc, seq_lens, config, emit_req, emit_index)
        host_req, host_index = compressed_to_emit(query_start_loc[:num_real + 1],
                                                  seq_lens[:num_real], config)
        assert emitted(emit_req, emit_index) == emitted(host_req, host_index)
        assert (emit_req[num_real:] == -1).all()          # padded requests: nothing
        assert ((emit_req == -1) == (emit_index == -1)).all()


@pytest.fixture
def builder(monkeypatch):
    monkeypatch.setattr(backend, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.delenv(STATS_FILE_ENV, raising=False)
    vllm_config = types.SimpleNamespace(     # a dense model, no additional_config: defaults
        scheduler_config=types.SimpleNamespace(max_num_seqs=MAX_SEQS),
        model_config=types.SimpleNamespace(
            max_model_len=MAX_MODEL_LEN,
            hf_text_config=types.SimpleNamespace(model_type="llama")),
        parallel_config=types.SimpleNamespace(decode_context_parallel_size=1),
        speculative_config=None, additional_config={})
    spec = types.SimpleNamespace(num_kv_heads=2)
    return NSAMetadataBuilder(spec, ["layer.0"], vllm_config, torch.device("cpu"))


def common_metadata(query_start_loc, seq_lens, num_tokens):
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    num_reqs = seq_lens.shape[0]
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.clone(),
        seq_lens=seq_lens, num_reqs=num_reqs, num_actual_tokens=num_tokens,
        max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
        block_table_tensor=torch.zeros((num_reqs, 8), dtype=torch.int32),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64),
        seq_lens_cpu_upper_bound=seq_lens.clone())


def test_builder_declares_decode_graphs():
    assert NSAMetadataBuilder.get_cudagraph_support(None, None) == \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


def test_decode_builds_write_static_buffers(builder):
    """Every decode build (padded to a graph size or not) hands out views of the same
    static buffers, as a replayed graph reads them, filled for this step (a dense model
    with no NSA parameters: the "bounds" scorer's block emission)."""
    config = builder.config
    assert config == NSAConfig.for_dense_model({}) and config.uses_bounds
    rng = random.Random(3)
    for step in range(6):
        num_real = rng.randrange(1, 12)
        num_padded = 16 - num_real if step % 2 else 0
        query_start_loc, seq_lens = decode_batch(rng, num_real, num_padded, config)
        md = builder.build(0, common_metadata(query_start_loc, seq_lens, num_real + num_padded))
        assert md.emit_req.data_ptr() == builder.decode_emit_req.data_ptr()
        assert md.emit_index.data_ptr() == builder.decode_emit_index.data_ptr()
        assert md.emit_req.shape[0] == num_real + num_padded
        host = compressed_to_emit(query_start_loc[:num_real + 1], seq_lens[:num_real], config)
        assert emitted(md.emit_req, md.emit_index) == emitted(*host)
        assert md.num_decodes == num_real
        # the kernels' scan bound is the capacity the decode graphs were captured with
        assert md.scan_bound == MAX_MODEL_LEN


def test_mixed_batch_keeps_host_emission(builder):
    config = builder.config
    query_start_loc = torch.tensor([0, 1, 2, 302, 1302], dtype=torch.int32)
    seq_lens = torch.tensor([48, 97, 700, 1000], dtype=torch.int32)
    md = builder.build(0, common_metadata(query_start_loc, seq_lens, 1302))
    assert md.scan_bound == 1000
    assert md.emit_req.data_ptr() != builder.decode_emit_req.data_ptr()
    assert emitted(md.emit_req, md.emit_index) == emitted(
        *compressed_to_emit(query_start_loc, seq_lens, config))
    assert md.num_decodes == 2
