"""What NSA can run: the one owner of every limit, on every path.

`unsupported_reasons` knows every limit of this build (the Triton kernels' included) and
names, for each one a configuration breaks, the value and what is supported. Everything
that validates calls it with the facts it knows (plain values; None = not known there):
the backend's `validate_configuration` and `NSAAttentionImpl.__init__` (per layer), the NSA
model's config check (vllm_nsa.model_registry), the plugin's engine-start check, and the
Triton kernel entry. The CPU (torch) path applies the same limits as the Triton path, so a
configuration that starts on CPU starts on CUDA.

The relations between NSA parameters (stride divides block, top-n covers the forced blocks,
...) are `NSAConfig`'s own and raise when the config is built; this module does not repeat
them. Importable without vLLM.
"""
from __future__ import annotations

from collections.abc import Iterable

from vllm_nsa.config import NSAConfig, NSAConfigError

# Head sizes the kernels tile: powers of two >= 16 (Triton's tl.arange / tl.dot need them);
# these four are the ones tested.
SUPPORTED_HEAD_SIZES = (32, 64, 128, 256)
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
# "auto" = the model dtype; fp8 and other quantised caches are not supported.
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Selection blocks are one Triton key tile: a power of two >= 16.
MIN_SELECT_BLOCK = 16
DECODER = "decoder"  # vLLM's AttentionType.DECODER: causal self-attention


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unsupported_reasons(
    config: NSAConfig, *,
    head_size: int | None = None,
    head_size_v: int | None = None,
    head_size_label: str = "head_size",
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    dtype=None,
    kv_cache_dtype: str | None = None,
    block_size: int | None = None,
    attn_type: str | None = None,
    sliding_window: int | bool | None = None,
    has_sink: bool = False,
    alibi: bool = False,
    logits_soft_cap: float | None = None,
    use_mla: bool = False,
    kv_sharing_target: str | None = None,
    speculative: str | None = None,
    encoder_decoder: bool = False,
    gated: bool | None = None,
    unsupported_features: Iterable[str] = (),
) -> list[str]:
    """Reasons NSA (with parameters `config`) cannot run this configuration; [] if it can.

    head_size / head_size_v: per-head K and V sizes (head_size_label: the name the caller's
    user knows it by, e.g. "head_dim" in an NSA checkpoint); dtype: the model dtype (torch
    dtype or name); kv_cache_dtype: vLLM's cache dtype string; block_size: tokens per KV
    page; attn_type: vLLM's attention type string; sliding_window: the model's own window
    (True when only its presence is known); kv_sharing_target: the layer whose KV cache
    this layer would read; speculative: the speculative decoding method, if any; gated:
    the NSA model's three-branch mode (True) or a dense model's merged mode (False);
    unsupported_features: names of other requested features NSA does not implement.
    """
    reasons = []
    for label, size in ((head_size_label, head_size), ("head_size_v", head_size_v)):
        if size is not None and size not in SUPPORTED_HEAD_SIZES:
            reasons.append(f"{label}={size} is not supported by NSA "
                           f"(supported: {list(SUPPORTED_HEAD_SIZES)})")
    if num_heads is not None and num_kv_heads is not None and num_heads % num_kv_heads:
        reasons.append(f"num_heads={num_heads} is not a multiple of "
                       f"num_kv_heads={num_kv_heads} (NSA shares each selection across a "
                       f"GQA group)")
    if not is_power_of_two(config.select_block) or config.select_block < MIN_SELECT_BLOCK:
        reasons.append(f"select_block={config.select_block} is not supported by NSA "
                       f"(supported: a power of two >= {MIN_SELECT_BLOCK}, e.g. 16, 32, 64, "
                       f"128)")
    if dtype is not None and _dtype_name(dtype) not in SUPPORTED_DTYPES:
        reasons.append(f"dtype={_dtype_name(dtype)} is not supported by NSA "
                       f"(supported: {', '.join(SUPPORTED_DTYPES)})")
    if kv_cache_dtype is not None and kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        reasons.append(f"kv_cache_dtype={kv_cache_dtype!r} is not supported by NSA "
                       f"(supported: 'auto' = the model dtype, or one of "
                       f"{', '.join(repr(d) for d in SUPPORTED_KV_CACHE_DTYPES[1:])}; "
                       f"no quantised KV cache)")
    if block_size is not None and block_size % config.compress_stride:
        reasons.append(f"block_size={block_size} is not supported by NSA with "
                       f"compress_stride={config.compress_stride} (supported: multiples of "
                       f"compress_stride; a page holds whole compressed entries)")
    if (block_size is not None and config.uses_bounds
            and block_size % config.select_block and config.select_block % block_size):
        reasons.append(f"block_size={block_size} is not supported by NSA with "
                       f"selection_score='bounds' and select_block={config.select_block} "
                       f"(supported: a divisor or a multiple of select_block; a page holds "
                       f"the bounds of the blocks that end in it)")
    if gated and not config.uses_compressed:
        reasons.append(f"selection_score={config.selection_score!r} is not supported by an "
                       f"NSA model (gated mode) (supported: 'compressed', the importance its "
                       f"compression was trained with; 'bounds' is for dense models)")
    if attn_type is not None and attn_type != DECODER:
        reasons.append(f"attention type {attn_type!r} is not supported by NSA "
                       f"(supported: decoder self-attention)")
    if encoder_decoder:
        reasons.append("encoder-decoder models are not supported by NSA "
                       "(supported: decoder-only models)")
    if sliding_window is not None and sliding_window is not False:
        value = "" if sliding_window is True else f"={sliding_window}"
        reasons.append(f"sliding_window{value}: models with their own sliding window are "
                       f"not supported by NSA (supported: full-attention models; NSA brings "
                       f"its own window branch, `window`)")
    if has_sink:
        reasons.append("attention sinks are not supported by NSA "
                       "(supported: models without sink logits)")
    if alibi:
        reasons.append("ALiBi slopes are not supported by NSA (supported: RoPE or no "
                       "positional bias in attention)")
    if logits_soft_cap:
        reasons.append(f"logits_soft_cap={logits_soft_cap} is not supported by NSA "
                       f"(supported: none)")
    if use_mla:
        reasons.append("MLA is not supported by NSA (supported: separate K and V heads)")
    if kv_sharing_target is not None:
        reasons.append(f"cross-layer KV sharing (this layer reads {kv_sharing_target}'s KV "
                       f"cache) is not supported by NSA (supported: every layer with its "
                       f"own KV cache)")
    if speculative is not None:
        reasons.append(f"speculative decoding (method={speculative!r}) is not supported by "
                       f"NSA (supported: none; run without speculative_config)")
    reasons += [f"{name} is not supported by NSA" for name in unsupported_features]
    return reasons


def check_supported(config: NSAConfig, what: str = "NSA", **facts) -> None:
    """Raise NSAConfigError naming every reason `unsupported_reasons` gives."""
    reasons = unsupported_reasons(config, **facts)
    if reasons:
        raise NSAConfigError(f"{what} cannot run this configuration: " + "; ".join(reasons))
