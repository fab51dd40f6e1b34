"""The transformers-side NSA model (vllm_nsa.hf_nsa): FLA config, checkpoint I/O, FLA
cross-check of the attention layer, generation, config validation. No vLLM engine."""
import json

import pytest
import torch

from vllm_nsa.config import NSAConfigError
from vllm_nsa.hf_nsa import (
    NSAAttentionLayer,
    NSAForCausalLM,
    NSAModelConfig,
    nsa_params,
    register_with_transformers,
    validate_config,
)
from vllm_nsa.tiny import build_tiny_nsa


def tiny_config(**overrides):
    fields = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=1,
                  head_dim=32, block_size=16, block_counts=3, window_size=32, vocab_size=259,
                  max_position_embeddings=512, initializer_range=0.2)
    fields.update(overrides)
    return NSAModelConfig(**fields)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_nsa")
    build_tiny_nsa(str(path), num_heads=4, num_kv_heads=1, seed=3)
    return path


# ------------------------------------------------------------------ config
def test_config_has_fla_fields_and_defaults():
    config = NSAModelConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_heads,
            config.num_kv_heads, config.head_dim) == (2048, 24, 64, 4, 32)
    assert (config.block_size, config.block_counts, config.window_size) == (64, 16, 512)
    assert (config.hidden_act, config.norm_eps, config.rope_theta) == ("swish", 1e-6, 10000.0)
    assert config.model_type == "nsa"
    # Llama-style aliases that vLLM reads
    assert (config.num_attention_heads, config.num_key_value_heads) == (64, 4)
    # FLA's GatedMLP sizing: 2/3 * 4 * 2048 = 5461.33 -> rounded up to a multiple of 256
    assert config.mlp_intermediate_size == 5632
    assert NSAModelConfig(intermediate_size=100).mlp_intermediate_size == 100


def test_nsa_params_from_fla_fields():
    params = nsa_params(tiny_config(block_size=32, block_counts=5, window_size=64))
    assert (params.compress_block, params.compress_stride, params.select_block,
            params.select_topk, params.window) == (32, 32, 32, 5, 64)


@pytest.mark.parametrize("overrides,message", [
    ({"num_heads": 6, "num_kv_heads": 4}, "num_heads=6 is not a multiple of num_kv_heads=4"),
    ({"block_counts": 2}, "select_topk=2 must be >= init_blocks"),
    ({"block_size": 0}, "must be >= 1"),
    ({"window_size": -4}, "window=-4 must be >= 0"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_invalid_configs_are_rejected_with_their_values(overrides, message):
    with pytest.raises(NSAConfigError, match=message):
        validate_config(tiny_config(**overrides))
    with pytest.raises(NSAConfigError, match=message):
        NSAForCausalLM(tiny_config(**overrides))


def test_checkpoint_shapes_win_over_config_head_dim(tiny_dir, tmp_path):
    """FLA's NSABlock ignores config.head_dim: a config.json that disagrees with the
    weights is corrected from the weights' shapes."""
    for file in tiny_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["head_dim"] = 8
    config_path.write_text(json.dumps(config))
    register_with_transformers()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(tmp_path)).head_dim == 32
    config["num_kv_heads"] = 2  # k_proj rows no longer fit num_kv_heads * head_dim
    config_path.write_text(json.dumps(config))
    with pytest.raises(NSAConfigError, match="q_proj has 128 rows, k_proj 32"):
        AutoConfig.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------ FLA cross-check
fla_naive = pytest.importorskip("fla.ops.nsa.naive")


@pytest.fixture
def fla_on_cpu(monkeypatch):
    """FLA's naive NSA uses a Triton mean-pooling and flash-attn for the window: substitute
    torch versions with their semantics (FLA's window_size=(w-1, 0))."""
    def mean_pooling(x, chunk_size, cu_seqlens=None):
        batch, length, heads, dim = x.shape
        pad = (-length) % chunk_size
        counts = torch.full((length + pad,), 1.0).view(-1, chunk_size)
        counts[-1, chunk_size - pad:] = 0
        padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        sums = padded.view(batch, -1, chunk_size, heads, dim).sum(2)
        return (sums / counts.sum(-1).view(1, -1, 1, 1)).to(x.dtype)

    def flash_attn_func(q, k, v, causal, window_size):
        groups = q.shape[2] // k.shape[2]
        k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        pos = torch.arange(q.shape[1])
        visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window_size[0])
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v)

    monkeypatch.setattr(fla_naive, "mean_pooling", mean_pooling)
    monkeypatch.setattr(fla_naive, "flash_attn_func", flash_attn_func, raising=False)


def fla_layer_forward(layer: NSAAttentionLayer, x: torch.Tensor, config: NSAModelConfig):
    """FLA's NativeSparseAttention.forward, written with FLA's naive NSA and transformers'
    (independent) GPT-NeoX RoPE."""
    from transformers.models.llama.modeling_llama import rotate_half

    batch, length, _ = x.shape
    d = config.head_dim
    q = layer.q_proj(x).view(batch, length, -1, d)
    k = layer.k_proj(x).view(batch, length, -1, d)
    v = layer.v_proj(x).view(batch, length, -1, d)
    g_cmp, g_slc, g_swa = layer.g_proj(x).view(batch, length, -1, 3).sigmoid().unbind(-1)
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(length).float()[:, None] * inv_freq
    cos = torch.cat([angles.cos()] * 2, -1)[None, :, None]
    sin = torch.cat([angles.sin()] * 2, -1)[None, :, None]
    q, k = (t * cos + rotate_half(t) * sin for t in (q, k))
    o = fla_naive.naive_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa,
                            block_counts=config.block_counts, block_size=config.block_size,
                            window_size=config.window_size)
    return layer.o_proj(o.reshape(batch, length, -1))


@pytest.mark.parametrize("window_size,length", [(0, 100), (24, 100), (40, 37)])
def test_attention_layer_matches_fla_naive(fla_on_cpu, window_size, length):
    # FLA's naive path asserts G = HQ / H is a power of two >= 16.
    config = tiny_config(num_heads=16, num_kv_heads=1, head_dim=32, block_size=16,
                         block_counts=4, window_size=window_size)
    torch.manual_seed(5)
    layer = NSAAttentionLayer(config, nsa_params(config))
    for linear in (layer.q_proj, layer.k_proj, layer.g_proj):
        torch.nn.init.normal_(linear.weight, std=0.3)
    x = torch.randn(2, length, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fla_layer_forward(layer, x, config),
                                   atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ model
def test_save_load_and_generate_agree(tiny_dir):
    register_with_transformers()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    assert isinstance(model, NSAForCausalLM)
    assert model.model.layers[0].attn.g_proj.weight.shape == (4 * 3, 64)
    prompt = list(range(40, 140))  # 100 tokens > window 32 + 3 blocks * 16
    tokens, logprobs = model.greedy(prompt, 6)
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                               use_cache=False)
    assert generated[0, len(prompt):].tolist() == tokens
    assert all(lp < 0 for lp in logprobs)


def test_every_gate_changes_the_output(tiny_dir):
    """The tiny models are useful oracles only if every gate matters at test lengths."""
    model = NSAForCausalLM.from_pretrained(str(tiny_dir)).eval()
    ids = torch.arange(40, 140)[None]
    with torch.no_grad():
        base = model(ids).logits
        g_proj = model.model.layers[0].attn.g_proj.weight
        for branch in range(3):
            saved = g_proj[branch::3].clone()
            g_proj[branch::3] = 0
            changed = model(ids).logits
            g_proj[branch::3] = saved
            assert (changed - base).abs().max() > 1e-3, f"branch {branch} has no effect"


def test_padding_is_refused(tiny_dir):
    model = NSAForCausalLM.from_pretrained(str(tiny_dir))
    with pytest.raises(ValueError, match="unpadded"):
        model(torch.ones(2, 5, dtype=torch.long),
              attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]))
