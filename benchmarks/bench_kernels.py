"""GPU correctness and per-layer timing of the Triton NSA stages (kernels/triton/).

Run on the GPU machine from the repo root:  python benchmarks/bench_kernels.py
Optional: FA3_DIR (folder with _vllm_fa3_C.abi3.so + flash_attn_interface.py, see
../shared/tools/fa3-anchor.sh), fla-core importable for FLA's parallel_nsa, OUT (folder for
the JSON; default benchmarks/results). Prints tables; writes kernels_<device>.json.

1. Correctness at realistic shapes: a mixed batch (prefill chunks with cached context,
   whole prompts, decodes at 8k-64k) on shuffled pages, bf16, merged and gated, and a
   decode-only batch through the split scan; outputs poisoned with NaN before each run;
   compared with the torch twin (kernels/paged.py): relative error, and block sets identical
   except near-ties (checked against the reference's group scores).
2. Prefill 8k-64k, (HQ, H) = (32, 8), (64, 4), D = 128: NSA (gated: three branches; merged too)
   vs torch SDPA (flash) vs FA3 vs FLA parallel_nsa (G >= 16, no window).
3. Decode, batch 1/8/32 at 8k/32k/64k, paged: NSA (eager and CUDA graph) vs FA3 paged decode,
   bytes/s on the spec's Table-4 bytes vs the measured copy bandwidth.
"""
from __future__ import annotations

import cProfile
import datetime
import importlib
import io
import json
import math
import os
import pstats
import sys
import time
import types

import torch
import triton

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
try:
    import vllm_nsa.kernels  # noqa: F401  (installed: kernels/ is vllm_nsa.kernels)
except ModuleNotFoundError:  # a bare checkout (the GPU machine): map kernels/ by hand
    import importlib.util
    _spec = importlib.util.spec_from_file_location(
        "vllm_nsa.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(ROOT, "kernels")])
    sys.modules["vllm_nsa.kernels"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["vllm_nsa.kernels"])
from vllm_nsa.config import NSAConfig  # noqa: E402
from vllm_nsa.kernels import paged, reference  # noqa: E402
from vllm_nsa.kernels import triton as nsa_triton  # noqa: E402
from vllm_nsa.kernels.triton import launch as launch_module  # noqa: E402
from vllm_nsa.kernels.triton import plan as plan_module  # noqa: E402
from vllm_nsa.provenance import git_commit  # noqa: E402

# The stage modules (the package re-exports functions of the same names).
STAGES = {name: importlib.import_module(f"vllm_nsa.kernels.triton.{name}")
          for name in ("compress", "bounds", "score", "select", "attend", "combine")}
attend_module = STAGES["attend"]

CFG = NSAConfig()  # paper: l=32, d=16, l'=64, n=16, w=512; the NSA checkpoints' scorer
# What a dense model served with the NSA backend gets with no flags: the paper's parameters
# and the "bounds" selection scorer (merged mode only).
CFG_BOUNDS = NSAConfig.for_dense_model(None)
D = 128
PAGE = 64
DT = torch.bfloat16
DEV = "cuda"
RESULTS: dict = {}


def log(*args):
    print(*args, flush=True)


def bench(fn, rep_ms=300):
    """Median milliseconds (CUDA events through triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=20, rep=rep_ms, return_mode="median")


# ------------------------------------------------------------------ paged fixtures
def paged_batch(seq_lens, num_kv_heads, gen_seed=0, page_size=PAGE):
    """Random raw caches on shuffled pages for requests of seq_lens, plus compressed caches
    filled by the Triton emission kernel, and the "bounds" scorer's caches under
    "bounds_"-prefixed keys. Returns dict of tensors."""
    torch.manual_seed(gen_seed)
    pages_per = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(pages_per) + 1
    key_cache = torch.randn(num_pages, page_size, num_kv_heads, D, device=DEV, dtype=DT)
    value_cache = torch.randn_like(key_cache)
    perm = torch.randperm(num_pages, device=DEV).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(pages_per), dtype=torch.int32, device=DEV)
    used = 0
    for r, n in enumerate(pages_per):
        table[r, :n] = perm[used:used + n]
        used += n
    b = dict(key_cache=key_cache, value_cache=value_cache, table=table,
             seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV))
    for prefix, cfg, per_page, entries in (
            ("", CFG, page_size // CFG.compress_stride, CFG.num_compressed),
            ("bounds_", CFG_BOUNDS, CFG_BOUNDS.bounds_per_page(page_size),
             CFG_BOUNDS.num_bounded)):
        cmp_key = torch.full((num_pages, per_page, num_kv_heads, D), float("nan"), device=DEV,
                             dtype=DT)
        cmp_value = cmp_key.clone()
        reqs, idxs = [], []
        for r, s in enumerate(seq_lens):
            c = entries(s)
            reqs.append(torch.full((c,), r, dtype=torch.int32))
            idxs.append(torch.arange(c, dtype=torch.int32))
        emit_req = torch.cat(reqs).to(DEV)
        emit_index = torch.cat(idxs).to(DEV)
        nsa_triton.compress(key_cache, value_cache, cmp_key, cmp_value, table, emit_req,
                            emit_index, cfg)
        b.update({prefix + "cmp_key": cmp_key, prefix + "cmp_value": cmp_value,
                  prefix + "emit_req": emit_req, prefix + "emit_index": emit_index})
    return b


def run_nsa(impl, q, b, qsl, gated, cfg=CFG, **hints):
    shape = (q.shape[0], q.shape[1], 3, D) if gated else (q.shape[0], q.shape[1], D)
    out = torch.full(shape, float("nan"), device=DEV, dtype=DT)   # poison
    prefix = "bounds_" if cfg.uses_bounds else ""
    plan = impl.make_plan(q, b["key_cache"], b["value_cache"], b["table"], qsl, cfg, gated,
                          **hints)
    idx = impl.nsa_paged_attention(q, b["key_cache"], b["value_cache"], b[prefix + "cmp_key"],
                                   b[prefix + "cmp_value"], b["table"], qsl, b["seq_lens"], cfg,
                                   D ** -0.5, out, gated, plan)
    return out, idx


def group_scores(q_rows, b, r, positions, num_kv_heads, cfg=CFG):
    """Reference group importance [rows, H, NB] for query rows of request r (float32)."""
    s = int(b["seq_lens"][r])
    row = b["table"][r]
    if cfg.uses_bounds:
        k_min, k_max = (paged.gather_bounds(b[name], row, s, PAGE, cfg)
                        for name in ("bounds_cmp_key", "bounds_cmp_value"))
        return reference.group_bound_scores(q_rows, k_min, k_max, D ** -0.5)
    k_cmp = paged.gather_compressed(b["cmp_key"], row, s, cfg)
    v_cmp = paged.gather_compressed(b["cmp_value"], row, s, cfg)
    _, lse = reference.score(q_rows, k_cmp, v_cmp, positions, cfg, D ** -0.5)
    p_slc = reference.block_importance(q_rows, k_cmp, lse, positions, cfg.num_select_blocks(s),
                                       cfg, D ** -0.5)
    return p_slc.reshape(p_slc.shape[0], num_kv_heads, -1, p_slc.shape[-1]).sum(2)


def compare(name, q, b, qsl, gated, num_kv_heads, cfg=CFG, **hints):
    # Twice: the first launches take Triton's path, the repeat launches the compiled kernels
    # directly (launch.py) into a fresh poisoned output; the two must agree bit for bit.
    first, first_idx = run_nsa(nsa_triton, q, b, qsl, gated, cfg, **hints)
    out, idx = run_nsa(nsa_triton, q, b, qsl, gated, cfg, **hints)
    torch.cuda.synchronize()
    direct_same = bool(torch.equal(first_idx, idx)
                       and torch.equal(first.nan_to_num(7.0), out.nan_to_num(7.0)))
    ref, ref_idx = run_nsa(paged, q, b, qsl, gated, cfg)
    unwritten = int(out.isnan().sum())
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    mismatch = (idx != ref_idx).any(-1)
    rows = mismatch.nonzero().tolist()
    worst_gap = 0.0
    starts = qsl.tolist()
    for token, head in rows[:200]:
        r = max(i for i in range(len(starts) - 1) if starts[i] <= token)
        s = int(b["seq_lens"][r])
        pos = s - (starts[r + 1] - starts[r]) + (token - starts[r])
        scores = group_scores(q[token:token + 1], b, r, torch.tensor([pos], device=DEV),
                              num_kv_heads, cfg)[0, head]
        ours = set(idx[token, head].tolist()) - {-1}
        theirs = set(ref_idx[token, head].tolist()) - {-1}
        gap = abs(scores[list(ours - theirs)].min().item()
                  - scores[list(theirs - ours)].max().item()) / scores.abs().max().item()
        worst_gap = max(worst_gap, gap)
    # Per row (token, query head[, branch]): the worst row's relative error, rows whose
    # block set differs at a near-tie left out (one norm over everything hides a bad row).
    tied = mismatch.repeat_interleave(q.shape[1] // num_kv_heads, dim=1)
    diff = (out.float() - ref.float()).nan_to_num(float("inf"))
    row_rel = diff.norm(dim=-1) / ref.float().norm(dim=-1).clamp_min(1e-6)
    if gated:
        tied = tied.unsqueeze(-1).expand_as(row_rel)
    worst_row = row_rel[~tied].max().item() if (~tied).any() else 0.0
    ok = (unwritten == 0 and rel < 1e-2 and worst_row < 5e-2 and worst_gap < 1e-3
          and direct_same)
    entry = dict(rel_err=rel, worst_row_rel_err=worst_row, unwritten=unwritten,
                 direct_launch_same=direct_same,
                 rows=int(mismatch.numel()), mismatched_rows=len(rows),
                 worst_tie_gap_rel=worst_gap, ok=ok)
    log(f"  {name:44s} rel_err={rel:.2e} worst row {worst_row:.1e} unwritten={unwritten} "
        f"block-set mismatches={len(rows)}/{mismatch.numel()} (worst rel gap {worst_gap:.1e}) "
        f"direct=={'same' if direct_same else 'DIFFERENT'} {'OK' if ok else 'FAIL'}")
    return entry


# (gated, config): the NSA checkpoints' gated mode, merged mode with the paper's scorer, and
# merged mode with the dense-model default scorer.
MODES = ((True, CFG), (False, CFG), (False, CFG_BOUNDS))


def mode_name(gated, cfg):
    return "gated" if gated else f"merged-{cfg.selection_score}"


def bench_or_nan(label, fn):
    """bench(fn), logged under label; NaN (and the error logged) when it fails, so a sweep
    goes on past an option that does not compile."""
    try:
        ms = bench(fn)
    except Exception as exc:
        log(f"  {label} failed: {exc!r}")
        ms = float("nan")
    log(f"  {label}: {ms:8.2f} ms")
    return ms


UNION_LAUNCHES = [dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
UNION_ROWS = (64, 128)


def tune():
    """At 64k, both shapes, the "bounds" default's two prefill stages alone: the select for
    tiles of 32/64/128 tokens (plan.BOUNDS_SELECT_TOKENS), the union attention for tiles
    of UNION_ROWS rows (plan.UNION_ROWS) x each launch option in UNION_LAUNCHES
    (attend.UNION_LAUNCH)."""
    log("== bounds select at T=65536 by select tile (tokens); union attend by rows, launch ==")
    rows = []
    default, default_launch = plan_module.BOUNDS_SELECT_TOKENS, attend_module.UNION_LAUNCH
    default_rows = plan_module.UNION_ROWS
    T = 65536
    for hq, h in ((32, 8), (64, 4)):
        b = paged_batch([T], h, gen_seed=T + hq)
        q = torch.randn(T, hq, D, device=DEV, dtype=DT)
        qsl = torch.tensor([0, T], dtype=torch.int32, device=DEV)

        def make_plan():
            return nsa_triton.make_plan(q, b["key_cache"], b["value_cache"], b["table"], qsl,
                                        CFG_BOUNDS, False, max_query_len=T, scan_bound=T)
        for tokens in (32, 64, 128):
            plan_module.BOUNDS_SELECT_TOKENS = tokens
            plan = make_plan()
            ms = bench_or_nan(f"({hq},{h}) select tile {tokens:3d} tokens",
                              lambda: nsa_triton.select_bounds(
                                  q, b["bounds_cmp_key"], b["bounds_cmp_value"], b["table"],
                                  qsl, b["seq_lens"], CFG_BOUNDS, D ** -0.5, PAGE, plan))
            rows.append(dict(HQ=hq, H=h, T=T, select_tokens=tokens, select_ms=ms))
        plan_module.BOUNDS_SELECT_TOKENS = default
        plan = make_plan()
        indices = nsa_triton.select_bounds(
            q, b["bounds_cmp_key"], b["bounds_cmp_value"], b["table"], qsl, b["seq_lens"],
            CFG_BOUNDS, D ** -0.5, PAGE, plan)
        out = torch.empty_like(q)
        for union_rows in UNION_ROWS:
            plan_module.UNION_ROWS = union_rows
            plan = make_plan()
            for launch in UNION_LAUNCHES:
                attend_module.UNION_LAUNCH = launch
                ms = bench_or_nan(
                    f"({hq},{h}) union attend {union_rows} rows {launch}",
                    lambda: nsa_triton.attend(q, b["key_cache"], b["value_cache"], b["table"],
                                              qsl, b["seq_lens"], indices, CFG_BOUNDS,
                                              D ** -0.5, out, None, plan))
                rows.append(dict(HQ=hq, H=h, T=T, union_rows=union_rows,
                                 union_launch=launch, attend_ms=ms))
        plan_module.UNION_ROWS, attend_module.UNION_LAUNCH = default_rows, default_launch
        torch.cuda.empty_cache()
    RESULTS["tune"] = rows
    dump()
    return rows


def correctness():
    log("== correctness (bf16, D=128, paper params, page 64, shuffled pages) ==")
    res = {}
    # Mixed batch: chunk with 7k cached context, decode at 64k, odd chunk at 32k+77,
    # decode at 16k+1, whole 3000-token prompt.
    seq_lens = [8192, 65536, 32845, 16385, 3000]
    q_lens = [1024, 1, 256, 1, 3000]
    for hq, h in ((32, 8), (64, 4)):
        b = paged_batch(seq_lens, h, gen_seed=hq)
        # emission kernels vs twin on the same raw cache: compressed entries, key bounds
        for prefix, cfg in (("", CFG), ("bounds_", CFG_BOUNDS)):
            ck, cv = (torch.full_like(b[prefix + name], float("nan"))
                      for name in ("cmp_key", "cmp_value"))
            paged.compress(b["key_cache"], b["value_cache"], ck, cv, b["table"],
                           b[prefix + "emit_req"], b[prefix + "emit_index"], cfg)
            cmp_err = max((x.float() - b[prefix + name].float()).nan_to_num().abs().max().item()
                          for x, name in ((ck, "cmp_key"), (cv, "cmp_value")))
            same_nan = bool(torch.equal(ck.isnan(), b[prefix + "cmp_key"].isnan()))
            log(f"  {cfg.selection_score} entries ({hq},{h}): max abs diff {cmp_err:.1e}, "
                f"same slots {same_nan}")
            res[f"compress_{cfg.selection_score}_{hq}_{h}"] = dict(
                max_abs_diff=cmp_err, same_slots=same_nan, ok=cmp_err < 1e-2 and same_nan)
        qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                           device=DEV)
        q = torch.randn(sum(q_lens), hq, D, device=DEV, dtype=DT)
        for gated, cfg in MODES:
            mode = mode_name(gated, cfg)
            res[f"mixed_{hq}_{h}_{mode}"] = compare(f"mixed batch ({hq},{h}) {mode}", q, b, qsl,
                                                    gated, h, cfg)
            # the per-(token, KV head) prefill attention that union tiles replaced
            res[f"mixed_{hq}_{h}_{mode}_token"] = compare(
                f"mixed batch ({hq},{h}) {mode} token", q, b, qsl, gated, h, cfg,
                prefill_attend="token")
        # decode-only batch through the split scan (default split heuristic)
        dec = [8192, 32768, 65536, 12345]
        bd = paged_batch(dec, h, gen_seed=hq + 1)
        qd = torch.randn(len(dec), hq, D, device=DEV, dtype=DT)
        qsld = torch.arange(len(dec) + 1, dtype=torch.int32, device=DEV)
        for gated, cfg in MODES:
            mode = mode_name(gated, cfg)
            res[f"decode_{hq}_{h}_{mode}"] = compare(
                f"decode batch ({hq},{h}) {mode} split", qd, bd, qsld, gated, h, cfg,
                max_query_len=1, scan_bound=65536)
        del b, bd
        torch.cuda.empty_cache()
    RESULTS["correctness"] = res
    return all(v["ok"] for v in res.values())


# ------------------------------------------------------------------ baselines
def load_fa3():
    fa_dir = os.environ.get("FA3_DIR")
    if not fa_dir:
        return None
    try:
        pkg = types.ModuleType("fa3")
        pkg.__path__ = [fa_dir]
        sys.modules["fa3"] = pkg
        return importlib.import_module("fa3.flash_attn_interface")
    except Exception as exc:  # the anchor is optional
        log(f"FA3 unavailable: {exc!r}")
        return None


def load_fla():
    try:
        from fla.ops.nsa import parallel_nsa
        return parallel_nsa
    except Exception as exc:
        log(f"FLA unavailable: {exc!r}")
        return None


def copy_bandwidth():
    x = torch.randn(1 << 29, device=DEV, dtype=DT)     # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def kernel_breakdown(fn):
    """GPU time per kernel name (ms) for one call of fn."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name] = times.get(ev.name, 0.0) + ev.device_time / 1e3
    return {k: round(v, 4) for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:8]}


# ------------------------------------------------------------------ prefill
def prefill_flops(T, hq):
    """NSA FLOPs (2 per MAC): compressed scan (QK twice + PV) + selected/window (QK + PV)."""
    cmp = sum(CFG.num_compressed(t + 1) for t in range(T))          # sum over t of C(t)
    sel = min(T, CFG.select_topk * CFG.select_block)
    win = min(T, CFG.window)
    return 2 * hq * D * (3 * cmp + 2 * T * (sel + win))


# Prefill lengths; $PREFILL_LENGTHS (space-separated) runs a subset.
PREFILL_LENGTHS = [int(t) for t in os.environ.get(
    "PREFILL_LENGTHS", "8192 16384 32768 65536 131072").split()]


def prefill(fa3, fla):
    log("== prefill (one request of T tokens, bf16, D=128) ==")
    rows = []
    for hq, h in ((32, 8), (64, 4)):
        for T in PREFILL_LENGTHS:
            b = paged_batch([T], h, gen_seed=T + hq)
            q = torch.randn(T, hq, D, device=DEV, dtype=DT)
            qsl = torch.tensor([0, T], dtype=torch.int32, device=DEV)
            out3 = torch.empty(T, hq, 3, D, device=DEV, dtype=DT)
            out1 = torch.empty(T, hq, D, device=DEV, dtype=DT)
            args = (q, b["key_cache"], b["value_cache"], b["cmp_key"], b["cmp_value"],
                    b["table"], qsl, b["seq_lens"], CFG, D ** -0.5)
            plans = {gated: nsa_triton.make_plan(q, b["key_cache"], b["value_cache"], b["table"],
                                                 qsl, CFG, gated, max_query_len=T,
                                                 scan_bound=T) for gated in (False, True)}
            row = dict(T=T, HQ=hq, H=h, nsa_flops=prefill_flops(T, hq))
            row["nsa_gated_ms"] = bench(
                lambda: nsa_triton.nsa_paged_attention(*args, out3, True, plans[True]))
            row["nsa_merged_ms"] = bench(
                lambda: nsa_triton.nsa_paged_attention(*args, out1, False, plans[False]))
            # merged mode with the "bounds" scorer: a dense model's default
            bounds_args = (*args[:3], b["bounds_cmp_key"], b["bounds_cmp_value"], *args[5:8],
                           CFG_BOUNDS, D ** -0.5)
            bounds_plan = nsa_triton.make_plan(q, b["key_cache"], b["value_cache"], b["table"],
                                               qsl, CFG_BOUNDS, False, max_query_len=T,
                                               scan_bound=T)

            def nsa_bounds():
                return nsa_triton.nsa_paged_attention(*bounds_args, out1, False, bounds_plan)
            row["nsa_bounds_ms"] = bench(nsa_bounds)
            # the same two modes with prefill_attend="token" (before issue 15's union tiles)
            token_plans = {name: nsa_triton.make_plan(
                q, b["key_cache"], b["value_cache"], b["table"], qsl, cfg, gated,
                max_query_len=T, scan_bound=T, prefill_attend="token")
                for name, gated, cfg in (("gated", True, CFG), ("bounds", False, CFG_BOUNDS))}
            row["nsa_gated_token_ms"] = bench(lambda: nsa_triton.nsa_paged_attention(
                *args, out3, True, token_plans["gated"]))
            row["nsa_bounds_token_ms"] = bench(lambda: nsa_triton.nsa_paged_attention(
                *bounds_args, out1, False, token_plans["bounds"]))
            row["compress_ms"] = bench(lambda: nsa_triton.compress(
                b["key_cache"], b["value_cache"], b["cmp_key"], b["cmp_value"], b["table"],
                b["emit_req"], b["emit_index"], CFG))
            row["write_bounds_ms"] = bench(lambda: nsa_triton.compress(
                b["key_cache"], b["value_cache"], b["bounds_cmp_key"], b["bounds_cmp_value"],
                b["table"], b["bounds_emit_req"], b["bounds_emit_index"], CFG_BOUNDS))
            if T == 65536:
                row["breakdown_gated"] = kernel_breakdown(
                    lambda: nsa_triton.nsa_paged_attention(*args, out3, True, plans[True]))
                row["breakdown_bounds"] = kernel_breakdown(nsa_bounds)
            # dense baselines on contiguous K/V of the same size
            k = torch.randn(T, h, D, device=DEV, dtype=DT)
            v = torch.randn_like(k)
            qs = q.transpose(0, 1).unsqueeze(0)
            ks = k.transpose(0, 1).repeat_interleave(hq // h, 0).unsqueeze(0)
            vs = v.transpose(0, 1).repeat_interleave(hq // h, 0).unsqueeze(0)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                row["sdpa_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True))
            if fa3 is not None:
                cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
                try:
                    row["fa3_ms"] = bench(lambda: fa3.flash_attn_varlen_func(
                        q, k, v, T, cu, T, cu_seqlens_k=cu, causal=True, fa_version=3))
                except Exception as exc:
                    log(f"  FA3 prefill failed: {exc!r}")
            rows.append(row)
            fa3_ms = row.get("fa3_ms", float("nan"))
            log(f"  ({hq},{h}) T={T:6d}: NSA3 {row['nsa_gated_ms']:8.2f} ms  merged "
                f"{row['nsa_merged_ms']:8.2f}  bounds {row['nsa_bounds_ms']:8.2f} "
                f"(x{fa3_ms / row['nsa_bounds_ms']:.2f})  SDPA {row['sdpa_ms']:8.2f}  "
                f"FA3 {fa3_ms:8.2f}")
            RESULTS["prefill"] = rows
            dump()
            # FLA last: its autotuning compiles for a while, and the row is saved already.
            if fla is not None and hq // h >= 16:
                gates = torch.rand(1, T, hq, device=DEV, dtype=DT)
                try:
                    row["fla_nsa_ms"] = bench(lambda: fla(
                        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), gates, gates, None,
                        block_counts=CFG.select_topk, block_size=CFG.select_block,
                        window_size=0))
                except Exception as exc:
                    log(f"  FLA parallel_nsa failed: {exc!r}")
                log(f"      FLA parallel_nsa (compressed + selected, no window): "
                    f"{row.get('fla_nsa_ms', float('nan')):8.2f} ms")
                dump()
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ decode
def decode(fa3, copy_bw):
    log("== decode (paged, page 64, bf16, D=128, (HQ,H)=(32,8)) ==")
    hq, h = 32, 8
    max_b, max_s = 32, 65536
    b = paged_batch([max_s] * max_b, h, gen_seed=5)
    rows = []
    for S in (8192, 32768, 65536):
        for B in (1, 8, 32):
            seq_lens = torch.full((B,), S, dtype=torch.int32, device=DEV)
            table = b["table"][:B].contiguous()
            q = torch.randn(B, hq, D, device=DEV, dtype=DT)
            qsl = torch.arange(B + 1, dtype=torch.int32, device=DEV)
            out = torch.empty(B, hq, 3, D, device=DEV, dtype=DT)
            out_merged = torch.empty(B, hq, D, device=DEV, dtype=DT)

            plans = {}

            def nsa(gated=True, num_splits=None, cfg=CFG):
                # One plan per (mode, splits, scorer), made outside the timed region as the
                # backend makes one per step.
                key = (gated, num_splits, cfg.selection_score)
                if key not in plans:
                    plans[key] = nsa_triton.make_plan(
                        q, b["key_cache"], b["value_cache"], table, qsl, cfg, gated,
                        max_query_len=1, scan_bound=S, num_splits=num_splits)
                prefix = "bounds_" if cfg.uses_bounds else ""
                return nsa_triton.nsa_paged_attention(
                    q, b["key_cache"], b["value_cache"], b[prefix + "cmp_key"],
                    b[prefix + "cmp_value"], table, qsl, seq_lens, cfg, D ** -0.5,
                    out if gated else out_merged, gated, plans[key])

            def graph_of(fn):
                fn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                return graph
            row = dict(B=B, S=S, HQ=hq, H=h)
            nsa()
            row["nsa_eager_ms"] = bench(nsa)
            graph = graph_of(nsa)
            row["nsa_graph_ms"] = bench(graph.replay)
            # merged mode: what a dense Llama served with the NSA backend runs
            row["nsa_merged_graph_ms"] = bench(graph_of(lambda: nsa(False)).replay)
            # merged mode with the "bounds" scorer: a dense model's default
            row["nsa_bounds_graph_ms"] = bench(graph_of(lambda: nsa(False, cfg=CFG_BOUNDS)).replay)
            if S == 65536 and B == 8:
                row["breakdown"] = kernel_breakdown(graph.replay)
                row["breakdown_merged"] = kernel_breakdown(graph_of(lambda: nsa(False)).replay)
                row["breakdown_bounds"] = kernel_breakdown(
                    graph_of(lambda: nsa(False, cfg=CFG_BOUNDS)).replay)
                # the split count's effect (default: _fill_splits)
                row["merged_graph_ms_by_splits"] = {
                    n: bench(graph_of(lambda: nsa(False, num_splits=n)).replay)
                    for n in (1, 2, 4, 8, 16, 32)}
            counts = reference.decode_read_counts(S, CFG)
            row["table4_tokens"] = counts["total"]
            row["table4_bytes"] = B * h * counts["total"] * 2 * D * 2
            # what the kernels actually read: compressed K twice (two passes), V once
            row["kernel_bytes"] = B * h * 2 * D * (counts["compressed"] * 3 / 2
                                                  + counts["selected"] + counts["window"]) * 2
            row["achieved_GBps"] = row["table4_bytes"] / (row["nsa_graph_ms"] * 1e-3) / 1e9
            row["frac_copy_bw"] = row["achieved_GBps"] * 1e9 / copy_bw
            # "bounds" merged: the kernels read the bounds, the selected blocks and the
            # window tokens outside the selected local blocks (decode_read_counts, merged)
            bounds_tokens = reference.decode_read_counts(S, CFG_BOUNDS)["total"]
            row["bounds_bytes"] = B * h * bounds_tokens * 2 * D * 2
            row["bounds_frac_copy_bw"] = (row["bounds_bytes"] / (row["nsa_bounds_graph_ms"]
                                                                 * 1e-3) / copy_bw)
            if fa3 is not None:
                try:
                    row["fa3_ms"] = bench(lambda: fa3.flash_attn_varlen_func(
                        q, b["key_cache"], b["value_cache"], 1, qsl, S, seqused_k=seq_lens,
                        block_table=table, causal=True, fa_version=3))
                    row["speedup_vs_fa3"] = row["fa3_ms"] / row["nsa_graph_ms"]
                    row["bounds_speedup_vs_fa3"] = row["fa3_ms"] / row["nsa_bounds_graph_ms"]
                    dense_bytes = B * h * S * 2 * D * 2
                    row["fa3_frac_copy_bw"] = dense_bytes / (row["fa3_ms"] * 1e-3) / copy_bw
                except Exception as exc:
                    log(f"  FA3 decode failed: {exc!r}")
            log(f"  B={B:2d} S={S:6d}: NSA graph {row['nsa_graph_ms'] * 1e3:8.1f} us  merged "
                f"{row['nsa_merged_graph_ms'] * 1e3:8.1f} us  bounds "
                f"{row['nsa_bounds_graph_ms'] * 1e3:8.1f} us "
                f"(x{row.get('bounds_speedup_vs_fa3', math.nan):.2f}, "
                f"{row['bounds_frac_copy_bw'] * 100:.0f}% of copy)  eager "
                f"{row['nsa_eager_ms'] * 1e3:8.1f} us  FA3 {row.get('fa3_ms', math.nan) * 1e3:8.1f}"
                f" us  x{row.get('speedup_vs_fa3', math.nan):.2f}  "
                f"{row['achieved_GBps']:.0f} GB/s = {row['frac_copy_bw'] * 100:.0f}% of copy")
            if "breakdown" in row:
                log(f"    kernels: {row['breakdown']}")
                log(f"    merged: {row['breakdown_merged']}")
                log(f"    bounds: {row['breakdown_bounds']}")
                log(f"    merged by num_splits (ms): {row['merged_graph_ms_by_splits']}")
            rows.append(row)
            RESULTS["decode"] = rows
            dump()
    return rows


# ------------------------------------------------------------------ compiled variants
def compiled_variants():
    """Kernels compiled after the engine-start warm-up (`warm_up`) while decode batches
    grow 1..40 requests at mixed contexts, and prefill chunks and mixed batches of varied
    lengths run: each new variant mid-serve would be a multi-second stall, so the count
    must be zero."""
    log("== compiled variants after warm-up: decode 1..40, prefill and mixed batches ==")
    kernels = {name: getattr(module, name)
               for module in STAGES.values()
               for name in dir(module)
               if name.endswith("_kernel") and hasattr(getattr(module, name), "device_caches")}

    def counts():
        return {name: sum(len(cache[0]) for cache in fn.device_caches.values())
                for name, fn in kernels.items()}
    hq, h, capacity = 32, 8, 65536
    contexts = [8192, 777, 65536, 4097, 30000] * 8
    b = paged_batch(contexts, h, gen_seed=9)
    table = torch.zeros(len(contexts), capacity // PAGE, dtype=torch.int32, device=DEV)
    table[:, :b["table"].shape[1]] = b["table"]
    added = {}
    for gated, cfg in MODES:
        prefix = "bounds_" if cfg.uses_bounds else ""
        caches = (b["key_cache"], b["value_cache"], b[prefix + "cmp_key"],
                  b[prefix + "cmp_value"])
        nsa_triton.warm_up(*caches, hq, table.shape[1], cfg, gated)
        start = counts()
        batches = [[1] * n for n in range(1, 41)] + [[2048], [300, 1, 1], [1, 64, 1, 1, 5000],
                                                    [17], [1, 1, 1, 4096]]
        for query_lens in batches:
            num = len(query_lens)
            qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(),
                               dtype=torch.int32, device=DEV)
            q = torch.randn(int(qsl[-1]), hq, D, device=DEV, dtype=DT)
            shape = (q.shape[0], hq, 3, D) if gated else (q.shape[0], hq, D)
            plan = nsa_triton.make_plan(q, caches[0], caches[1], table[:num], qsl, cfg, gated,
                                        max_query_len=max(query_lens), scan_bound=capacity)
            nsa_triton.nsa_paged_attention(
                q, *caches, table[:num], qsl, b["seq_lens"][:num], cfg, D ** -0.5,
                torch.empty(shape, device=DEV, dtype=DT), gated, plan)
        torch.cuda.synchronize()
        added.update({f"{name} {mode_name(gated, cfg)}": n - start[name]
                      for name, n in counts().items() if n - start[name]})
    log(f"  new compiled variants per kernel after warm-up: {added or 'none'}")
    return added


def host_time(profile=False):
    """Host (CPU) time of one layer's eager NSA forward in a mixed batch (the path of every
    step with a prefill chunk): the plan made once per step, then per layer the K/V store,
    compress, score, select and attend launches. Small shapes, so the GPU never holds the
    host back."""
    log("== host time per layer, eager mixed batch (plan made once per step) ==")
    hq, h = 32, 8
    rows = {}
    for gated, cfg in MODES:
        query_lens = [1] * 8 + [64]
        b = paged_batch([2048] * len(query_lens), h, gen_seed=3)
        qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(),
                           dtype=torch.int32, device=DEV)
        q = torch.randn(int(qsl[-1]), hq, D, device=DEV, dtype=DT)
        out = torch.empty((q.shape[0], hq, 3, D) if gated else (q.shape[0], hq, D),
                          device=DEV, dtype=DT)
        prefix = "bounds_" if cfg.uses_bounds else ""
        emit_req, emit_index = b[prefix + "emit_req"][:64], b[prefix + "emit_index"][:64]
        caches = (b["key_cache"], b["value_cache"], b[prefix + "cmp_key"],
                  b[prefix + "cmp_value"])

        # This step's K/V, stored first as vLLM's do_kv_cache_update does (slots of page 0
        # onwards: the data does not matter here).
        key = torch.randn(q.shape[0], h, D, device=DEV, dtype=DT)
        slots = torch.arange(q.shape[0], device=DEV)

        def run_layer(replays, step, plan, q, caches, key, out):
            """One layer as the backend runs it: the K/V store, then the forward; with a
            `step`, through the (kv write, forward) LayerReplays."""
            def kv_write():
                nsa_triton.write_kv(key, key, caches[0], caches[1], slots)

            def forward():
                nsa_triton.compress(*caches, b["table"], emit_req, emit_index, cfg)
                nsa_triton.nsa_paged_attention(q, *caches, b["table"], qsl, b["seq_lens"],
                                               cfg, D ** -0.5, out, gated, plan)
            if step is None:
                kv_write()
                forward()
            else:
                replays[0].run(step, (key, caches[0], caches[1]), kv_write)
                replays[1].run(step, (q, *caches, out), forward)

        replays = (launch_module.LayerReplay(), launch_module.LayerReplay())

        def layer(plan, step=None):
            run_layer(replays, step, plan, q, caches, key, out)
        plan = nsa_triton.make_plan(q, caches[0], caches[1], b["table"], qsl, cfg, gated,
                                    max_query_len=max(query_lens), scan_bound=2048)
        for _ in range(3):
            layer(plan)
        torch.cuda.synchronize()
        calls, layers = 192, 32
        host = {}
        # Each call timed alone on an idle GPU (synchronised before it), so a GPU slower
        # than the host cannot fill the launch queue and stall it. "triton": every launch
        # through Triton's path; "direct": a repeat of the previous layer's launches
        # (launch.py); "replay": a later layer of a step replaying the first (LayerReplay);
        # "step": as the backend runs a step of 32 layers when every step brings new
        # sizes: the memo emptied, the first layer on Triton's path, the first two
        # recorded, the rest replayed (mean per layer). Medians of the others.
        for path in ("triton", "direct", "replay", "step"):
            launch_module.DIRECT = path != "triton"
            times = []
            step = object()
            for call in range(calls):
                if path == "step" and call % layers == 0:
                    launch_module._memo.clear()
                    step = object()
                torch.cuda.synchronize()
                start = time.perf_counter()
                layer(plan, step if path in ("replay", "step") else None)
                times.append(time.perf_counter() - start)
            host[path] = (sorted(times)[calls // 2] if path != "step"
                          else sum(times) / calls) * 1e6
        launch_module.DIRECT = True
        if profile:
            # Where the host time goes: the top functions by own time over the same calls.
            profiler = cProfile.Profile()
            step = object()
            profiler.runcall(lambda: [layer(plan, step) for _ in range(calls)])
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            log("\n".join(line for line in text.getvalue().splitlines()[5:] if line.strip()))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            nsa_triton.make_plan(q, caches[0], caches[1], b["table"], qsl, cfg, gated,
                                 max_query_len=max(query_lens), scan_bound=2048)
        plan_us = (time.perf_counter() - start) / 20 * 1e6
        # Replayed layers compute what their own launches compute: four layers with their
        # own q, caches and output, run plainly and through LayerReplays (layers 3-4
        # replayed), outputs compared bit for bit.
        layer_inputs = [(torch.randn_like(q), tuple(c.clone() for c in caches),
                         torch.randn_like(key)) for _ in range(4)]
        outputs = {}
        for replayed in (False, True):
            own_replays, step = (launch_module.LayerReplay(), launch_module.LayerReplay()), \
                object()
            for i, (q_i, caches_i, key_i) in enumerate(layer_inputs):
                caches_i = tuple(c.clone() for c in caches_i)
                out_i = torch.full_like(out, float("nan"))
                run_layer(own_replays, step if replayed else None, plan, q_i, caches_i, key_i,
                          out_i)
                outputs[replayed, i] = (out_i, *caches_i)
        identical = all(torch.equal(a.nan_to_num(7.0), b_.nan_to_num(7.0))
                        for i in range(4) for a, b_ in zip(outputs[False, i], outputs[True, i]))
        log(f"  replayed layers == their own launches (outputs and caches, bitwise): "
            f"{'OK' if identical else 'FAIL'}")
        mode = mode_name(gated, cfg)
        rows[mode] = dict(replay_identical=identical, layer_host_us=host["step"],
                          layer_host_us_replay=host["replay"],
                          layer_host_us_direct=host["direct"],
                          layer_host_us_triton_path=host["triton"], plan_host_us=plan_us)
        log(f"  {mode}: us per layer (host): {host['step']:.1f} per step of {layers} layers,"
            f" {host['replay']:.1f} replayed, {host['direct']:.1f} direct,"
            f" {host['triton']:.1f} Triton's path;"
            f" plan {plan_us:.1f} us per step")
    return rows


def dump():
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    name = torch.cuda.get_device_name().replace(" ", "_")
    with open(os.path.join(out_dir, f"kernels_{name}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def main():
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    RESULTS["versions"] = dict(torch=torch.__version__, triton=triton.__version__)
    RESULTS["git_commit"] = git_commit()
    RESULTS["config"] = dict(l=CFG.compress_block, d=CFG.compress_stride, lp=CFG.select_block,
                             n=CFG.select_topk, w=CFG.window, D=D, page=PAGE, dtype=str(DT))
    # The log names its commit and date too: it is the record when the JSON goes missing.
    log(f"device {RESULTS['device']}  torch {torch.__version__}  triton {triton.__version__}"
        f"  commit {RESULTS['git_commit']}  {RESULTS['date']}")
    t0 = time.time()
    bw = copy_bandwidth()
    RESULTS["copy_bandwidth_GBps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    parts = sys.argv[1:] or ["correctness", "prefill", "decode"]
    if "correctness" in parts:
        RESULTS["correct"] = correctness()
        dump()
        log(f"[{time.time() - t0:.0f}s]")
    fa3 = load_fa3()
    if "prefill" in parts:
        prefill(fa3, load_fla())
        log(f"[{time.time() - t0:.0f}s]")
    if "tune" in parts:
        tune()
    if "variants" in parts:
        RESULTS["compiled_variants_after_warm_up"] = compiled_variants()
        dump()
    if "host" in parts or "hostprof" in parts:
        RESULTS["host_time"] = host_time(profile="hostprof" in parts)
        dump()
    if "decode" in parts:
        decode(fa3, bw)
        log(f"[{time.time() - t0:.0f}s]")
    dump()


if __name__ == "__main__":
    main()
