"""NSA parameters (NSA_SPEC.md, "Parameters") and their validation.

Importable without vLLM: the reference, the kernels and the tests use it too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

COMPRESS_OPS = ("mean",)


class NSAConfigError(ValueError):
    """An NSA parameter is outside what the spec (or this build) supports."""


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Native Sparse Attention parameters; defaults are the paper's.

    compress_block (l):   raw tokens summarised by one compressed token.
    compress_stride (d):  distance between the starts of consecutive compressed tokens.
    select_block (l'):    raw tokens per selection block.
    select_topk (n):      selection blocks per query (the forced ones included).
    init_blocks:          leading blocks always selected (attention sinks).
    local_blocks:         trailing blocks always selected (current + previous ...).
    window (w):           sliding-window length in tokens, the query included; 0 = no window.
    compress_op (phi):    how a window of raw K/V becomes one compressed entry.
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_topk: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512
    compress_op: str = "mean"

    def __post_init__(self) -> None:
        for name in ("compress_block", "compress_stride", "select_block", "select_topk",
                     "init_blocks", "local_blocks", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise NSAConfigError(f"NSA {name}={value!r} must be an integer")
            minimum = 0 if name == "window" else 1
            if value < minimum:
                raise NSAConfigError(f"NSA {name}={value} must be >= {minimum}")
        if self.compress_block % self.compress_stride:
            raise NSAConfigError(
                f"NSA compress_stride={self.compress_stride} must divide "
                f"compress_block={self.compress_block}")
        if self.select_block % self.compress_stride:
            raise NSAConfigError(
                f"NSA compress_stride={self.compress_stride} must divide "
                f"select_block={self.select_block}")
        if self.compress_block > self.select_block:
            raise NSAConfigError(
                f"NSA compress_block={self.compress_block} must be <= "
                f"select_block={self.select_block}")
        forced = self.init_blocks + self.local_blocks
        if self.select_topk < forced:
            raise NSAConfigError(
                f"NSA select_topk={self.select_topk} must be >= init_blocks + local_blocks "
                f"= {forced}")
        if self.compress_op not in COMPRESS_OPS:
            raise NSAConfigError(
                f"NSA compress_op={self.compress_op!r} is not supported; "
                f"supported: {', '.join(COMPRESS_OPS)}")

    # -- derived quantities used by every implementation ---------------------------
    def num_compressed(self, num_tokens: int) -> int:
        """Compressed tokens complete among positions 0..num_tokens-1 (C(t), t = num_tokens-1)."""
        if num_tokens < self.compress_block:
            return 0
        return (num_tokens - self.compress_block) // self.compress_stride + 1

    def num_select_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.select_block)

    # -- constructors ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "NSAConfig":
        """Explicit fields, e.g. vLLM's ``--additional-config '{"nsa": {...}}'``."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NSAConfigError(
                f"unknown NSA parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_fla(cls, block_size: int, block_counts: int, window_size: int) -> "NSAConfig":
        """FLA's `nsa` checkpoints: one block size for compression, stride and selection."""
        return cls(compress_block=block_size, compress_stride=block_size,
                   select_block=block_size, select_topk=block_counts, window=window_size)

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "NSAConfig":
        """From an HF config object or dict: FLA's `nsa` fields or this project's explicit ones."""
        get = (hf_config.get if isinstance(hf_config, Mapping)
               else lambda key, default=None: getattr(hf_config, key, default))
        explicit = {f.name: get(f.name) for f in dataclasses.fields(cls)
                    if get(f.name) is not None}
        if explicit:
            return cls(**explicit)
        if get("block_size") is not None:
            counts = get("block_counts", 16)
            if not isinstance(counts, int):
                raise NSAConfigError(
                    f"NSA block_counts={counts!r}: only one integer count for every query "
                    f"is supported")
            return cls.from_fla(get("block_size"), counts, get("window_size", 0) or 0)
        return cls()

    def describe(self) -> str:
        return (f"compress_block={self.compress_block} compress_stride={self.compress_stride} "
                f"select_block={self.select_block} select_topk={self.select_topk} "
                f"init_blocks={self.init_blocks} local_blocks={self.local_blocks} "
                f"window={self.window} compress_op={self.compress_op}")
