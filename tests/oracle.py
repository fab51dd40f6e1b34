"""Brute-force float64 NSA written line by line from NSA_SPEC.md: loops, no cleverness.

It shares no code with the reference (only the NSAConfig dataclass) so that it can catch
the reference's mistakes.
"""
from __future__ import annotations

import math

import torch


def _softmax_attend(qv, keys, values, scale):
    """qv [D], keys [N, D], values [N, Dv] -> (output [Dv], probabilities [N]); N may be 0."""
    if keys.shape[0] == 0:
        return (torch.zeros(values.shape[-1], dtype=torch.float64),
                torch.zeros(0, dtype=torch.float64))
    logits = (keys @ qv) * scale
    probs = torch.softmax(logits, dim=0)
    return probs @ values, probs


def oracle_group_scores(q, k, v, cfg, scale=None):
    """Per query row: dict with p_cmp per head, group scores per KV head over candidate blocks."""
    return _run(q, k, v, cfg, None, scale, None)[2]


def oracle_nsa(q, k, v, cfg, gates=None, scale=None, block_indices=None):
    """Returns (out float64 [Q, HQ, Dv], block_indices [Q, H, n], group_scores [Q, H, NB]).

    block_indices (optional) overrides the oracle's own selection (used where two
    implementations break a near-tie differently); the oracle's own is still returned.
    """
    return _run(q, k, v, cfg, gates, scale, block_indices)


def _run(q, k, v, cfg, gates, scale, forced_indices):
    # Thousands of tiny ops: one thread, or OpenMP start-up costs dominate on a busy box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _brute_force(q, k, v, cfg, gates, scale, forced_indices)
    finally:
        torch.set_num_threads(threads)


def _brute_force(q, k, v, cfg, gates, scale, forced_indices):
    q, k, v = q.double(), k.double(), v.double()
    Q, HQ, D = q.shape
    T, H, Dv = v.shape
    G = HQ // H
    s = 1.0 / math.sqrt(D) if scale is None else scale
    l, d, lp, n, w = (cfg.compress_block, cfg.compress_stride, cfg.select_block,
                      cfg.select_topk, cfg.window)
    NB = -(-T // lp)
    # compressed tokens of the whole sequence that exist at all (for t = T-1)
    num_cmp = 0 if T < l else (T - l) // d + 1
    k_cmp = [k[i * d:i * d + l].mean(dim=0) for i in range(num_cmp)]   # each [H, D]
    v_cmp = [v[i * d:i * d + l].mean(dim=0) for i in range(num_cmp)]
    out = torch.zeros(Q, HQ, Dv, dtype=torch.float64)
    indices = torch.full((Q, H, n), -1, dtype=torch.int64)
    group_scores = torch.zeros(Q, H, NB, dtype=torch.float64)
    for row in range(Q):
        t = T - Q + row
        visible = [i for i in range(num_cmp) if i * d + l - 1 <= t]
        # omega(i, j) = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d for the visible i
        omega = [[(j, (min(i * d + l, (j + 1) * lp) - max(i * d, j * lp)) / d)
                  for j in range(NB) if min(i * d + l, (j + 1) * lp) > max(i * d, j * lp)]
                 for i in visible]
        o_cmp = torch.zeros(HQ, Dv, dtype=torch.float64)
        p_slc = torch.zeros(HQ, NB, dtype=torch.float64)
        for h in range(HQ):
            kv = h // G
            keys = (torch.stack([k_cmp[i][kv] for i in visible]) if visible
                    else torch.zeros(0, D, dtype=torch.float64))
            vals = (torch.stack([v_cmp[i][kv] for i in visible]) if visible
                    else torch.zeros(0, Dv, dtype=torch.float64))
            o_cmp[h], probs = _softmax_attend(q[row, h], keys, vals, s)
            importance = [0.0] * NB
            for prob, weights in zip(probs.tolist(), omega):
                for j, weight in weights:
                    importance[j] += weight * prob
            p_slc[h] = torch.tensor(importance, dtype=torch.float64)
        current = t // lp
        for g in range(H):
            if getattr(cfg, "selection_score", "compressed") == "bounds":
                P = _bounds_group_scores(q[row], k, g, G, t, lp, NB, s)
            else:
                P = p_slc[g * G:(g + 1) * G].sum(dim=0)
            group_scores[row, g] = P
            candidates = list(range(current + 1))

            def rank(j):
                forced = j < cfg.init_blocks or current - cfg.local_blocks < j <= current
                return (0 if forced else 1, -float(P[j]), j)

            chosen = sorted(sorted(candidates, key=rank)[:n])
            indices[row, g, :len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
        use = forced_indices[row] if forced_indices is not None else indices[row]
        for h in range(HQ):
            kv = h // G
            blocks = [int(j) for j in use[kv] if int(j) >= 0]
            selected = [p for j in blocks for p in range(j * lp, (j + 1) * lp) if p <= t]
            window = list(range(max(0, t - w + 1), t + 1)) if w > 0 else []
            if gates is None:
                union = sorted(set(selected) | set(window))
                out[row, h], _ = _softmax_attend(q[row, h], k[union, kv], v[union, kv], s)
            else:
                gt = gates[row, h].double()
                o_slc, _ = _softmax_attend(q[row, h], k[selected, kv], v[selected, kv], s)
                o = gt[0] * o_cmp[h] + gt[1] * o_slc
                if w > 0:
                    o_win, _ = _softmax_attend(q[row, h], k[window, kv], v[window, kv], s)
                    o = o + gt[2] * o_win
                out[row, h] = o
    return out, indices, group_scores


def _bounds_group_scores(q_row, k, kv, G, t, lp, NB, s):
    """The "bounds" scorer (Quest) for one query position t and KV head kv: for every block
    j complete at t (all of j*l' .. j*l'+l'-1 <= t), per query head of the group the sum over
    dimensions i of max(q_i * min_i, q_i * max_i), min/max over the block's keys, times the
    scale; the group's score is the sum over its G heads. Blocks without bounds: -inf."""
    scores = torch.full((NB,), float("-inf"), dtype=torch.float64)
    for j in range(NB):
        if (j + 1) * lp - 1 > t:
            continue
        block = k[j * lp:(j + 1) * lp, kv]                      # [l', D]
        lo = torch.stack([block[:, i].min() for i in range(block.shape[1])])
        hi = torch.stack([block[:, i].max() for i in range(block.shape[1])])
        total = 0.0
        for h in range(kv * G, (kv + 1) * G):
            total += s * sum(max(float(q_row[h, i] * lo[i]), float(q_row[h, i] * hi[i]))
                             for i in range(block.shape[1]))
        scores[j] = total
    return scores


def assert_same_blocks_except_near_ties(idx, oracle_idx, group_scores, tolerance):
    """Same block sets per (row, KV head), except where two implementations break a near-tie
    (oracle group scores of the swapped blocks within `tolerance`) differently."""
    mismatch = (idx != oracle_idx).any(dim=-1)
    for row, head in mismatch.nonzero().tolist():
        ours = set(idx[row, head].tolist()) - {-1}
        theirs = set(oracle_idx[row, head].tolist()) - {-1}
        scores = group_scores[row, head]
        gap = abs(min(scores[list(ours - theirs)]).item()
                  - max(scores[list(theirs - ours)]).item())
        assert gap < tolerance, f"row {row} head {head}: {sorted(ours)} vs oracle {sorted(theirs)}"
