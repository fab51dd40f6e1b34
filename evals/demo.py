"""The README's main job: SmolLM2-135M-Instruct served by vLLM with attention_backend="NSA"
answers a chat question and retrieves a passkey from a ~4k-token prompt; prints the NSA
parameters in force (the selection scorer among them), the answers and NSA's decode read
counters (`make demo` prepares the model first).

    python -m evals.demo --model models/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

from vllm_nsa import read_stats
from vllm_nsa.config import NSAConfig
from vllm_nsa.engine_runner import SLOW_STEP_ENV, engine_kwargs, nsa_args, start_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--nsa-config", default="{}",
                        help="NSA parameters as JSON (default: a dense model's defaults)")
    args = parser.parse_args()
    requested = NSAConfig.for_dense_model(json.loads(args.nsa_config))

    stats_path = Path(tempfile.mkdtemp(prefix="nsa-demo-")) / "decode_stats.jsonl"
    os.environ[read_stats.STATS_FILE_ENV] = str(stats_path)  # before the engine starts
    for name, value in SLOW_STEP_ENV.items():
        os.environ.setdefault(name, value)

    from transformers import AutoTokenizer

    from vllm import SamplingParams

    from evals.tasks.nsa_longctx import generate_docs

    passkey = generate_docs(AutoTokenizer.from_pretrained(args.model), "passkey", 4096,
                            depths=(0.5,), samples_per_depth=1)[0]
    llm = start_engine(**engine_kwargs(args.model, max_model_len=4096,
                                       **nsa_args(json.loads(args.nsa_config))))
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    prompts = [
        ("chat", "What is the capital of France?", "", None),
        (f"passkey ({passkey['num_tokens']} tokens, needle at depth 50%)",
         passkey["input"], passkey["gen_prefix"], passkey["answer"]),
    ]
    for label, question, prefix, expected in prompts:
        stats_path.write_text("")
        messages = [{"role": "user", "content": question}]
        if prefix:  # the answer's lead-in, as the lm-eval tasks use it
            messages.append({"role": "assistant", "content": prefix})
        output = llm.chat(messages, greedy, add_generation_prompt=not prefix,
                          continue_final_message=bool(prefix), use_tqdm=False)[0]
        answer = output.outputs[0].text.strip()
        print(f"\n== {label}\nprompt tokens: {len(output.prompt_token_ids)}")
        print(f"answer: {prefix + ' ' if prefix else ''}{answer}")
        if expected is not None:
            print(f"expected passkey {expected}: "
                  f"{'retrieved' if expected in answer else 'MISSED'}")
        lines, _ = read_stats.read_lines(stats_path)
        stats = read_stats.summarize(lines)
        if stats is None:
            print("NSA read counters: none written (is the NSA backend active?)")
            continue
        in_force = read_stats.config_in_force(lines)
        print("NSA parameters in force (backend): "
              + NSAConfig.from_dict(in_force).describe()
              + ("" if in_force == dataclasses.asdict(requested) else
                 f" (requested: {requested.describe()})"))
        print(f"NSA decode read counters over {stats['steps']} counter lines (raw tokens "
              f"per KV head): compressed {stats['compressed']}, bounds {stats['bounds']}, "
              f"selected {stats['selected']}, window {stats['window']}, total "
              f"{stats['total']} vs dense {stats['dense']} -> "
              f"{stats['total'] / stats['dense']:.2f} of dense")


if __name__ == "__main__":
    main()
