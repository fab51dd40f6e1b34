"""The torch oracle model of an NSA checkpoint (FLA format), and its config, in plain
transformers + torch.

`NSAModelConfig` parses the `config.json` of checkpoints trained with FLA/flame
(`model_type: "nsa"`, architecture `NSAForCausalLM`) with FLA's field names and defaults.
`NSAForCausalLM` loads the same checkpoints (FLA's parameter names) and runs attention
through the torch NSA reference (`vllm_nsa.kernels.reference.nsa_attention`) with FLA's
gates, so it is the oracle the vLLM model (`vllm_nsa.model`) is tested against. It
recomputes the whole prefix every step (no KV cache): it exists to be obviously right.

Named `NSAModelConfig` so it does not clash with `vllm_nsa.config.NSAConfig` (the NSA
attention parameters, derived from this config by `nsa_params`).
"""
from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vllm_nsa.config import NSAConfig, NSAConfigError
from vllm_nsa.kernels.reference import nsa_attention
from vllm_nsa.support import check_supported

logger = logging.getLogger(__name__)

# FLA's `NSABlock` does not pass `config.head_dim` to `NativeSparseAttention`, whose own
# default then applies: checkpoints may carry q/k/v shapes of this head size whatever
# config.json says.
FLA_LAYER_DEFAULT_HEAD_DIM = 64
SUPPORTED_ACTIVATIONS = ("swish", "silu")


class NSAModelConfig(PreTrainedConfig):
    """FLA's `NSAConfig` (fla/models/nsa/configuration_nsa.py): same fields, same defaults.

    The attribute map gives vLLM and transformers the Llama-style names they look for.
    """

    model_type = "nsa"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
        "rms_norm_eps": "norm_eps",
    }

    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_heads: int = 64
    num_kv_heads: int | None = 4
    head_dim: int = 32
    qkv_bias: bool = False
    block_size: int = 64
    block_counts: int | None = 16
    window_size: int | None = 512
    rope_theta: float | None = 10000.0
    max_position_embeddings: int = 2048
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    initializer_range: float = 0.02
    elementwise_affine: bool | None = True
    norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    fuse_norm: bool = True
    fuse_swiglu: bool = True
    fuse_cross_entropy: bool = True
    fuse_linear_cross_entropy: bool = False
    use_l2warp: bool = False
    vocab_size: int = 32000

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_kv_heads is None:  # FLA's attention layer reads None as "no GQA"
            self.num_kv_heads = self.num_heads
        checkpoint_dim = checkpoint_head_dim(self.name_or_path, self)
        if checkpoint_dim is not None and checkpoint_dim != self.head_dim:
            logger.warning(
                "NSA checkpoint %s: config.json says head_dim=%d but the q/k/v weights have "
                "head_dim=%d (FLA's NSABlock ignores config.head_dim); using %d",
                self.name_or_path, self.head_dim, checkpoint_dim, checkpoint_dim)
            self.head_dim = checkpoint_dim

    @property
    def mlp_intermediate_size(self) -> int:
        """FLA's GatedMLP rule: explicit size, else 2/3 * hidden_ratio * hidden, rounded up to
        a multiple of 256."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
        size = int(self.hidden_size * ratio * 2 / 3)
        return 256 * ((size + 255) // 256)


def nsa_params(config: NSAModelConfig) -> NSAConfig:
    """The NSA attention parameters of an FLA config (block_size, block_counts, window_size)."""
    return NSAConfig.from_hf_config(config)


def validate_config(config: NSAModelConfig) -> NSAConfig:
    """Reject checkpoint configs the NSA model cannot run, naming the offending values;
    returns the NSA params. What NSA itself supports is `vllm_nsa.support`'s (the vLLM
    model adds the engine's facts to it: `vllm_nsa.model_registry.check_nsa_model`)."""
    if config.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise NSAConfigError(
            f"NSA model: hidden_act={config.hidden_act!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    if config.block_counts is None or config.block_size is None:
        raise NSAConfigError(
            f"NSA model: block_size={config.block_size} and block_counts={config.block_counts} "
            f"must both be set")
    params = nsa_params(config)
    check_supported(params, "NSA model", num_heads=config.num_heads,
                    num_kv_heads=config.num_kv_heads)
    if params.window > config.max_position_embeddings:
        logger.info("NSA window=%d exceeds max_position_embeddings=%d: the window branch is dense",
                    params.window, config.max_position_embeddings)
    return params


def _safetensors_shapes(model_dir: str, names: list[str]) -> dict[str, list[int]]:
    """Shapes of the named tensors from the checkpoint's safetensors headers (no data read)."""
    from safetensors import safe_open

    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: weight_map[name] for name in names if name in weight_map}
    else:
        files = {name: "model.safetensors" for name in names}
    shapes = {}
    for name, file in files.items():
        path = os.path.join(model_dir, file)
        if not os.path.exists(path):
            continue
        with safe_open(path, framework="pt") as f:
            if name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


def checkpoint_head_dim(model_dir: str | None, config: NSAModelConfig) -> int | None:
    """The head size the checkpoint's first attention layer was trained with, or None when
    `model_dir` is not a local safetensors checkpoint. Raises if q/k/v disagree."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    prefix = "model.layers.0.attn."
    names = [f"{prefix}{p}_proj.weight" for p in ("q", "k", "v")]
    shapes = _safetensors_shapes(model_dir, names)
    if len(shapes) != 3:
        return None
    q_rows, k_rows, v_rows = (shapes[name][0] for name in names)
    num_kv_heads = config.num_kv_heads or config.num_heads
    if (q_rows % config.num_heads or k_rows != v_rows
            or k_rows * config.num_heads != q_rows * num_kv_heads):
        raise NSAConfigError(
            f"NSA checkpoint {model_dir}: q_proj has {q_rows} rows, k_proj {k_rows}, v_proj "
            f"{v_rows}; they do not fit num_heads={config.num_heads} and "
            f"num_kv_heads={num_kv_heads} with one head_dim")
    return q_rows // config.num_heads


# ------------------------------------------------------------------ layers
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA's RotaryEmbedding (GPT-NeoX halves, whole head rotated, float32 tables):
    [T, D/2] each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(positions.to(torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]: rotate (x1, x2) halves by the position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class NSAAttentionLayer(nn.Module):
    """FLA's NativeSparseAttention: q/k/v/g/o projections, RoPE, gated NSA."""

    def __init__(self, config: NSAModelConfig, params: NSAConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.params = params
        hidden = config.hidden_size
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.g_proj = nn.Linear(hidden, self.num_heads * 3, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden], every row a whole sequence starting at position 0."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        # g_proj's output is '(h 3)': head-major, then (cmp, slc, win).
        gates = torch.sigmoid(self.g_proj(x)).view(batch, length, self.num_heads, 3)
        cos, sin = rope_cos_sin(torch.arange(length, device=x.device), self.head_dim,
                                self.rope_theta)
        outputs = []
        for b in range(batch):
            out, _ = nsa_attention(apply_rope(q[b], cos, sin), apply_rope(k[b], cos, sin), v[b],
                                   self.params, gates=gates[b], scale=self.head_dim ** -0.5)
            outputs.append(out)
        return self.o_proj(torch.stack(outputs).reshape(batch, length, -1))


class NSAMLP(nn.Module):
    """FLA's GatedMLP with swish: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: NSAModelConfig):
        super().__init__()
        size = config.mlp_intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class NSABlock(nn.Module):
    def __init__(self, config: NSAModelConfig, params: NSAConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = NSAAttentionLayer(config, params)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = NSAMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class NSAPreTrainedModel(PreTrainedModel):
    config_class = NSAModelConfig
    config: NSAModelConfig
    base_model_prefix = "model"
    _no_split_modules = ["NSABlock"]

    def _init_weights(self, module: nn.Module) -> None:
        # FLA's initialisation: normal(0, initializer_range) for linears and embeddings.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class NSAModel(NSAPreTrainedModel):
    def __init__(self, config: NSAModelConfig):
        super().__init__(config)
        params = validate_config(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NSABlock(config, params)
                                    for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm(hidden)


class NSAForCausalLM(NSAPreTrainedModel, GenerationMixin):
    """FLA's NSAForCausalLM in plain torch (same parameter names), attention by the reference."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: NSAModelConfig):
        super().__init__(config)
        self.model = NSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs):
        # No KV cache: every step recomputes the whole prefix.
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("NSAForCausalLM (oracle) takes unpadded sequences only: run "
                             "different lengths one at a time")
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                               labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy continuation of one prompt: (token ids, their log-probabilities)."""
        ids = torch.tensor([prompt_ids])
        tokens, logprobs = [], []
        for _ in range(max_new_tokens):
            logits = self(ids).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return tokens, logprobs


def register_with_transformers() -> None:
    """Make AutoConfig / AutoModelForCausalLM resolve `model_type: "nsa"` offline (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("nsa", NSAModelConfig, exist_ok=True)
    AutoModelForCausalLM.register(NSAModelConfig, NSAForCausalLM, exist_ok=True)
