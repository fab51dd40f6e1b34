"""`python -m vllm_nsa.convert`: Llama checkpoint -> FLA-format NSA checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_nsa.convert import ConversionError, convert, main
from vllm_nsa.hf_nsa import NSAForCausalLM
from vllm_nsa.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(str(path), seed=1)
    return path


@pytest.fixture(scope="module")
def converted(llama_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("converted")
    main([str(llama_dir), str(dst), "--block-size", "16", "--block-counts", "4",
          "--window-size", "32"])
    return dst


def test_weights_renamed_copied_and_gates_zero(llama_dir, converted):
    source = load_file(str(llama_dir / "model.safetensors"))
    target = load_file(str(converted / "model.safetensors"))
    assert torch.equal(target["model.embeddings.weight"], source["model.embed_tokens.weight"])
    for layer in range(2):
        src, dst = f"model.layers.{layer}.", f"model.layers.{layer}."
        for proj in ("q", "k", "v", "o"):
            assert torch.equal(target[f"{dst}attn.{proj}_proj.weight"],
                               source[f"{src}self_attn.{proj}_proj.weight"])
        for proj in ("gate", "up", "down"):
            assert torch.equal(target[f"{dst}mlp.{proj}_proj.weight"],
                               source[f"{src}mlp.{proj}_proj.weight"])
        assert torch.equal(target[f"{dst}attn_norm.weight"], source[f"{src}input_layernorm.weight"])
        assert torch.equal(target[f"{dst}mlp_norm.weight"],
                           source[f"{src}post_attention_layernorm.weight"])
        assert target[f"{dst}attn.g_proj.weight"].shape == (4 * 3, 64)
        assert not target[f"{dst}attn.g_proj.weight"].any()
    assert len(target) == len(source) + 2  # one g_proj per layer, nothing lost


def test_config_and_tokenizer(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "nsa" and config["architectures"] == ["NSAForCausalLM"]
    assert (config["num_heads"], config["num_kv_heads"], config["head_dim"]) == (4, 2, 32)
    assert (config["block_size"], config["block_counts"], config["window_size"]) == (16, 4, 32)
    assert config["intermediate_size"] == 256 and config["hidden_act"] == "swish"
    assert (converted / "tokenizer.json").exists()


def test_converted_model_equals_dense_llama_before_the_first_compressed_block(llama_dir,
                                                                               converted):
    """With gates 0.5 and fewer than block_size tokens there is no compressed token yet
    (o_cmp = 0) and selection and window both see every position: o = 0.5*dense + 0.5*dense.
    So the converted model reproduces the Llama exactly there — RoPE, norms, MLP and the
    weight mapping included."""
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    nsa = NSAForCausalLM.from_pretrained(str(converted)).eval()
    ids = torch.arange(20, 35)[None]  # 15 tokens < block_size 16
    with torch.no_grad():
        torch.testing.assert_close(nsa(ids).logits, llama(ids).logits, atol=1e-4, rtol=1e-4)
        longer = torch.arange(20, 120)[None]
        assert (nsa(longer).logits - llama(longer).logits).abs().max() > 1e-3


def test_rejects_what_fla_cannot_express(llama_dir, tmp_path):
    for file in llama_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="llama3"):
        convert(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="select_topk=2"):
        convert(str(llama_dir), str(tmp_path / "out"), block_size=16, block_counts=2)
