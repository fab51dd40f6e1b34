"""Why does training-free NSA miss a needle? For one generated doc, run the model densely
(HF transformers), take every layer's post-RoPE query at the last prompt position (the one
that produces the first answer token) and its keys, and ask the NSA reference which
selection blocks it picks there: is the needle's block among them, per layer and KV head?

    python -m evals.selection_probe --model models/SmolLM2-135M-Instruct --task passkey \\
        --length 4096 --depth 0.25 [--nsa-config '{"select_topk": 32}']

Dense hidden states stand in for NSA's own (which differ once a layer misses), so this
measures how well mean-pooled compressed keys rank the needle's block, not the full run.
"""
from __future__ import annotations

import argparse
import json

import torch


def capture_last_queries(model_dir: str, text: str):
    """[(q_last [HQ, D], k [T, H, D], v [T, H, D]) per layer] and the prompt token ids."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        # query [B, HQ, T, D], key/value [B, H, T, D] after RoPE.
        captured.append((query[0, :, -1].float(), key[0].transpose(0, 1).float(),
                         value[0].transpose(0, 1).float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("nsa_probe_capture", capture)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="nsa_probe_capture")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids)
    return captured, ids[0], tokenizer


def main() -> None:
    from transformers import AutoTokenizer

    from evals.tasks.nsa_longctx import generate_docs
    from vllm_nsa import NSAConfig
    from vllm_nsa.kernels.reference import nsa_forward

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", choices=("passkey", "niah"), default="passkey")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depth", type=float, default=0.25)
    parser.add_argument("--nsa-config", default="{}")
    args = parser.parse_args()
    config = NSAConfig.from_dict(json.loads(args.nsa_config))

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    doc = generate_docs(tokenizer, args.task, args.length, depths=(args.depth,),
                        samples_per_depth=1)[0]
    # The prompt as lm-eval builds it with --apply_chat_template and gen_prefix.
    text = tokenizer.apply_chat_template([{"role": "user", "content": doc["input"]}],
                                         tokenize=False, add_generation_prompt=True)
    text += doc["gen_prefix"]
    captured, ids, tokenizer = capture_last_queries(args.model, text)
    answer_start = text.index(doc["answer"])
    offsets = tokenizer(text, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    answer_tokens = [i for i, (a, b) in enumerate(offsets)
                     if a < answer_start + len(doc["answer"]) and b > answer_start]
    needle_blocks = sorted({t // config.select_block for t in answer_tokens})
    num_tokens = len(ids)
    hits = []
    for q_last, k, v in captured:
        _, block_indices = nsa_forward(q_last[None], k, v, config, gated=False)
        chosen = block_indices[0]  # [H, n]
        hits.append([all(b in set(row.tolist()) for b in needle_blocks) for row in chosen])
    in_window = min(answer_tokens) > num_tokens - 1 - config.window
    total = sum(map(sum, hits))
    print(f"{args.task} {args.length} depth {args.depth:.0%}: {num_tokens} prompt tokens, "
          f"answer tokens {answer_tokens[0]}..{answer_tokens[-1]} (blocks {needle_blocks}, "
          f"{'inside' if in_window else 'outside'} the {config.window}-token window)")
    print(f"needle block selected at the answer position in {total} of "
          f"{len(hits) * len(hits[0])} (layer, KV head) pairs; per layer: "
          + " ".join(str(sum(h)) for h in hits))


if __name__ == "__main__":
    main()
