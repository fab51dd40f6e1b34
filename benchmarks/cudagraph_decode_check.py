"""GPU check: NSA decode replayed from full CUDA graphs equals eager NSA decode, token for token.

Run on the GPU machine with vLLM installed:  python benchmarks/cudagraph_decode_check.py
Optional: --out DIR (JSON written there; default $OUT or benchmarks/results).

Two tiny random float32 checkpoints (vllm_nsa.tiny, wide init so greedy has clear maxima):
a dense Llama served with attention_backend="NSA" (merged mode; small NSA parameters so the
prompts are far beyond window + top-n blocks) and an NSA checkpoint (gated branches). Each
model generates the same greedy continuations of six prompts (37 to 3,100 tokens, ragged
max_tokens so the decode batch shrinks 6 -> 1 and is padded to the graph sizes 1/2/4/8) in:
- PIECEWISE: torch.compile's pieces replayed as graphs, attention eager between them (the
  reference: the eager NSA decode path);
- FULL_AND_PIECEWISE (vLLM's default): each decode step replays one full graph that holds
  the NSA kernels and the compression emission;
- enforce_eager (no torch.compile, no graphs), for information;
- enforce_eager with VLLM_NSA_DIRECT_LAUNCH=0: every launch through Triton's own path, no
  layer replay (kernels/triton/launch.py), the reference of the eager run's replayed layers.
Each engine runs in its own process, in-process engine core, counting CUDA-graph replays,
so the output proves which mode ran. Passes when FULL_AND_PIECEWISE tokens equal PIECEWISE
tokens and the eager tokens equal those without replay, for both models.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from vllm_nsa.engine_runner import count_graph_replays, nsa_args, run_isolated, start_engine
from vllm_nsa.provenance import device_name, git_commit, versions

PROMPT_LENGTHS = (37, 300, 777, 1500, 2200, 3100)
MAX_TOKENS = (40, 33, 25, 18, 40, 9)
CAPTURE_SIZES = [1, 2, 4, 8]
LLAMA_NSA = {"compress_block": 32, "compress_stride": 16, "select_block": 64,
             "select_topk": 4, "window": 32}
MODES = ("PIECEWISE", "FULL_AND_PIECEWISE", "EAGER", "EAGER_NO_REPLAY")


def engine_job(model_dir: str, kind: str, mode: str) -> dict:
    """One engine in this process: greedy tokens, sampled logprobs, graph replay counts."""
    import random

    from vllm import SamplingParams

    replays = count_graph_replays()
    # All eight engines share the GPU at once: each takes a small fixed KV cache, so no
    # engine's memory profiling sees another's allocations.
    kwargs = dict(model=model_dir, dtype="float32", max_model_len=4096, block_size=64,
                  max_num_seqs=8, seed=0, gpu_memory_utilization=0.1,
                  kv_cache_memory_bytes=512 << 20,
                  **(nsa_args(LLAMA_NSA) if kind == "llama" else {"attention_backend": "NSA"}))
    if mode.startswith("EAGER"):
        kwargs["enforce_eager"] = True
    else:
        kwargs["compilation_config"] = {"cudagraph_mode": mode,
                                        "cudagraph_capture_sizes": CAPTURE_SIZES}
    llm = start_engine(**kwargs)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(n)]}
               for n in PROMPT_LENGTHS]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=1)
              for m in MAX_TOKENS]
    before = dict(replays)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, toks)]
                for o, toks in zip(outputs, tokens)]
    return {"tokens": tokens, "logprobs": logprobs,
            "graph_replays": replays["graph"] - before["graph"],
            "full_graph_replays": replays["full"] - before["full"],
            "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)}


def build_models(root: str) -> dict[str, str]:
    from vllm_nsa.tiny import build_tiny_llama, build_tiny_nsa

    dirs = {"llama": os.path.join(root, "llama"), "nsa": os.path.join(root, "nsa")}
    build_tiny_llama(dirs["llama"], num_heads=8, num_kv_heads=2, head_dim=64,
                     hidden_size=256, max_position_embeddings=4096)
    build_tiny_nsa(dirs["nsa"], num_heads=4, num_kv_heads=1, head_dim=64, hidden_size=256,
                   block_size=16, block_counts=4, window_size=64,
                   max_position_embeddings=4096)
    return dirs


def compare(reference: dict, candidate: dict) -> dict:
    """Token equality (first mismatch) and the largest sampled-logprob difference over the
    common prefix."""
    first_mismatch, max_diff = None, 0.0
    for r, (a, b) in enumerate(zip(reference["tokens"], candidate["tokens"])):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                first_mismatch = first_mismatch or (r, i)
                break
            max_diff = max(max_diff, abs(reference["logprobs"][r][i] -
                                         candidate["logprobs"][r][i]))
    equal = reference["tokens"] == candidate["tokens"]
    return {"tokens_equal": equal, "first_mismatch": first_mismatch,
            "max_abs_logprob_diff": max_diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--parallel", type=int, default=len(MODES) * 2,
                        help="engines at once (default: all eight)")
    parser.add_argument("--timeout", type=float, default=480, help="seconds per engine")
    parser.add_argument("--worker", nargs=4, metavar=("MODEL_DIR", "KIND", "MODE", "JSON"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_dir, kind, mode, path = args.worker
        with open(path, "w") as f:
            json.dump(engine_job(model_dir, kind, mode), f)
        return 0

    os.makedirs(args.out, exist_ok=True)
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    results, ok = {}, True
    with tempfile.TemporaryDirectory() as root:
        jobs = [(kind, model_dir, mode) for kind, model_dir in build_models(root).items()
                for mode in MODES]

        def run(job):
            kind, model_dir, mode = job
            path = os.path.join(root, f"{kind}_{mode}.json")
            error = run_isolated([sys.executable, __file__, "--worker", model_dir, kind, mode,
                                  path], timeout=args.timeout,
                                 env=env | ({"VLLM_NSA_DIRECT_LAUNCH": "0"}
                                            if mode == "EAGER_NO_REPLAY" else {}),
                                 log_path=os.path.join(args.out, f"cudagraph_{kind}_{mode}.log"))
            if error:
                print(f"{kind} {mode}: engine failed ({error})", flush=True)
                return None
            with open(path) as f:
                return json.load(f)
        # One process per engine, all at once (each engine start is mostly compilation).
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            done = dict(zip(jobs, pool.map(run, jobs)))
        for kind, _, mode in jobs:
            ok &= done[kind, _, mode] is not None
            if done[kind, _, mode] is not None:
                results.setdefault(kind, {})[mode] = done[kind, _, mode]
        for kind, runs in results.items():
            if "PIECEWISE" not in runs:
                ok = False
                continue
            for mode in ("FULL_AND_PIECEWISE", "EAGER", "EAGER_NO_REPLAY"):
                if mode in runs:
                    runs[mode]["vs_piecewise"] = compare(runs["PIECEWISE"], runs[mode])
            full = runs.get("FULL_AND_PIECEWISE")
            ok &= bool(full and full["vs_piecewise"]["tokens_equal"]
                       and full["full_graph_replays"] > 0)
            if "EAGER" in runs and "EAGER_NO_REPLAY" in runs:
                runs["EAGER"]["vs_no_replay"] = compare(runs["EAGER_NO_REPLAY"], runs["EAGER"])
            ok &= bool(runs.get("EAGER", {}).get("vs_no_replay", {}).get("tokens_equal"))
    summary = {"device": device_name(), "date": datetime.date.today().isoformat(),
               "git_commit": git_commit(), "versions": versions(), "passed": ok,
               "results": results}
    name = f"cudagraph_decode_check_{device_name().replace(' ', '_')}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{'model':<6} {'mode':<19} {'graph replays':>13} {'full replays':>12} "
          f"{'tokens = PIECEWISE':>18} {'max |dlogprob|':>14} {'= no replay':>11} "
          f"{'max |dlogprob|':>14}")
    for kind, runs in results.items():
        for mode, run in runs.items():
            cmp_ = run.get("vs_piecewise", {})
            own = run.get("vs_no_replay", {})
            print(f"{kind:<6} {mode:<19} {run['graph_replays']:>13} "
                  f"{run['full_graph_replays']:>12} "
                  f"{str(cmp_.get('tokens_equal', '(ref)')):>18} "
                  f"{cmp_.get('max_abs_logprob_diff', 0.0):>14.2e} "
                  f"{str(own.get('tokens_equal', '')):>11} "
                  f"{own.get('max_abs_logprob_diff', 0.0):>14.2e}")
    print("PASS" if ok else "FAIL", "(full-graph decode replay == eager decode, token for token;"
          " replayed eager layers == their own launches)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
