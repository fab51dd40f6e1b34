"""Does training-free NSA select the needle? For generated docs, run the model densely
(HF transformers), take every layer's post-RoPE query at the last prompt position (the one
that produces the first answer token) and its keys, and ask the NSA reference which
selection blocks it picks there, for each selection scorer: is the needle's block among
them, per layer and KV head? With --generate, also let the model answer with NSA attention
(the reference, every layer, prefill and greedy decode) and check the answer.

    python -m evals.selection_probe --model models/SmolLM2-135M-Instruct --task passkey \\
        --length 4096 --depths 0.1 0.25 0.5 0.75 [--scorers compressed bounds] \\
        [--nsa-config '{"select_topk": 32}'] [--generate]

Dense hidden states stand in for NSA's own (which differ once a layer misses), so the
selection count measures how well a scorer ranks the needle's block, not the full run;
--generate measures the full run (slow on a CPU: a 4k prompt takes minutes per scorer).
"""
from __future__ import annotations

import argparse
import json

import torch


def load_model(model_dir: str, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation=attn_implementation)


def prompt_encoding(tokenizer, doc: dict):
    """(text, encoding with offsets) of a doc's prompt as lm-eval builds it with
    --apply_chat_template and gen_prefix."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": doc["input"]}],
                                         tokenize=False, add_generation_prompt=True)
    text += doc["gen_prefix"]
    return text, tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                           return_tensors="pt")


def capture_last_queries(model, ids, all_queries: bool = False):
    """[(q_last [HQ, D], k [T, H, D], v [T, H, D]) per layer] of one dense forward
    (all_queries: q [T, HQ, D] of every position instead of the last)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        # query [B, HQ, T, D], key/value [B, H, T, D] after RoPE.
        queries = query[0].transpose(0, 1) if all_queries else query[0, :, -1]
        captured.append((queries.float(), key[0].transpose(0, 1).float(),
                         value[0].transpose(0, 1).float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("nsa_probe_capture", capture)
    model.set_attn_implementation("nsa_probe_capture")
    with torch.no_grad():
        model(ids)
    return captured


def generate_with_nsa(model, ids, config, max_new_tokens: int = 12) -> list[int]:
    """Greedy answer tokens with every attention layer replaced by the NSA reference in
    merged mode (the query rows are the last positions of the cached keys)."""
    from transformers import AttentionInterface

    from vllm_nsa.kernels.reference import nsa_forward

    def nsa(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q = query[0].transpose(0, 1)                     # [Q, HQ, D]
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
        out, _ = nsa_forward(q.float(), k.float(), v.float(), config, gated=False,
                             scale=scaling)
        return out.to(query.dtype)[None], None           # [1, Q, HQ, D]

    AttentionInterface.register("nsa_probe_reference", nsa)
    model.set_attn_implementation("nsa_probe_reference")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def attention_recall(q_last, k, block_indices, config) -> torch.Tensor:
    """Per query head, the share of its dense attention probability at the last position
    that falls on NSA's keys there (selected blocks ∪ window): [HQ]."""
    num_tokens, num_kv_heads, dim = k.shape
    group = q_last.shape[0] // num_kv_heads
    probs = torch.softmax(torch.einsum("hd,thd->ht", q_last,
                                       k.repeat_interleave(group, dim=1)) * dim ** -0.5, -1)
    positions = torch.arange(num_tokens)
    kept = positions.view(1, -1) > num_tokens - 1 - config.window          # [1, T]
    blocks = positions // config.select_block
    chosen = (blocks.view(1, 1, -1) == block_indices.unsqueeze(-1)).any(dim=1)  # [H, T]
    kept = kept | chosen.repeat_interleave(group, dim=0)
    return (probs * kept).sum(dim=-1)


def main() -> None:
    from transformers import AutoTokenizer

    from evals.tasks.nsa_longctx import generate_docs
    from vllm_nsa import NSAConfig
    from vllm_nsa.config import SELECTION_SCORES
    from vllm_nsa.kernels.reference import nsa_forward

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", choices=("passkey", "niah"), default="passkey")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depths", nargs="+", type=float, default=[0.25])
    parser.add_argument("--scorers", nargs="+", choices=SELECTION_SCORES,
                        default=list(SELECTION_SCORES))
    parser.add_argument("--nsa-config", default="{}",
                        help="NSA parameters as JSON (selection_score comes from --scorers)")
    parser.add_argument("--generate", action="store_true",
                        help="also answer with NSA attention (reference) and check it")
    args = parser.parse_args()
    base = json.loads(args.nsa_config)
    configs = {name: NSAConfig.from_dict(base | {"selection_score": name})
               for name in args.scorers}

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, "sdpa")
    results = []
    for depth in args.depths:
        doc = generate_docs(tokenizer, args.task, args.length, depths=(depth,),
                            samples_per_depth=1)[0]
        text, encoded = prompt_encoding(tokenizer, doc)
        ids = encoded["input_ids"]
        captured = capture_last_queries(model, ids)
        answer_start = text.index(doc["answer"])
        answer_tokens = [i for i, (a, b) in enumerate(encoded["offset_mapping"][0].tolist())
                         if a < answer_start + len(doc["answer"]) and b > answer_start]
        num_tokens = ids.shape[1]
        for name, config in configs.items():
            needle_blocks = sorted({t // config.select_block for t in answer_tokens})
            hits, recalls = [], []
            for q_last, k, v in captured:
                _, block_indices = nsa_forward(q_last[None], k, v, config, gated=False)
                hits.append([all(b in set(row.tolist()) for b in needle_blocks)
                             for row in block_indices[0]])
                recalls.append(attention_recall(q_last, k, block_indices[0], config))
            total, pairs = sum(map(sum, hits)), len(hits) * len(hits[0])
            recall = torch.stack(recalls)                           # [layers, HQ]
            row = dict(task=args.task, length=args.length, depth=depth, scorer=name,
                       prompt_tokens=num_tokens, needle_blocks=needle_blocks,
                       selected=total, pairs=pairs, recall_mean=float(recall.mean()),
                       recall_min=float(recall.min()))
            line = (f"{args.task} {args.length} depth {depth:.0%} ({num_tokens} tokens, "
                    f"needle blocks {needle_blocks}) {name}: needle block selected in "
                    f"{total} of {pairs} (layer, KV head) pairs; dense attention mass "
                    f"kept: mean {recall.mean():.3f}, min {recall.min():.3f}")
            if args.generate:
                answer = tokenizer.decode(generate_with_nsa(model, ids, config))
                model.set_attn_implementation("sdpa")
                row |= dict(answer=answer, retrieved=doc["answer"] in answer)
                line += f"; answer {answer.strip()!r}: " + (
                    "retrieved" if row["retrieved"] else f"MISSED ({doc['answer']})")
            print(line, flush=True)
            print("  per layer: " + " ".join(str(sum(h)) for h in hits), flush=True)
            results.append(row)
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
