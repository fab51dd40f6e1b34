"""vLLM `NSAForCausalLM`: FLA-format NSA checkpoints served with the NSA attention backend.

A Llama-style decoder (RMSNorm, SwiGLU MLP, GPT-NeoX RoPE on the whole head as FLA's
RotaryEmbedding applies it) whose attention is FLA's NativeSparseAttention: q/k/v/o plus a
`g_proj` giving per-head sigmoid gates for the three NSA branches. Parameter names follow
FLA (`model.embeddings`, `layers.N.attn.{q,k,v,g,o}_proj`, `attn_norm`, `mlp_norm`), so an
FLA/flame checkpoint loads with no conversion.

How the gates reach attention. The attention layer runs in the backend's gated mode: it
writes the three branch outputs per head, [T, HQ, 3, D] in (cmp, slc, win) order, into the
output buffer vLLM preallocates (`output_shape`, 3x the usual width), and this model
combines them with its gates after the call. The gates never travel into the backend, so
- torch.compile: attention stays the one opaque splitting op with its usual (q, k, v) ->
  output signature; g_proj, sigmoid and the weighted sum are ordinary graph code on either
  side of the split and compile with the rest of the layer;
- CUDA graphs: the branch buffer is allocated from the static `output_shape` like any
  attention output, and no per-step side tensor has to be kept at a fixed address.
The price is a 3x wider attention output (T x HQ x 3D), small next to the KV reads.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from vllm_nsa.backend import NSAAttentionBackend
from vllm_nsa.config import NSAConfig, NSAConfigError
from vllm_nsa.hf_nsa import NSAModelConfig
from vllm_nsa.model_registry import check_nsa_model

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logging config

NUM_BRANCHES = 3  # (cmp, slc, win), FLA's g_proj order


class NSAAttention(nn.Module):
    """FLA's NativeSparseAttention on vLLM's paged KV cache, through the NSA backend."""

    def __init__(self, config: NSAModelConfig, params: NSAConfig,
                 cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads // tp_size
        self.num_kv_heads = max(1, config.num_kv_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        hidden = config.hidden_size

        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden, head_size=self.head_dim, total_num_heads=config.num_heads,
            total_num_kv_heads=config.num_kv_heads, bias=config.qkv_bias,
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        # Rows are '(h 3)' (head-major): an even column split hands each rank the gates of
        # exactly the query heads its q_proj shard holds.
        self.g_proj = ColumnParallelLinear(
            hidden, config.num_heads * NUM_BRANCHES, bias=False, quant_config=None,
            prefix=f"{prefix}.g_proj")
        self.o_proj = RowParallelLinear(
            config.num_heads * self.head_dim, hidden, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim ** -0.5,
            num_kv_heads=self.num_kv_heads, cache_config=cache_config,
            quant_config=quant_config, prefix=f"{prefix}.attn",
            attn_backend=NSAAttentionBackend.for_config(params), nsa_config=params,
            gated=True)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        gates, _ = self.g_proj(hidden_states)
        num_tokens = hidden_states.shape[0]
        branches = self.attn(q, k, v, output_shape=torch.Size(
            (num_tokens, self.num_heads * NUM_BRANCHES * self.head_dim)))
        branches = branches.view(num_tokens, self.num_heads, NUM_BRANCHES, self.head_dim)
        gates = torch.sigmoid(gates).view(num_tokens, self.num_heads, NUM_BRANCHES, 1)
        out = (branches * gates.to(branches.dtype)).sum(dim=2)
        out, _ = self.o_proj(out.reshape(num_tokens, self.q_size))
        return out


class NSAMLP(nn.Module):
    def __init__(self, config: NSAModelConfig, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        size = config.mlp_intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size] * 2, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class NSADecoderLayer(nn.Module):
    def __init__(self, config: NSAModelConfig, params: NSAConfig,
                 cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = NSAAttention(config, params, cache_config, quant_config,
                                 prefix=f"{prefix}.attn")
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = NSAMLP(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.attn_norm(hidden_states)
        else:
            hidden_states, residual = self.attn_norm(hidden_states, residual)
        hidden_states = self.attn(positions, hidden_states)
        hidden_states, residual = self.mlp_norm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={
    "input_ids": {0: "b"}, "positions": {0: "b"}, "intermediate_tensors": {0: "b"},
    "inputs_embeds": {0: "b"}})
class NSAModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        params = check_nsa_model(config, vllm_config)
        logger.info(
            "NSAForCausalLM: every attention layer uses the NSA backend (%s), whatever "
            "--attention-backend says; NSA parameters from the checkpoint config: %s",
            NSAAttentionBackend.get_name(), params.describe())
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            NSADecoderLayer(config, params, vllm_config.cache_config,
                            vllm_config.quant_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = (inputs_embeds if inputs_embeds is not None
                         else self.embed_input_ids(input_ids))
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# checkpoint name fragment -> (vLLM parameter fragment, shard id) for fused projections
STACKED_PARAMS = (
    (".q_proj", ".qkv_proj", "q"),
    (".k_proj", ".qkv_proj", "k"),
    (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
)


def expected_checkpoint_shapes(config: NSAModelConfig) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shapes of the attention weights a config implies, by name suffix."""
    hidden, dim = config.hidden_size, config.head_dim
    return {
        "attn.q_proj.weight": (config.num_heads * dim, hidden),
        "attn.k_proj.weight": (config.num_kv_heads * dim, hidden),
        "attn.v_proj.weight": (config.num_kv_heads * dim, hidden),
        "attn.g_proj.weight": (config.num_heads * NUM_BRANCHES, hidden),
        "attn.o_proj.weight": (hidden, config.num_heads * dim),
    }


class NSAForCausalLM(nn.Module):
    """vLLM architecture `NSAForCausalLM` (FLA's name) for `model_type: "nsa"` checkpoints."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = NSAModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embeddings)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        expected = expected_checkpoint_shapes(self.config)
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied to model.embeddings.weight
            for suffix, shape in expected.items():
                if name.endswith(suffix) and tuple(tensor.shape) != shape:
                    raise NSAConfigError(
                        f"NSA checkpoint tensor {name} has shape {tuple(tensor.shape)} but the "
                        f"config (hidden_size={self.config.hidden_size}, num_heads="
                        f"{self.config.num_heads}, num_kv_heads={self.config.num_kv_heads}, "
                        f"head_dim={self.config.head_dim}) implies {shape}")
            for ckpt_part, param_part, shard_id in STACKED_PARAMS:
                if ckpt_part in name:
                    param = params[name.replace(ckpt_part, param_part)]
                    param.weight_loader(param, tensor, shard_id)
                    break
            else:
                if name not in params:
                    raise NSAConfigError(
                        f"NSA checkpoint tensor {name} has no counterpart in NSAForCausalLM "
                        f"(expected FLA's parameter names)")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
                continue
            loaded.add(name.replace(ckpt_part, param_part))
        return loaded
