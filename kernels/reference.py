"""Vectorised torch reference of NSA (../shared/design/NSA_SPEC.md) for one sequence.

Every Triton kernel and the vLLM backend's CPU path are checked against this module, and it
is itself checked against a brute-force float64 oracle (tests/oracle.py). All arithmetic is
float32 (or float64 when the inputs are float64); outputs come back in q's dtype.

Shapes: k [T, H, D], v [T, H, Dv] hold positions 0..T-1; q [Q, HQ, D] holds the LAST Q of
them (bottom-right aligned, as FlashAttention). Query head h reads KV head h // G.
"""
from __future__ import annotations

import math

import torch

from vllm_nsa.config import NSAConfig

# Per-chunk budget of gathered/score elements; bounds memory at long T without per-token loops.
_CHUNK_ELEMENTS = 1 << 24
# Consecutive queries per selection chunk: they share most selected blocks.
_SELECT_CHUNK_QUERIES = 64
_NEG_INF = float("-inf")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def query_positions(num_queries: int, num_tokens: int, device) -> torch.Tensor:
    if num_queries > num_tokens:
        raise ValueError(f"q holds {num_queries} positions but k/v only {num_tokens}")
    return torch.arange(num_tokens - num_queries, num_tokens, device=device)


def _group_view(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Q, HQ, D] -> [Q, H, G, D] (query head h = kv_head * G + g)."""
    num_q, num_heads, dim = q.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} not a multiple of kv heads {num_kv_heads}")
    return q.reshape(num_q, num_kv_heads, num_heads // num_kv_heads, dim)


def _masked_softmax_attention(scores: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
                              equation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last axis of `scores` where `mask`; rows with nothing visible give
    output 0 and LSE -inf. Returns (output, lse)."""
    scores = scores.masked_fill(~mask, _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
    return torch.einsum(equation, probs, values), lse


def _over_query_chunks(num_q: int, num_heads: int, chunk: int, attend
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run attend(rows) -> (out [q, H, G, Dv], lse [q, H, G]) over row chunks of at most
    `chunk` queries (bounded memory at long T) and join them as [Q, HQ, Dv], [Q, HQ]."""
    outs, lses = zip(*(attend(slice(start, start + chunk))
                       for start in range(0, num_q, chunk)))
    return (torch.cat(outs).reshape(num_q, num_heads, -1),
            torch.cat(lses).reshape(num_q, num_heads))


# ---------------------------------------------------------------- stage: compress
def compress(k: torch.Tensor, v: torch.Tensor, config: NSAConfig
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """phi = mean over each compression window: [C, H, D], [C, H, Dv] with
    C = config.num_compressed(T)."""
    num_cmp = config.num_compressed(k.shape[0])
    work = _work_dtype(k)

    def pool(x: torch.Tensor) -> torch.Tensor:
        if num_cmp == 0:
            return x.new_zeros((0,) + x.shape[1:], dtype=work)
        windows = x.to(work).unfold(0, config.compress_block, config.compress_stride)
        return windows.mean(dim=-1)  # [C, H, D]

    return pool(k), pool(v)


def compressed_scores(q: torch.Tensor, k_cmp: torch.Tensor, q_positions: torch.Tensor,
                      config: NSAConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores [Q, H, G, C] of every query head against the compressed keys, and the
    visibility mask [Q, 1, 1, C]: compressed entry i is visible to position t iff
    i*d + l - 1 <= t."""
    work = _work_dtype(q)
    qg = _group_view(q.to(work), k_cmp.shape[1])                     # [Q, H, G, D]
    scores = torch.einsum("qhgd,chd->qhgc", qg, k_cmp.to(work)) * scale
    ends = config.compressed_entry_end(torch.arange(k_cmp.shape[0], device=q.device))
    visible = (ends.view(1, -1) <= q_positions.view(-1, 1))[:, None, None, :]
    return scores, visible


# ---------------------------------------------------------------- stage: score
def score(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, q_positions: torch.Tensor,
          config: NSAConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed attention: o_cmp [Q, HQ, Dv] and LSE [Q, HQ] (natural log of the scaled
    scores; -inf while C(t) = 0)."""
    scores, visible = compressed_scores(q, k_cmp, q_positions, config, scale)
    out, lse = _masked_softmax_attention(scores, visible, v_cmp.to(scores.dtype),
                                         "qhgc,che->qhge")
    num_q, num_heads = q.shape[:2]
    return out.reshape(num_q, num_heads, -1), lse.reshape(num_q, num_heads)


# ---------------------------------------------------------------- stage: select
def overlap_weights(num_compressed: int, num_blocks: int, config: NSAConfig,
                    device=None, dtype=torch.float32) -> torch.Tensor:
    """omega [C, NB]: |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d (spec Eq. 9)."""
    starts = torch.arange(num_compressed, device=device) * config.compress_stride
    block_starts = torch.arange(num_blocks, device=device) * config.select_block
    lo = torch.maximum(starts.view(-1, 1), block_starts.view(1, -1))
    hi = torch.minimum(starts.view(-1, 1) + config.compress_block,
                       block_starts.view(1, -1) + config.select_block)
    return (hi - lo).clamp(min=0).to(dtype) / config.compress_stride


def block_importance(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor,
                     q_positions: torch.Tensor, num_blocks: int, config: NSAConfig,
                     scale: float) -> torch.Tensor:
    """p_slc [Q, HQ, NB] = p_cmp @ omega, with p_cmp the compressed-attention probabilities
    (0 where invisible) under the score stage's LSE [Q, HQ]."""
    scores, visible = compressed_scores(q, k_cmp, q_positions, config, scale)
    lse = lse.to(scores.dtype).reshape(scores.shape[:3])
    p_cmp = torch.exp(scores.masked_fill(~visible, _NEG_INF)
                      - lse.nan_to_num(neginf=0.0).unsqueeze(-1)).flatten(1, 2)
    omega = overlap_weights(p_cmp.shape[-1], num_blocks, config, p_cmp.device, p_cmp.dtype)
    return p_cmp @ omega


def top_blocks(p_slc: torch.Tensor, q_positions: torch.Tensor, num_kv_heads: int,
               config: NSAConfig) -> torch.Tensor:
    """Group-consistent top-n of the compressed importance p_slc [Q, HQ, NB], summed over
    each KV head's query heads (spec Eq. 10): see rank_blocks."""
    num_q, num_heads, num_blocks = p_slc.shape
    group_scores = p_slc.reshape(num_q, num_kv_heads, num_heads // num_kv_heads,
                                 num_blocks).sum(dim=2)
    return rank_blocks(group_scores, q_positions, config)


def rank_blocks(group_scores: torch.Tensor, q_positions: torch.Tensor, config: NSAConfig
                ) -> torch.Tensor:
    """Top-n of group scores [Q, H, NB]: block_indices [Q, H, n] int64, ascending, -1 padded
    at the end. Forced blocks (the first init_blocks and the local_blocks ending at the
    current one) outrank all others; only blocks j <= t // l' are candidates; ties go to
    the lower block index. Scores may be any finite value (the bounds scorer's are
    logits); NaN ranks below every real candidate."""
    num_q, num_kv_heads, num_blocks = group_scores.shape
    blocks = torch.arange(num_blocks, device=group_scores.device).view(1, -1)
    current = (q_positions // config.select_block).view(-1, 1)
    candidate = blocks <= current
    forced = candidate & ((blocks < config.init_blocks)
                          | (blocks > current - config.local_blocks))
    scores = group_scores.nan_to_num(nan=torch.finfo(group_scores.dtype).min,
                                     neginf=torch.finfo(group_scores.dtype).min)
    scores = scores.masked_fill(forced[:, None, :], math.inf)
    scores = scores.masked_fill(~candidate[:, None, :], _NEG_INF)
    topk = config.select_topk
    if num_blocks < topk:  # pad so the sort always yields n columns
        scores = torch.nn.functional.pad(scores, (0, topk - num_blocks), value=_NEG_INF)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen = torch.gather(scores, -1, order) != _NEG_INF
    # Ascending block order with the -1 padding last: sort with padding keyed past the end.
    keyed = torch.where(chosen, order, torch.full_like(order, 1 << 62))
    keyed = torch.sort(keyed, dim=-1).values
    return torch.where(keyed == 1 << 62, torch.full_like(keyed, -1), keyed)


def select(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, q_positions: torch.Tensor,
           num_tokens: int, config: NSAConfig, scale: float) -> torch.Tensor:
    """Block selection for queries over a sequence of num_tokens: block_indices [Q, H, n]."""
    p_slc = block_importance(q, k_cmp, lse, q_positions, config.num_select_blocks(num_tokens),
                             config, scale)
    return top_blocks(p_slc, q_positions, k_cmp.shape[1], config)


# ---------------------------------------------------------------- stage: select (bounds)
def block_bounds(k: torch.Tensor, config: NSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The "bounds" scorer's cache entries: the elementwise min and max of each complete
    selection block's keys, [NBc, H, D] each with NBc = config.num_bounded(T), in k's dtype
    (a min or max of stored values is one of them: exact in any dtype)."""
    num_bounded = config.num_bounded(k.shape[0])
    blocks = k[:num_bounded * config.select_block].unflatten(0, (num_bounded,
                                                                 config.select_block))
    return blocks.amin(dim=1), blocks.amax(dim=1)


def bound_scores(q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor,
                 config: NSAConfig, scale: float) -> torch.Tensor:
    """Quest's bound of each query head's largest scaled logit in each bounded block:
    s * sum_i max(q_i min_i, q_i max_i) = s * (q+ . max + q- . min) with q+ = max(q, 0),
    q- = min(q, 0) (the same products, since min <= max). [Q, H, G, NBc]."""
    work = _work_dtype(q)
    qg = _group_view(q.to(work), k_min.shape[1])                     # [Q, H, G, D]
    upper = (torch.einsum("qhgd,bhd->qhgb", qg.clamp(min=0), k_max.to(work))
             + torch.einsum("qhgd,bhd->qhgb", qg.clamp(max=0), k_min.to(work)))
    return upper * scale


def group_bound_scores(q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """A KV head's "bounds" score of each bounded block: the sum of bound_scores over its G
    query heads, [Q, H, NBc]. The sum folds into the query: (sum_g q_g+) . max +
    (sum_g q_g-) . min, one pair of vectors per (token, KV head) whatever G."""
    work = _work_dtype(q)
    qg = _group_view(q.to(work), k_min.shape[1])                     # [Q, H, G, D]
    q_pos, q_neg = qg.clamp(min=0).sum(dim=2), qg.clamp(max=0).sum(dim=2)
    return (torch.einsum("qhd,bhd->qhb", q_pos, k_max.to(work))
            + torch.einsum("qhd,bhd->qhb", q_neg, k_min.to(work))) * scale


def select_by_bounds(q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor,
                     q_positions: torch.Tensor, num_tokens: int, config: NSAConfig,
                     scale: float) -> torch.Tensor:
    """Block selection with the "bounds" scorer: block_indices [Q, H, n]. A KV head's score
    of a block is the sum over its G query heads of their bounds (`group_bound_scores`;
    the README's "Selection scorer" has the measurements that chose the sum over the max);
    only complete blocks have bounds, and every block that is not complete at position t
    is its current block, which is forced."""
    num_blocks = config.num_select_blocks(num_tokens)
    group = group_bound_scores(q, k_min, k_max, scale)
    group = torch.nn.functional.pad(group, (0, num_blocks - group.shape[-1]),
                                    value=_NEG_INF)
    return rank_blocks(group, q_positions, config)


def _blocks_to_mask(block_indices: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[Q, H, n] (-1 padded) -> bool [Q, H, NB]."""
    mask = torch.zeros(block_indices.shape[:2] + (num_blocks + 1,), dtype=torch.bool,
                       device=block_indices.device)
    mask.scatter_(-1, torch.where(block_indices < 0, num_blocks, block_indices), True)
    return mask[..., :num_blocks]


# ---------------------------------------------------------------- stage: attend
def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        block_indices: torch.Tensor, q_positions: torch.Tensor,
                        config: NSAConfig, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """o_slc [Q, HQ, Dv] and LSE [Q, HQ]: exact attention over the selected blocks' positions <= t.

    Neighbouring queries select mostly the same blocks, so each chunk of consecutive
    queries reads the union of its selected blocks once (one GEMM) and masks per query,
    rather than gathering n*l' keys for every query.
    """
    work = _work_dtype(q)
    num_q, num_heads, _ = q.shape
    num_tokens = k.shape[0]
    block = config.select_block
    selected = _blocks_to_mask(block_indices, config.num_select_blocks(num_tokens))
    qg = _group_view(q.to(work), k.shape[1])
    offsets = torch.arange(block, device=q.device)

    def attend_rows(rows):
        union = selected[rows].flatten(0, 1).any(dim=0).nonzero().squeeze(1)
        positions = (union.unsqueeze(1) * block + offsets).flatten()
        positions = positions[positions < num_tokens]
        mask = (selected[rows][:, :, positions // block]
                & (positions.view(1, 1, -1) <= q_positions[rows].view(-1, 1, 1)))
        scores = torch.einsum("qhgd,phd->qhgp", qg[rows], k[positions].to(work)) * scale
        return _masked_softmax_attention(scores, mask.unsqueeze(2), v[positions].to(work),
                                         "qhgp,phe->qhge")

    return _over_query_chunks(num_q, num_heads, _SELECT_CHUNK_QUERIES, attend_rows)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_positions: torch.Tensor, config: NSAConfig, scale: float,
                     exclude_blocks: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """o_win [Q, HQ, Dv], LSE [Q, HQ]: attention over positions max(0, t-w+1)..t.

    `exclude_blocks` (bool [Q, H, NB]) removes positions of those selection blocks; the
    merged mode uses it so no position is counted twice.
    """
    work = _work_dtype(q)
    num_q, num_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    qg = _group_view(q.to(work), num_kv_heads)
    window = config.window
    chunk = max(1, min(num_q, _CHUNK_ELEMENTS // max(1, num_heads * (window + num_q))))

    def attend_rows(rows):
        pos = q_positions[rows]
        first, last = max(0, int(pos[0]) - window + 1), int(pos[-1])
        keys_pos = torch.arange(first, last + 1, device=q.device)
        mask = ((keys_pos.view(1, -1) <= pos.view(-1, 1))
                & (keys_pos.view(1, -1) > pos.view(-1, 1) - window))[:, None, None, :]
        if exclude_blocks is not None:
            excluded = exclude_blocks[rows][:, :, keys_pos // config.select_block]
            mask = mask & ~excluded.unsqueeze(2)
        scores = torch.einsum("qhgd,khd->qhgk", qg[rows], k[first:last + 1].to(work)) * scale
        return _masked_softmax_attention(scores, mask, v[first:last + 1].to(work),
                                         "qhgk,khe->qhge")

    return _over_query_chunks(num_q, num_heads, chunk, attend_rows)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
           q_positions: torch.Tensor, config: NSAConfig, scale: float, gated: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selected blocks and the sliding window over the raw K/V.

    merged (gated=False): (exact attention over selected blocks ∪ window, None); window
      positions inside a selected block are counted once.
    gated: (o_slc, o_win), o_win 0 when window == 0.
    """
    o_slc, lse_slc = selection_attention(q, k, v, block_indices, q_positions, config, scale)
    if not config.window:
        return o_slc, (torch.zeros_like(o_slc) if gated else None)
    if gated:
        return o_slc, window_attention(q, k, v, q_positions, config, scale)[0]
    selected = _blocks_to_mask(block_indices, config.num_select_blocks(k.shape[0]))
    o_win, lse_win = window_attention(q, k, v, q_positions, config, scale,
                                      exclude_blocks=selected)
    return combine_by_lse(o_slc, lse_slc, o_win, lse_win), None


# ---------------------------------------------------------------- stage: combine
def combine_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two disjoint key sets from their partial results."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.nan_to_num(neginf=0.0)
    weight_a = torch.exp(lse_a - safe).nan_to_num(0.0).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).nan_to_num(0.0).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b


def combine_gated(branches: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win.

    branches [..., 3, Dv] and gates [..., 3], both in BRANCHES order (cmp, slc, win).
    """
    return (branches * gates.to(branches.dtype).unsqueeze(-1)).sum(dim=-2)


def nsa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: NSAConfig, *,
                gated: bool, scale: float | None = None,
                compressed: tuple[torch.Tensor, torch.Tensor] | None = None,
                bounds: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stages in order, the shared core of every NSA path (float32/64 result, not cast
    back): compress -> score -> select -> attend (selection_score "compressed"), or
    bounds -> select -> attend ("bounds", merged mode only).

    gated=False: merged, training-free mode -> [Q, HQ, Dv]: exact attention over the
      selected blocks ∪ window; the compressed branch (if any) only scores blocks.
    gated=True: the three branch outputs [Q, HQ, 3, Dv] in BRANCHES order (cmp, slc, win),
      the model applies its gates (o_win is 0 when window == 0).
    compressed: (k_cmp, v_cmp) as a cache holds them (at least C(T-1) entries); computed
      from k/v with phi = mean when None.
    bounds: (k_min, k_max) as a cache holds them (at least num_bounded(T) blocks);
      computed from k when None.
    Returns (output, block_indices [Q, H, n]).
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("expected q [Q, HQ, D], k [T, H, D], v [T, H, Dv]")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    num_tokens = k.shape[0]
    positions = query_positions(q.shape[0], num_tokens, q.device)
    if config.uses_bounds:
        if gated:
            raise ValueError("selection_score='bounds' is a merged-mode scorer; the gated "
                             "mode (NSA checkpoints) scores with its compressed branch")
        if bounds is None:
            bounds = block_bounds(k, config)
        num_bounded = config.num_bounded(num_tokens)
        k_min, k_max = (x[:num_bounded] for x in bounds)
        block_indices = select_by_bounds(q, k_min, k_max, positions, num_tokens, config,
                                         scale)
        return attend(q, k, v, block_indices, positions, config, scale, False)[0], \
            block_indices
    if compressed is None:
        compressed = compress(k, v, config)
    num_cmp = config.num_compressed(num_tokens)
    k_cmp, v_cmp = (x[:num_cmp] for x in compressed)
    o_cmp, lse = score(q, k_cmp, v_cmp, positions, config, scale)
    block_indices = select(q, k_cmp, lse, positions, num_tokens, config, scale)
    o_slc, o_win = attend(q, k, v, block_indices, positions, config, scale, gated)
    if not gated:
        return o_slc, block_indices
    return torch.stack((o_cmp, o_slc, o_win), dim=-2), block_indices


def nsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: NSAConfig,
                  gates: torch.Tensor | None = None, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA for one sequence: returns (out [Q, HQ, Dv] in q's dtype, block_indices [Q, H, n]).

    gates [Q, HQ, 3] (cmp, slc, win): gated combination of the three branches (NSA models).
    gates None: merged, training-free mode — exact attention over selected blocks ∪ window,
    the compressed branch used only to score blocks.
    """
    if gates is not None and gates.shape != q.shape[:2] + (3,):
        raise ValueError(f"gates must be [Q, HQ, 3] = {tuple(q.shape[:2]) + (3,)}, "
                         f"got {tuple(gates.shape)}")
    out, block_indices = nsa_forward(q, k, v, config, gated=gates is not None, scale=scale)
    if gates is not None:
        out = combine_gated(out, gates)
    return out.to(q.dtype), block_indices


# ---------------------------------------------------------------- decode economics
def decode_read_counts_batch(seq_lens: torch.Tensor, config: NSAConfig, gated: bool = False
                             ) -> dict[str, torch.Tensor]:
    """Per-request raw-token equivalents (one token's K and V) a decode step reads per KV
    head at context length seq_lens: what the kernels read, by stage.

    compressed: C(t) compressed entries (K and V each one token's size; the merged mode
      reads their keys only, counted whole as the spec's Table 4 does);
    bounds: the "bounds" scorer's block bounds read, one (key min, key max) pair per
      non-forced candidate block = one raw token's K+V size each;
    selected: real tokens of the selected blocks (the partial current block included);
    window: the sliding window's tokens. Gated mode (NSA checkpoints, separate branches):
      min(w, t), the spec's Table-4 count. Merged mode: only window tokens outside the
      selected blocks are read (the attend stage skips the others), counted as the window
      minus the forced local blocks and at most the tokens no selected block covers, so
      selected + window <= t;
    total, and dense = t.

    Merged mode at t <= n*l' (`NSAConfig.dense_tokens`): every block is selected, so the
    step is exact dense attention over the raw K/V and reads t tokens, no scorer entry."""
    seq_lens = torch.as_tensor(seq_lens, dtype=torch.int64)
    if (seq_lens < 1).any():
        raise ValueError(f"seq_lens must be >= 1, got {seq_lens.min().item()}")
    block, topk = config.select_block, config.select_topk
    num_blocks = -(-seq_lens // block)
    sparse = num_blocks > topk
    last_block_tokens = seq_lens - (num_blocks - 1) * block
    selected = torch.where(sparse, (topk - 1) * block + last_block_tokens, seq_lens)
    zeros = torch.zeros_like(seq_lens)
    window = seq_lens.clamp(max=config.window)
    if config.uses_bounds:
        compressed = zeros
        bounds = torch.where(sparse, num_blocks - config.init_blocks - config.local_blocks,
                             zeros)
    else:
        compressed = config.num_compressed(seq_lens)
        bounds = zeros
    if not gated:
        compressed = torch.where(sparse, compressed, zeros)
        local = torch.minimum((config.local_blocks - 1) * block + last_block_tokens,
                              seq_lens)
        window = torch.minimum((window - local).clamp(min=0), seq_lens - selected)
    total = compressed + bounds + selected + window
    return {"compressed": compressed, "bounds": bounds, "selected": selected,
            "window": window, "total": total, "dense": seq_lens}


def decode_read_counts(seq_len: int, config: NSAConfig, gated: bool = False
                       ) -> dict[str, int]:
    """decode_read_counts_batch for one context length, as plain ints."""
    counts = decode_read_counts_batch(torch.tensor([seq_len]), config, gated)
    return {name: int(value[0]) for name, value in counts.items()}
