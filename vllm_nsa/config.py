"""NSA parameters (NSA_SPEC.md, "Parameters") and their validation.

Importable without vLLM: the reference, the kernels and the tests use it too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

COMPRESS_OPS = ("mean",)
# How selection ranks blocks (NSAConfig.selection_score):
# - "compressed": the paper's importance, p_cmp of the compressed attention spread over the
#   blocks by overlap (spec Eq. 9-10); the scorer of NSA checkpoints, whose compression was
#   trained with it, and the only one of the gated mode.
# - "bounds": training-free, for dense models (merged mode): per selection block the
#   elementwise min and max of its keys (Quest, arXiv 2406.10774); a query head's score of
#   the block is sum_i max(q_i min_i, q_i max_i), an upper bound of its largest q.k.
SELECTION_SCORES = ("compressed", "bounds")
# What a dense model served with NSA gets when its user does not choose (README,
# "Selection scorer", has the measurements behind it).
DENSE_SELECTION_SCORE = "bounds"
# The gated mode's branch outputs, in this order everywhere ([..., 3, Dv] buffers, gates).
BRANCHES = ("cmp", "slc", "win")



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
    selection_score:      how blocks are ranked for selection (SELECTION_SCORES):
                          "compressed" (the paper's; NSA checkpoints, gated mode) or
                          "bounds" (per-block key min/max, training-free; merged mode).
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_topk: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512
    compress_op: str = "mean"
    selection_score: str = "compressed"

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
        if self.selection_score not in SELECTION_SCORES:
            raise NSAConfigError(
                f"NSA selection_score={self.selection_score!r} is not supported; "
                f"supported: {', '.join(SELECTION_SCORES)}")

    # -- geometry: the one owner of these facts (the Triton kernels mirror them in jit
    # helpers: kernels/triton/common.py) ----------------------------------------------
    def num_compressed(self, num_tokens):
        """C: compressed entries complete among positions 0..num_tokens-1 (the spec's C(t)
        with t = num_tokens - 1). Works on ints and on integer tensors."""
        since = num_tokens - self.compress_block
        return (since >= 0) * (since // self.compress_stride + 1)

    def compressed_entry_end(self, index):
        """Last raw position of compressed entry i (window [i*d, i*d + l)); the entry is
        stored in the page of this token (kernels/README.md, "Paged cache layout")."""
        return index * self.compress_stride + self.compress_block - 1

    @property
    def compressed_slot_offset(self) -> int:
        """Flattened compressed-cache index of entry 0 over a request's pages (entry i is
        at i + this): entry i's last token i*d + l - 1 lies in slot (i*d + l - 1) // d."""
        return self.compress_block // self.compress_stride - 1

    def num_select_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.select_block)

    @property
    def uses_compressed(self) -> bool:
        """Whether the compressed cache exists at all: the "compressed" scorer reads it (and
        the gated mode's cmp branch, which only runs with that scorer). Under "bounds" the
        pages hold block bounds instead and no compressed entry is ever written."""
        return self.selection_score == "compressed"

    @property
    def uses_bounds(self) -> bool:
        return self.selection_score == "bounds"

    def num_bounded(self, num_tokens):
        """Selection blocks complete among positions 0..num_tokens-1: those with bounds
        (block j's are written with its last token j*l' + l' - 1). Ints or tensors."""
        return num_tokens // self.select_block

    def bounds_entry_end(self, block):
        """Last raw position of selection block j: its bounds live in that token's page."""
        return block * self.select_block + self.select_block - 1

    def bounds_per_page(self, page_size: int) -> int:
        """Bounds slots per page: page_size / l' blocks end in a page of page_size >= l'
        tokens; with page_size < l' a block ends in every (l'/page_size)-th page, and every
        page gets one slot (vLLM's default page of 16 tokens with l' = 64)."""
        return max(1, page_size // self.select_block)

    @property
    def dense_tokens(self) -> int:
        """A query that sees at most this many tokens (n*l') has at most n candidate blocks,
        so it selects every block whatever their scores: selection reads no compressed key
        for it, and the merged mode is exactly dense causal attention over the raw K/V
        (the compressed branch is not read at all). Past n*l' the top-n may pick blocks
        inside the window, so the window does not make up for unselected ones."""
        return self.select_topk * self.select_block

    # -- constructors ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "NSAConfig":
        """Explicit fields; unnamed ones keep the dataclass defaults (the paper's)."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NSAConfigError(
                f"unknown NSA parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def for_dense_model(cls, values: Mapping[str, Any] | None) -> "NSAConfig":
        """The parameters a dense model served with NSA runs with, from the user's
        ``--additional-config '{"nsa": {...}}'``: the paper's, except the selection scorer,
        DENSE_SELECTION_SCORE unless named (the paper's compressed scorer ranks blocks
        poorly in a model never trained with it; README, "Selection scorer")."""
        values = dict(values or {})
        values.setdefault("selection_score", DENSE_SELECTION_SCORE)
        return cls.from_dict(values)

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
                f"window={self.window} compress_op={self.compress_op} "
                f"selection_score={self.selection_score}")
