"""Tiny seeded checkpoints built offline, for tests and the README's main job.

    python -m vllm_nsa.tiny nsa DIR [--num-heads 4 --num-kv-heads 1 ...]
    python -m vllm_nsa.tiny llama DIR

Every checkpoint gets the same byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>,
no merges, a minimal chat template), built with the `tokenizers` library: nothing is
downloaded. Weights are random (seeded) in float32; the tiny models are for exactness
tests, not for quality. Their initialiser is wider than FLA's 0.02 so the logits have clear
maxima (greedy comparisons then do not hinge on near-ties) and attention is not uniform
(so the selection and window branches matter).
"""
from __future__ import annotations

import argparse
import os

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TINY_INIT_STD = 0.2


def build_tokenizer(out_dir: str):
    """A byte-level tokenizer (any text encodes; ids 0..255 are bytes) saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in (BOS, EOS, PAD):
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes-to-unicode map, so token id == byte value."""
    code = ord(char)
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    if code in printable:
        return code
    missing = [b for b in range(256) if b not in printable]
    return missing[code - 256]


def build_tiny_nsa(out_dir: str, *, num_heads: int = 4, num_kv_heads: int = 1,
                   head_dim: int = 32, hidden_size: int = 64, num_layers: int = 2,
                   block_size: int = 16, block_counts: int = 3, window_size: int = 32,
                   max_position_embeddings: int = 2048, seed: int = 0):
    """A random FLA-format NSA checkpoint (float32) + tokenizer in out_dir; returns the model."""
    from vllm_nsa.hf_nsa import NSAForCausalLM, NSAModelConfig

    tokenizer = build_tokenizer(out_dir)
    config = NSAModelConfig(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        block_counts=block_counts, window_size=window_size,
        max_position_embeddings=max_position_embeddings, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=TINY_INIT_STD,
        dtype="float32", architectures=["NSAForCausalLM"])
    torch.manual_seed(seed)
    model = NSAForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    return model


def build_tiny_llama(out_dir: str, *, num_heads: int = 4, num_kv_heads: int = 2,
                     head_dim: int = 32, hidden_size: int = 64, num_layers: int = 2,
                     max_position_embeddings: int = 2048, seed: int = 0):
    """A random dense LlamaForCausalLM (float32) + tokenizer in out_dir; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(out_dir)
    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=TINY_INIT_STD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_nsa.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("nsa", "llama"))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None,
                        help="default: 1 for nsa (G = num_heads), 2 for llama")
    parser.add_argument("--block-size", type=int, default=16, help="nsa only")
    parser.add_argument("--block-counts", type=int, default=3, help="nsa only")
    parser.add_argument("--window-size", type=int, default=32, help="nsa only")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.kind == "nsa":
        build_tiny_nsa(args.out_dir, num_heads=args.num_heads,
                       num_kv_heads=args.num_kv_heads or 1, block_size=args.block_size,
                       block_counts=args.block_counts, window_size=args.window_size,
                       seed=args.seed)
    else:
        build_tiny_llama(args.out_dir, num_heads=args.num_heads,
                         num_kv_heads=args.num_kv_heads or 2, seed=args.seed)
    print(f"wrote a tiny {args.kind} checkpoint to {args.out_dir}")


if __name__ == "__main__":
    main()
