"""How many distinct selection blocks do M consecutive queries of one KV head select? The
number that decides issue 15's prefill tiling, measured before any kernel is written.

A query tile of M tokens x G heads (M*G = 64 rows, a full tensor-core tile) that loads the
union of its tokens' selected blocks once reads U blocks per tile, where the per-token
kernel (one program per (token, KV head), G rows padded to 16) reads n per token. For each
source and M this prints the union size U (mean, p50, p90, max) and what it implies per
token and KV head, selected blocks only (the window is contiguous, w + M - 1 keys a tile):
- key blocks loaded: n (per token) vs U / M (union tile);
- tensor-core rows x keys computed: n*l' x 16 rows vs U*l' x 64 rows / M, the useful work
  being n*l' x G.

    python benchmarks/selection_union.py                       # random q/k, like bench_kernels
    python benchmarks/selection_union.py --model models/SmolLM2-135M-Instruct --length 4096

Sources: "random" (unit-normal q/k, (HQ, H) = (32, 8), the bench's data) and, with --model,
every layer of a real dense model on the repo's passkey prompt (post-RoPE q/k from one
dense HF forward), both scorers. Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from vllm_nsa import NSAConfig
from vllm_nsa.kernels import reference
from vllm_nsa.provenance import git_commit


def selections(q: torch.Tensor, k: torch.Tensor, config: NSAConfig, scorer: str
               ) -> torch.Tensor:
    """block_indices [T, H, n] of every position of one sequence (the reference)."""
    num_tokens, dim = k.shape[0], k.shape[-1]
    positions = reference.query_positions(num_tokens, num_tokens, q.device)
    scale = dim ** -0.5
    if scorer == "bounds":
        k_min, k_max = reference.block_bounds(k, config)
        return reference.select_by_bounds(q, k_min, k_max, positions, num_tokens, config,
                                          scale)
    k_cmp, v_cmp = reference.compress(k, k, config)
    lse = reference.score(q, k_cmp, v_cmp, positions, config, scale)[1]
    return reference.select(q, k_cmp, lse, positions, num_tokens, config, scale)


def union_sizes(block_indices: torch.Tensor, tile_tokens: int, skip: int) -> torch.Tensor:
    """Distinct selected blocks per (tile of tile_tokens consecutive queries, KV head),
    for the tiles after the first `skip` tokens (where every block is selected anyway)."""
    idx = block_indices[skip:]
    tiles = idx.shape[0] // tile_tokens
    idx = idx[:tiles * tile_tokens].unflatten(0, (tiles, tile_tokens))      # [t, M, H, n]
    idx = idx.permute(0, 2, 1, 3).flatten(2)                                 # [t, H, M*n]
    ordered = torch.sort(idx, dim=-1).values
    fresh = torch.ones_like(ordered, dtype=torch.bool)
    fresh[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    return (fresh & (ordered >= 0)).sum(-1).flatten().float()


def summarize(sizes: torch.Tensor, tile_tokens: int, group: int, config: NSAConfig) -> dict:
    n, block = config.select_topk, config.select_block
    rows_per_token = max(16, group)                 # the per-token kernel pads G to 16
    mean = sizes.mean().item()
    return {
        "tile_tokens": tile_tokens, "tiles": sizes.numel(), "union_mean": round(mean, 2),
        "union_p50": sizes.quantile(0.5).item(), "union_p90": sizes.quantile(0.9).item(),
        "union_max": sizes.max().item(),
        "blocks_loaded_per_token": {"per_token_kernel": n,
                                    "union_tile": round(mean / tile_tokens, 3)},
        "mma_row_keys_per_token": {"per_token_kernel": n * block * rows_per_token,
                                   "union_tile": round(mean * block * 64 / tile_tokens),
                                   "useful": n * block * group},
    }


def random_source(length: int, heads: int, kv_heads: int, dim: int):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(length, heads, dim, generator=gen)
    k = torch.randn(length, kv_heads, dim, generator=gen)
    yield "random", q, k


def model_source(model_dir: str, length: int):
    """(label, q [T, HQ, D], k [T, H, D]) of every layer, post-RoPE, one dense forward of
    the passkey prompt as the selection probe builds it."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo's evals/
    from evals.selection_probe import capture_last_queries, load_model, prompt_encoding
    from evals.tasks.nsa_longctx import generate_docs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    doc = generate_docs(tokenizer, "passkey", length, depths=[0.5], samples_per_depth=1)[0]
    ids = prompt_encoding(tokenizer, doc)[1]["input_ids"]
    captured = capture_last_queries(load_model(model_dir, "sdpa"), ids, all_queries=True)
    for layer, (q, k, _) in enumerate(captured):
        yield f"layer {layer}", q, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF checkpoint (else random q/k)")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--scorers", nargs="+", default=["bounds", "compressed"])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    config = NSAConfig()
    source = (model_source(args.model, args.length) if args.model
              else random_source(args.length, 32, 8, 128))
    skip = config.select_topk * config.select_block     # before it every block is selected
    per_scorer: dict[str, list[torch.Tensor]] = {s: [] for s in args.scorers}
    group = None
    for label, q, k in source:
        group = q.shape[1] // k.shape[1]
        for scorer in args.scorers:
            per_scorer[scorer].append(selections(q, k, config, scorer))
        print(f"{label}: selected", flush=True)
    tile_tokens = [max(1, 64 // g) for g in (group,)] + [8, 32]
    results = {"git_commit": git_commit(), "source": args.model or "random (32, 8)",
               "length": args.length, "group": group, "config": config.describe(),
               "by_scorer": {}}
    per_token_work = config.select_topk * config.select_block * max(16, group)
    print(f"\n{'scorer':<11} {'M':>3} {'U mean':>7} {'p50':>5} {'p90':>5} {'max':>5} "
          f"{'blocks/token':>13} {'MMA row-keys/token':>19} (per-token kernel: "
          f"{config.select_topk} blocks, {per_token_work})")
    for scorer, indices in per_scorer.items():
        rows = []
        for m in sorted(set(tile_tokens)):
            sizes = torch.cat([union_sizes(idx, m, skip) for idx in indices])
            row = summarize(sizes, m, group, config)
            rows.append(row)
            print(f"{scorer:<11} {m:>3} {row['union_mean']:>7.1f} {row['union_p50']:>5.0f} "
                  f"{row['union_p90']:>5.0f} {row['union_max']:>5.0f} "
                  f"{row['blocks_loaded_per_token']['union_tile']:>13.2f} "
                  f"{row['mma_row_keys_per_token']['union_tile']:>19}")
        results["by_scorer"][scorer] = rows
    os.makedirs(args.out, exist_ok=True)
    name = "random" if not args.model else os.path.basename(args.model.rstrip("/"))
    path = os.path.join(args.out, f"selection_union_{name}_{args.length}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
