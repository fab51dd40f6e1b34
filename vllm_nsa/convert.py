"""Llama checkpoint directory -> FLA-format NSA checkpoint directory.

    python -m vllm_nsa.convert SRC DST [--block-size 64] [--block-counts 16] [--window-size 512]

The dense weights are copied under FLA's names (embed_tokens -> embeddings, self_attn ->
attn, input_layernorm -> attn_norm, post_attention_layernorm -> mlp_norm); each layer gets a
zero `g_proj`, so every branch gate is sigmoid(0) = 0.5; config.json becomes FLA's `nsa`
config with the NSA fields; tokenizer and other files are copied unchanged.

The result is an experiment and test artefact, NOT a good model: the dense model never
learned to spread its attention over three gated branches (the gates sum to 1.5, and the
compressed branch is new to it). It needs NSA training (continued pre-training with FLA /
flame) before its outputs are worth anything. Serve a dense model *without* conversion with
`--attention-backend NSA` (training-free, merged mode) instead if you want usable output now.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIPPED_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
SHARD_BYTES = 4 << 30
# Llama parameter-name fragments -> FLA's
RENAMES = (
    ("model.embed_tokens.", "model.embeddings."),
    (".self_attn.", ".attn."),
    (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".mlp_norm."),
)


class ConversionError(ValueError):
    pass


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(
            f"rope type {rope_type!r} cannot be expressed in FLA's NSA config (plain RoPE only)")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def nsa_config_from_llama(config: dict, block_size: int, block_counts: int,
                          window_size: int) -> dict:
    """FLA `nsa` config.json fields for a Llama config.json (raises on what FLA cannot express)."""
    if config.get("model_type") != "llama":
        raise ConversionError(f"expected a Llama checkpoint (model_type 'llama'), "
                              f"got model_type={config.get('model_type')!r}")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConversionError(f"hidden_act={config['hidden_act']!r}: FLA's NSA MLP is SwiGLU")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConversionError("attention_bias / mlp_bias: FLA's NSA has no o_proj or MLP biases")
    heads = config["num_attention_heads"]
    return {
        "model_type": "nsa",
        "architectures": ["NSAForCausalLM"],
        "hidden_size": config["hidden_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "qkv_bias": False,
        "block_size": block_size,
        "block_counts": block_counts,
        "window_size": window_size,
        "rope_theta": _rope_theta(config),
        "max_position_embeddings": config["max_position_embeddings"],
        "intermediate_size": config["intermediate_size"],
        "hidden_act": "swish",
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "vocab_size": config["vocab_size"],
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "initializer_range": config.get("initializer_range", 0.02),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
    }


def fla_name(llama_name: str) -> str:
    for old, new in RENAMES:
        llama_name = llama_name.replace(old, new)
    return llama_name


def _read_llama_weights(src: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{src} holds no .safetensors weights")
    weights = {}
    for file in files:
        weights.update(load_file(os.path.join(src, file)))
    return weights


def _write_shards(weights: dict[str, torch.Tensor], dst: str) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(dst, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def convert(src: str, dst: str, block_size: int = 64, block_counts: int = 16,
            window_size: int = 512) -> dict:
    """Write the NSA checkpoint to dst; returns its config dict."""
    from vllm_nsa.config import NSAConfig

    with open(os.path.join(src, "config.json")) as f:
        llama_config = json.load(f)
    config = nsa_config_from_llama(llama_config, block_size, block_counts, window_size)
    NSAConfig.from_fla(block_size, block_counts, window_size)  # reject invalid NSA params early
    weights = {}
    for name, tensor in _read_llama_weights(src).items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        weights[fla_name(name)] = tensor
    hidden = config["hidden_size"]
    embeddings = weights["model.embeddings.weight"]
    for layer in range(config["num_hidden_layers"]):
        if f"model.layers.{layer}.attn.q_proj.weight" not in weights:
            raise ConversionError(f"{src}: layer {layer} has no self_attn.q_proj weight")
        weights[f"model.layers.{layer}.attn.g_proj.weight"] = torch.zeros(
            config["num_heads"] * 3, hidden, dtype=embeddings.dtype)
    os.makedirs(dst, exist_ok=True)
    for file in os.listdir(src):
        path = os.path.join(src, file)
        if (os.path.isfile(path) and file not in SKIPPED_FILES
                and not file.endswith(WEIGHT_FILE_SUFFIXES)):
            shutil.copy2(path, os.path.join(dst, file))
    _write_shards(weights, dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_nsa.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Llama checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="output directory for the FLA-format NSA checkpoint")
    parser.add_argument("--block-size", type=int, default=64,
                        help="FLA block_size: compression block, stride and selection block")
    parser.add_argument("--block-counts", type=int, default=16,
                        help="selected blocks per query (forced ones included)")
    parser.add_argument("--window-size", type=int, default=512,
                        help="sliding window in tokens (0 = no window branch)")
    args = parser.parse_args(argv)
    config = convert(args.src, args.dst, args.block_size, args.block_counts, args.window_size)
    print(f"wrote an NSA checkpoint ({config['num_hidden_layers']} layers, "
          f"block_size={args.block_size}, block_counts={args.block_counts}, "
          f"window_size={args.window_size}) to {args.dst}; g_proj is zero (gates 0.5): it "
          f"needs NSA training before it is a good model")


if __name__ == "__main__":
    main()
