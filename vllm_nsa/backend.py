"""NSA attention backend for vLLM 0.32 (reads top-down like vLLM's triton_attn.py):
parameters -> cache layout -> metadata dataclass -> builder -> backend class -> impl.

The math lives in `vllm_nsa.kernels` (torch path `paged`, Triton path `triton`, the same
stage functions and signatures); this module only adapts vLLM's interfaces to it. All
vLLM-version-specific calls of the backend are in this file. What NSA supports is
`vllm_nsa.support`'s.

NSA parameters travel with the engine, never through process state: the metadata builder
resolves them from its vllm_config, each impl from its `nsa_config` argument (the NSA
model) or the vLLM config current at its construction, and the backend classmethods vLLM
calls without a current config (`customize_spec`, `get_supported_kernel_block_sizes`) from
the layer's backend class, `NSAAttentionBackend.for_config(config)`.

Two modes share every branch:
- merged (training-free, a dense model served with `--attention-backend NSA`): one output
  per head, exact attention over selected blocks ∪ window;
- gated (NSA models, `gated=True`): the output buffer holds the three branch outputs per
  head, [T, HQ, 3, Dv] in (cmp, slc, win) order, and the model applies its gates. Gates
  never enter the attention op, so torch.compile's graph split at attention and CUDA
  graphs' static buffers stay exactly as for any backend.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from vllm_nsa import read_stats, support
from vllm_nsa.config import NSAConfig
from vllm_nsa.kernels.reference import decode_read_counts_batch
from vllm_nsa.support import (
    SUPPORTED_HEAD_SIZES,
    SUPPORTED_KV_CACHE_DTYPES,
    check_supported,
    unsupported_reasons,
)

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logging config

SUPPORTED_DTYPES = tuple(getattr(torch, name) for name in support.SUPPORTED_DTYPES)
# Where a user puts NSA parameters for a dense model: --additional-config '{"nsa": {...}}'.
ADDITIONAL_CONFIG_KEY = "nsa"


# ------------------------------------------------------------------ parameters
def resolve_nsa_config(vllm_config: VllmConfig) -> NSAConfig:
    """NSA parameters in force: an NSA checkpoint's own config, else the user's
    additional_config["nsa"] over the defaults of a dense model (the paper's, with the
    training-free "bounds" selection scorer: `NSAConfig.for_dense_model`)."""
    if is_nsa_checkpoint(vllm_config):
        return NSAConfig.from_hf_config(vllm_config.model_config.hf_text_config)
    additional = vllm_config.additional_config or {}
    return NSAConfig.for_dense_model(additional.get(ADDITIONAL_CONFIG_KEY))


def is_nsa_checkpoint(vllm_config: VllmConfig) -> bool:
    """An NSA model (gated mode, its own parameters) rather than a dense one (merged)."""
    hf_config = vllm_config.model_config.hf_text_config
    return getattr(hf_config, "model_type", None) == "nsa"


def engine_facts(vllm_config: VllmConfig | None) -> dict[str, Any]:
    """The engine-wide facts `unsupported_reasons` checks (model dtype, KV-cache dtype and
    page size, speculative decoding, encoder-decoder), from a vLLM config."""
    if vllm_config is None:
        return {}
    model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
    speculative = vllm_config.speculative_config
    return dict(
        dtype=getattr(model_config, "dtype", None),
        kv_cache_dtype=getattr(cache_config, "cache_dtype", None),
        block_size=getattr(cache_config, "block_size", None),
        speculative=(None if speculative is None
                     else str(getattr(speculative, "method", None) or "enabled")),
        encoder_decoder=bool(getattr(model_config, "is_encoder_decoder", False)),
    )


def check_engine(vllm_config: VllmConfig) -> None:
    """Engine-start check of a model served with `attention_backend="NSA"`, run while vLLM
    builds the engine config (before any engine process starts; see
    `vllm_nsa.plugin.check_engines_at_start`): what the model config and the engine
    settings tell about every layer. What only the model code knows per layer (its own
    sliding window: a config's `sliding_window` may be unused, e.g. with all layers full
    attention; sinks; cross-layer KV sharing) is checked when vLLM selects the layer's
    backend (`validate_configuration`) and builds its impl. NSA models: see
    `vllm_nsa.model_registry.check_nsa_model`."""
    model_config = vllm_config.model_config
    if getattr(model_config.hf_text_config, "model_type", None) == "nsa":
        return
    arch = model_config.model_arch_config
    check_supported(resolve_nsa_config(vllm_config), "NSA attention backend",
                    head_size=model_config.get_head_size(),
                    num_heads=arch.total_num_attention_heads,
                    num_kv_heads=model_config.get_total_num_kv_heads(),
                    use_mla=bool(model_config.use_mla), **engine_facts(vllm_config))


# ------------------------------------------------------------------ cache layout
def scorer_page_bytes(spec: AttentionSpec, config: NSAConfig) -> int:
    """Bytes of the selection scorer's entries that share a page with `spec.block_size` raw
    tokens: block_size/d compressed K/V entries ("compressed"), or bounds_per_page (key min,
    key max) pairs ("bounds")."""
    itemsize = spec.dtype.itemsize
    if config.uses_bounds:
        return (config.bounds_per_page(spec.block_size) * spec.num_kv_heads
                * 2 * spec.head_size * itemsize)
    entries = spec.block_size // config.compress_stride
    return entries * spec.num_kv_heads * (spec.head_size + spec.head_size_v) * itemsize


def scorer_slots(page_size: int, config: NSAConfig) -> int:
    """Scorer entries per page (see scorer_page_bytes)."""
    if config.uses_bounds:
        return config.bounds_per_page(page_size)
    return page_size // config.compress_stride


def split_kv_cache(kv_cache: torch.Tensor, head_size: int, config: NSAConfig
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's page buffer -> (key, value, cmp_key, cmp_value) in the layout of
    `vllm_nsa.kernels.paged`; under selection_score "bounds" the last two are the block
    bounds (key min, key max), [B, bounds_per_page, H, head_size] each.

    vLLM hands us the raw part as a logical [B, H, N, C] view (C = K||V) in the LBNHC
    layout, i.e. each page is [N, H, C] in memory; `customize_spec` padded each page by
    the scorer's entries, laid out the same way right after it: per slot and head the
    compressed K||V (C wide), or the key min||max (2 * head_size wide).
    """
    num_pages, num_heads, page_tokens, content = kv_cache.shape
    if kv_cache.stride(1) != content or kv_cache.stride(2) != num_heads * content:
        raise RuntimeError(f"NSA expects the LBNHC KV-cache layout; got strides "
                           f"{kv_cache.stride()} for shape {tuple(kv_cache.shape)}")
    raw = kv_cache.permute(0, 2, 1, 3)                          # [B, N, H, C]
    width = 2 * head_size if config.uses_bounds else content
    extra = torch.as_strided(
        kv_cache, (num_pages, scorer_slots(page_tokens, config), num_heads, width),
        (kv_cache.stride(0), num_heads * width, width, 1),
        kv_cache.storage_offset() + page_tokens * num_heads * content)
    return (raw[..., :head_size], raw[..., head_size:],
            extra[..., :head_size], extra[..., head_size:])


def page_buffer(num_pages: int, page_size: int, num_kv_heads: int, head_size: int,
                dtype: torch.dtype, config: NSAConfig, device=None) -> torch.Tensor:
    """A per-layer KV cache laid out as vLLM hands it over: the logical [B, H, N, 2D] view
    of LBNHC pages, each padded by its scorer entries (`customize_spec`), filled with NaN
    (tests poison with it; warm-up reads it)."""
    content = 2 * head_size
    raw = page_size * num_kv_heads * content
    padded = raw + scorer_slots(page_size, config) * num_kv_heads * content
    buf = torch.full((num_pages * padded,), float("nan"), dtype=dtype, device=device)
    return torch.as_strided(buf, (num_pages, num_kv_heads, page_size, content),
                            (padded, content, num_kv_heads * content, 1))


def paged_ops(device: torch.device):
    """The stage functions for this device: Triton on CUDA, the torch twin elsewhere (same
    names and signatures)."""
    if device.type == "cuda":
        from vllm_nsa.kernels import triton
        return triton
    from vllm_nsa.kernels import paged
    return paged


_LAYER_REPLAYS: dict[str, object] = {}


def layer_replay(site: str):
    """The Triton path's `LayerReplay` of one launch site ("kv_write", "forward"): the
    layers of a step after the second replay the launches of the first (kernels/triton/
    launch.py), so an eager step costs a fraction of the host time per layer."""
    replay = _LAYER_REPLAYS.get(site)
    if replay is None:
        from vllm_nsa.kernels.triton.launch import LayerReplay
        replay = _LAYER_REPLAYS[site] = LayerReplay()
    return replay


def launch_layer(site: str, step: object, inputs: tuple[torch.Tensor, ...], launches,
                 constants: tuple = ()) -> None:
    """launches(): on CUDA through the site's LayerReplay (`inputs`: the layer's own
    tensors); elsewhere (the torch twin) as it is."""
    if inputs[0].is_cuda:
        layer_replay(site).run(step, inputs, launches, constants)
    else:
        launches()


# ------------------------------------------------------------------ metadata
@dataclass
class NSAAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int
    scan_bound: int                 # tokens every seq_len is at most (sizes kernel launches)
    query_start_loc: torch.Tensor   # [R+1] int32
    seq_lens: torch.Tensor          # [R] int32, tokens in the cache after this step
    block_table: torch.Tensor       # [R, max_pages] int32
    slot_mapping: torch.Tensor      # [N] raw-cache slot of each new token
    # Compressed entries whose last raw token is written in this step (request row, index).
    emit_req: torch.Tensor
    emit_index: torch.Tensor
    num_decodes: int                # decode requests come first (reorder threshold 1)
    # The step's kernel launch plan, made by the first NSA layer's forward and reused by
    # every other layer of the step (same shapes, same scratch).
    plan: object = None


def emission_geometry(config: NSAConfig) -> tuple[int, int]:
    """(span, stride) of the selection scorer's entries: entry i covers raw tokens
    [i*stride, i*stride + span) and is written with its last one. Compressed entries:
    (l, d); block bounds: (l', l')."""
    if config.uses_bounds:
        return config.select_block, config.select_block
    return config.compress_block, config.compress_stride


def compressed_to_emit(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       config: NSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(request row, entry index) of every scorer entry (compressed entry, or under
    selection_score "bounds" block bounds) completed by this step's tokens.

    Request r held seq_len - query_len tokens before the step and seq_len after, so the
    entries E(before) .. E(after) - 1 complete now — wherever a prefill chunk or a
    decode step ends, and after a prefix-cache hit (whose entries are already stored).
    """
    span, stride = emission_geometry(config)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    after = seq_lens.long()
    before = after - query_lens.long()

    def num_complete(n):
        return torch.where(n >= span, (n - span) // stride + 1, torch.zeros_like(n))

    first, last = num_complete(before), num_complete(after)
    counts = last - first
    emit_req = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.cumsum(counts, 0) - counts
    emit_index = first[emit_req] + torch.arange(len(emit_req)) - starts[emit_req]
    return emit_req.to(torch.int32), emit_index.to(torch.int32)


def decode_emission(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, config: NSAConfig,
                    emit_req: torch.Tensor, emit_index: torch.Tensor) -> None:
    """`compressed_to_emit` for a batch of single-token decodes, on the device, into one row
    per request (emit_req/emit_index of length R, written in place): a decode step that
    ends at seq_len completes at most one entry, (seq_len - span) // stride, exactly when
    seq_len >= span and (seq_len - span) % stride == 0 (`emission_geometry`). Rows that
    emit nothing (and padded requests, query length 0) are -1. Fixed shapes and no host
    reads, so the buffers can be the static inputs of a captured decode graph."""
    span, stride = emission_geometry(config)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    since = seq_lens.long() - span
    emits = (query_lens == 1) & (since >= 0) & (since % stride == 0)
    rows = torch.arange(emit_req.shape[0], device=emit_req.device)
    emit_req.copy_(torch.where(emits, rows, -1))
    emit_index.copy_(torch.where(emits, since // stride, -1))


class DecodeReadStats:
    """The spec's decode read counters (raw-token equivalents per KV head per layer),
    summed over the decode requests of each step: logged at debug level, and appended to
    $VLLM_NSA_STATS_FILE when set, in `vllm_nsa.read_stats`' format (the hook tests, evals
    and benchmarks read). Under tensor parallelism each rank reads for its own KV heads;
    the line names the rank and how many KV heads it holds. gated: the NSA model's
    three-branch mode (the spec's Table-4 counts) rather than the merged one."""

    def __init__(self, config: NSAConfig, tp_rank: int, num_kv_heads: int,
                 gated: bool = False) -> None:
        self.config = config
        self.gated = gated
        self.path = read_stats.stats_path()
        self.tp_rank = tp_rank
        self.num_kv_heads = num_kv_heads
        self.steps = 0

    @property
    def enabled(self) -> bool:
        """Counting costs host time every step: only when someone reads the result."""
        return bool(self.path) or logger.isEnabledFor(logging.DEBUG)

    def record(self, decode_seq_lens: torch.Tensor) -> None:
        if decode_seq_lens.numel() == 0:
            return
        counts = {name: int(value.sum())
                  for name, value in decode_read_counts_batch(decode_seq_lens, self.config,
                                                              self.gated).items()}
        counts["decode_requests"] = int(decode_seq_lens.numel())
        counts["tp_rank"] = self.tp_rank
        counts["kv_heads"] = self.num_kv_heads
        self.steps += 1
        logger.debug("NSA decode step %d reads per KV head: %s", self.steps, counts)
        if self.path:
            read_stats.append(self.path, counts | {
                "config": dataclasses.asdict(self.config), "gated": self.gated})


class NSAMetadataBuilder(AttentionMetadataBuilder[NSAAttentionMetadata]):
    # Pure single-token decode batches are captured and replayed as full CUDA graphs: their
    # emission lists are computed on the device into static buffers (`decode_emission`)
    # and every kernel launch is sized from host-known numbers. Batches with a prefill
    # emit a data-dependent number of entries, so they run eagerly between the piecewise
    # graphs, as vLLM does for the attention of every backend.
    _cudagraph_support: ClassVar[AttentionCGSupport] = \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = resolve_nsa_config(vllm_config)
        layers = getattr(vllm_config, "compilation_config", None)
        layers = getattr(layers, "static_forward_context", {})
        for name in layer_names:
            impl = getattr(layers.get(name), "impl", None)
            if isinstance(impl, NSAAttentionImpl) and impl.config != self.config:
                raise ValueError(f"NSA layer {name} has parameters {impl.config.describe()} "
                                 f"but its engine {self.config.describe()}")
        logger.info("NSA parameters: %s", self.config.describe())
        self.max_model_len = vllm_config.model_config.max_model_len
        self._init_reorder_batch_threshold(1)
        self.stats = DecodeReadStats(self.config, get_tensor_model_parallel_rank(),
                                     kv_cache_spec.num_kv_heads,
                                     gated=is_nsa_checkpoint(vllm_config))
        # One emission row per request of a decode batch (graph-padded batches included).
        max_reqs = vllm_config.scheduler_config.max_num_seqs
        self.decode_emit_req = torch.full((max_reqs,), -1, dtype=torch.int32, device=device)
        self.decode_emit_index = torch.full_like(self.decode_emit_req, -1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> NSAAttentionMetadata:
        md = common_attn_metadata
        num_reqs = md.num_reqs
        query_start_loc = md.query_start_loc[:num_reqs + 1]
        seq_lens = md.seq_lens[:num_reqs]
        query_start_loc_cpu = md.query_start_loc_cpu[:num_reqs + 1]
        query_lens = query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]
        num_decodes = int((query_lens == 1).long().cumprod(0).sum())
        if md.max_query_len == 1:
            emit_req = self.decode_emit_req[:num_reqs]
            emit_index = self.decode_emit_index[:num_reqs]
            decode_emission(query_start_loc, seq_lens, self.config, emit_req, emit_index)
            seq_lens_cpu = None
        else:
            seq_lens_cpu = self._seq_lens_cpu(md)
            emit_req, emit_index = compressed_to_emit(query_start_loc_cpu, seq_lens_cpu,
                                                      self.config)
            emit_req = emit_req.to(self.device, non_blocking=True)
            emit_index = emit_index.to(self.device, non_blocking=True)
        if self.stats.enabled:
            if seq_lens_cpu is None:
                seq_lens_cpu = self._seq_lens_cpu(md)
            self.stats.record(seq_lens_cpu[:num_decodes])
        return NSAAttentionMetadata(
            num_actual_tokens=md.num_actual_tokens,
            max_query_len=md.max_query_len,
            # Decode kernels size their scan from this bound: the capacity (what the CUDA
            # graphs were captured with) keeps eager decode on the same compiled variants.
            scan_bound=self.max_model_len if md.max_query_len == 1 else md.max_seq_len,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=md.block_table_tensor[:num_reqs],
            slot_mapping=md.slot_mapping,
            emit_req=emit_req,
            emit_index=emit_index,
            num_decodes=num_decodes,
        )

    @staticmethod
    def _seq_lens_cpu(md: CommonAttentionMetadata) -> torch.Tensor:
        """Host sequence lengths: vLLM's host copy when it has one (no device sync)."""
        seq_lens = (md.seq_lens_cpu_upper_bound if md.seq_lens_cpu_upper_bound is not None
                    else md.seq_lens.cpu())
        return seq_lens[:md.num_reqs]


# ------------------------------------------------------------------ backend
class NSAAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list] = list(SUPPORTED_KV_CACHE_DTYPES)
    # The NSA parameters of the layers that hold this class: set on the per-config classes
    # (`for_config`); None on the class vLLM's selector hands out by name, whose
    # classmethods resolve the parameters from the vLLM config current when they run.
    nsa_config: ClassVar[NSAConfig | None] = None

    @staticmethod
    def get_name() -> str:
        return "NSA"

    @staticmethod
    def get_impl_cls() -> type["NSAAttentionImpl"]:
        return NSAAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[NSAMetadataBuilder]:
        return NSAMetadataBuilder

    @classmethod
    def for_config(cls, config: NSAConfig) -> type["NSAAttentionBackend"]:
        """The NSA backend of layers with parameters `config` (one class per config)."""
        return _backend_for_config(config)

    @classmethod
    def resolve_config(cls) -> NSAConfig:
        """This class's NSA parameters, else those of the vLLM config current now."""
        if cls.nsa_config is not None:
            return cls.nsa_config
        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None:
            raise RuntimeError(
                "NSA: no NSA parameters here (no vLLM config is current and the layer's "
                "backend is not NSAAttentionBackend.for_config(...)); the NSA impl sets "
                "its layer's backend when the weights are processed")
        return resolve_nsa_config(vllm_config)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def get_supported_kernel_block_sizes(cls, kv_cache_spec=None) -> list[int | MultipleOf]:
        # Pages are never split into kernel blocks (padded pages cannot be).
        return [MultipleOf(cls.resolve_config().compress_stride)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """The page size vLLM uses when --block-size is not given: whole selection blocks
        (64 tokens with the paper's parameters; vLLM's default rounded up to a multiple of
        one), so every key tile of the attention kernels lies in one page (one table entry
        per tile: 1.3x faster union attention than pages of 16 at 64k, H100) and a bounds
        slot is used by every page."""
        select_block = cls.resolve_config().select_block
        preferred = -(-default_block_size // select_block) * select_block
        if cls.supports_block_size(preferred):
            return preferred
        return super().get_preferred_block_size(default_block_size)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Pad each page with its selection-scorer entries (compressed K/V, or block bounds)
        so vLLM allocates, profiles, prefix-caches and frees them with the raw K/V, under
        one block table."""
        if spec.page_size_padded is not None:
            return spec
        extra = scorer_page_bytes(spec, cls.resolve_config())
        return dataclasses.replace(spec, page_size_padded=spec.page_size_bytes + extra)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == support.DECODER

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                               has_sink, use_sparse, use_mm_prefix, use_per_head_quant_scales,
                               device_capability, attn_type, has_sliding_window=False,
                               **features) -> list[str]:
        """vLLM's selector asks this (CUDA, and CPU through the plugin) with the vLLM
        config of the engine being built current."""
        vllm_config = get_current_vllm_config_or_none()
        window = None
        if has_sliding_window:  # its value, where the model config names one
            hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_text_config",
                                None)
            window = getattr(hf_config, "sliding_window", None) or True
        facts = engine_facts(vllm_config) | dict(
            head_size=head_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
            attn_type=attn_type, has_sink=has_sink, use_mla=use_mla, sliding_window=window)
        if block_size is not None:
            facts["block_size"] = block_size
        features = dict(features, use_sparse=use_sparse, use_mm_prefix=use_mm_prefix,
                        use_per_head_quant_scales=use_per_head_quant_scales)
        facts["unsupported_features"] = [name.removeprefix("use_")
                                         for name, wanted in features.items() if wanted]
        return unsupported_reasons(cls.resolve_config(), **facts)


@functools.cache
def _backend_for_config(config: NSAConfig) -> type[NSAAttentionBackend]:
    name = f"NSAAttentionBackend[{config.describe()}]"
    return type(name, (NSAAttentionBackend,), {"nsa_config": config, "__qualname__": name,
                                               "__module__": __name__})


# ------------------------------------------------------------------ impl
# Kernel variants compiled in this process, by layer shape (Triton caches the kernels
# themselves; this only skips re-running the warm-up batches for every layer).
_WARMED_UP: set = set()


class NSAAttentionImpl(AttentionImpl[NSAAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, nsa_config: NSAConfig | None = None,
                 gated: bool = False) -> None:
        """nsa_config: the NSA model passes its checkpoint's parameters; otherwise they
        come from the vLLM config current at construction (vLLM builds models with it
        set). gated: write the three branch outputs per head (NSA models) instead of the
        merged output."""
        vllm_config = get_current_vllm_config_or_none()
        if nsa_config is None:
            if vllm_config is None:
                raise ValueError("NSAAttentionImpl outside a vLLM engine needs nsa_config")
            nsa_config = resolve_nsa_config(vllm_config)
        facts = engine_facts(vllm_config) | dict(
            head_size=head_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
            kv_cache_dtype=kv_cache_dtype, attn_type=attn_type,
            sliding_window=sliding_window, has_sink=sinks is not None,
            alibi=alibi_slopes is not None, logits_soft_cap=logits_soft_cap,
            kv_sharing_target=kv_sharing_target_layer_name, gated=gated)
        reasons = unsupported_reasons(nsa_config, **facts)
        if reasons:
            raise ValueError("NSA attention cannot run this layer: " + "; ".join(reasons))
        self.config = nsa_config
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.gated = gated
        self._split_of: torch.Tensor | None = None
        self._split: tuple[torch.Tensor, ...] = ()

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Engine start, after the model is built, with the vLLM config current and before
        vLLM asks for the KV-cache page layout:
        - give this impl's layer the backend class of its NSA parameters (a dense model's
          layers get the generic `NSAAttentionBackend` from vLLM's selector, and vLLM asks
          the layer's backend for the page layout (`customize_spec`) with no config current);
        - compile every kernel variant a served step can launch, on a dummy cache of the
          real page layout, so no request ever waits for a compile."""
        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None:
            return
        for layer in vllm_config.compilation_config.static_forward_context.values():
            if getattr(layer, "impl", None) is self:
                if getattr(layer.attn_backend, "nsa_config", None) is None:
                    layer.attn_backend = NSAAttentionBackend.for_config(self.config)
                break
        self._warm_up(vllm_config, act_dtype)

    def _warm_up(self, vllm_config: VllmConfig, act_dtype: torch.dtype) -> None:
        from vllm.platforms import current_platform
        page_size = vllm_config.cache_config.block_size
        max_model_len = vllm_config.model_config.max_model_len
        device = torch.device(current_platform.device_type)
        key = (self.config, self.gated, self.num_heads, self.num_kv_heads, self.head_size,
               act_dtype, page_size, max_model_len, device)
        if key in _WARMED_UP:
            return
        kv_cache = page_buffer(2, page_size, self.num_kv_heads, self.head_size, act_dtype,
                               self.config, device)
        batches = paged_ops(device).warm_up(
            *split_kv_cache(kv_cache, self.head_size, self.config),
            self.num_heads, -(-max_model_len // page_size), self.config, self.gated)
        _WARMED_UP.add(key)
        if batches:
            logger.info("NSA kernels compiled for %d warm-up batches", batches)

    def _caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """split_kv_cache of this layer's page buffer, kept while vLLM hands over the same
        tensor (it does every step): the six views cost ~10 us of host time per call."""
        if kv_cache is not self._split_of:
            self._split = split_kv_cache(kv_cache, self.head_size, self.config)
            self._split_of = kv_cache
        return self._split

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        key_cache, value_cache, _, _ = self._caches(kv_cache)
        ops = paged_ops(key.device)

        def launches():
            ops.write_kv(key, value, key_cache, value_cache, slot_mapping)
        # Every layer of a step shares its slot mapping: the step of the replay.
        launch_layer("kv_write", slot_mapping, (key, value, kv_cache), launches)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: NSAAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by NSA")
        if attn_metadata is None:  # profiling run
            return output
        md = attn_metadata
        ops = paged_ops(query.device)
        caches = self._caches(kv_cache)
        num_tokens = md.num_actual_tokens
        if self.gated:
            out = output.view(-1, self.num_heads, 3, output.shape[-1])[:num_tokens]
        else:
            out = output[:num_tokens]
        query = query[:num_tokens]
        if md.plan is None:
            if query.is_cuda:    # the last step's recorded layers hold its plan's scratch
                layer_replay("forward").forget()
            # Under capture vLLM's bounds hold for every replay (scan_bound: max_model_len).
            md.plan = ops.make_plan(query, caches[0], caches[1], md.block_table,
                                    md.query_start_loc, self.config, self.gated,
                                    max_query_len=md.max_query_len, scan_bound=md.scan_bound)

        def launches():
            # The raw K/V of this step are in the cache (do_kv_cache_update ran first):
            # emit the scorer entries (compressed, or block bounds) they complete before
            # any stage reads them.
            ops.compress(*caches, md.block_table, md.emit_req, md.emit_index, self.config)
            ops.nsa_paged_attention(query, *caches, md.block_table, md.query_start_loc,
                                    md.seq_lens, self.config, self.scale, out, self.gated,
                                    md.plan)
        launch_layer("forward", md, (query, kv_cache, out), launches,
                     (self.config, self.gated, self.scale))
        return output
