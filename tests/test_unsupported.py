"""Everything vLLM offers that NSA does not support is rejected at engine start, naming the
value and what is supported, through the one owner of NSA's limits (vllm_nsa.support).

Engine-wide settings (NSA parameters, speculative decoding, fp8 KV cache, encoder-decoder)
are rejected while vLLM builds the engine config, before any engine process starts: the
caller of LLM(...) gets the error. What only the model code knows per layer (its own
sliding window, sinks, cross-layer KV sharing) is rejected when vLLM selects the layer's
backend or builds its impl, in the engine process; those engines run in a fresh process
with the engine core in-process, so the error is the process's exception. The checks are
the same on CPU and CUDA (vLLM's CUDA selector calls the same `validate_configuration`).
Models are config-only (`load_format="dummy"`), nothing is generated.
"""
import json
import re

import pytest

pytest.importorskip("vllm")

from engine_utils import run_in_fresh_process  # noqa: E402
from vllm_nsa.config import NSAConfig  # noqa: E402
from vllm_nsa.engine_runner import nsa_args, start_engine, stop_engine  # noqa: E402
from vllm_nsa.support import unsupported_reasons  # noqa: E402

pytestmark = pytest.mark.engine

LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=300, max_position_embeddings=1024,
             torch_dtype="float32")
NSA_MODEL = dict(model_type="nsa", architectures=["NSAForCausalLM"], hidden_size=64,
                 num_hidden_layers=1, num_heads=4, num_kv_heads=1, head_dim=32, block_size=16,
                 block_counts=3, window_size=32, vocab_size=300, max_position_embeddings=1024)
ENGINE = dict(load_format="dummy", skip_tokenizer_init=True, dtype="float32",
              max_model_len=512, enforce_eager=True, block_size=32)


def config_only_model(directory, config) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def start_rejected(model_dir, message, **kwargs):
    """The engine does not start; the error names `message`."""
    with pytest.raises(ValueError, match=message) as error:
        llm = start_engine(model=model_dir, **(ENGINE | kwargs))
        stop_engine(llm)
    print(str(error.value).splitlines()[1] if "\n" in str(error.value) else error.value)


# ------------------------------------------------------------------ engine-wide settings
def test_selection_score_limits():
    """"bounds" is a merged-mode scorer (an NSA model's gated mode is rejected) and needs
    pages that divide or are multiples of a selection block."""
    bounds = NSAConfig(selection_score="bounds")
    assert unsupported_reasons(bounds, gated=False, block_size=16) == []
    assert unsupported_reasons(bounds, block_size=128) == []
    assert re.match(r"selection_score='bounds' is not supported by an NSA model",
                    unsupported_reasons(bounds, gated=True)[0])
    assert re.match(r"block_size=48 is not supported by NSA with selection_score='bounds'",
                    unsupported_reasons(bounds, block_size=48)[0])
    assert unsupported_reasons(NSAConfig(), gated=True, block_size=48) == []


def test_triton_limits_apply_everywhere(tmp_path):
    """select_block=48 is a valid NSA parameter set, but the kernels tile selection blocks
    in powers of two: rejected at start on CPU as on CUDA (same function, same message)."""
    message = r"select_block=48 is not supported by NSA \(supported: a power of two >= 16"
    assert any(re.match(message, r) for r in unsupported_reasons(NSAConfig(select_block=48)))
    start_rejected(config_only_model(tmp_path, LLAMA), message,
                   **nsa_args({"select_block": 48}))


@pytest.mark.parametrize("model", ["dense", "nsa_model"])
def test_speculative_decoding_rejected(tmp_path, model):
    config = LLAMA if model == "dense" else NSA_MODEL
    backend = nsa_args() if model == "dense" else {}
    start_rejected(config_only_model(tmp_path, config),
                   r"speculative decoding \(method='ngram'\) is not supported by NSA "
                   r"\(supported: none",
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                       "prompt_lookup_max": 3}, **backend)


@pytest.mark.parametrize("model", ["dense", "nsa_model"])
def test_fp8_kv_cache_rejected(tmp_path, model):
    config = LLAMA if model == "dense" else NSA_MODEL
    backend = nsa_args() if model == "dense" else {}
    start_rejected(config_only_model(tmp_path, config),
                   r"kv_cache_dtype='fp8' is not supported by NSA \(supported: 'auto' = the "
                   r"model dtype", kv_cache_dtype="fp8", **backend)


def test_encoder_decoder_rejected(tmp_path):
    from transformers import WhisperConfig

    config = WhisperConfig(vocab_size=300, d_model=64, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                           max_target_positions=448).to_dict()
    config |= {"architectures": ["WhisperForConditionalGeneration"], "torch_dtype": "float32"}
    start_rejected(config_only_model(tmp_path, config),
                   r"encoder-decoder models are not supported by NSA \(supported: "
                   r"decoder-only models\)", **nsa_args(), max_model_len=448)


# ------------------------------------------------------------------ per-layer facts
def gemma4_kv_sharing_config() -> dict:
    """Gemma 4 text: its last `num_kv_shared_layers` layers read an earlier layer's cache."""
    from transformers import Gemma4TextConfig

    config = Gemma4TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, global_head_dim=32, vocab_size=300,
        vocab_size_per_layer_input=300, hidden_size_per_layer_input=16,
        layer_types=["full_attention"] * 3, num_kv_shared_layers=1, sliding_window=4096,
        max_position_embeddings=1024, per_layer_config={},
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}})
    return config.to_dict() | {"architectures": ["Gemma4ForCausalLM"],
                               "torch_dtype": "float32"}


LAYER_CASES = {
    # Mistral applies its sliding window in every layer.
    "sliding_window": (dict(LLAMA, model_type="mistral", architectures=["MistralForCausalLM"],
                            sliding_window=64),
                       r"sliding_window=64: models with their own sliding window are not "
                       r"supported by NSA \(supported: full-attention models"),
    # Granite with attention_sinks: a learned sink logit per head.
    "sinks": (dict(LLAMA, model_type="granite", architectures=["GraniteForCausalLM"],
                   attention_sinks=True),
              r"attention sinks are not supported by NSA \(supported: models without sink"),
    "kv_sharing": (None, r"cross-layer KV sharing \(this layer reads model\.layers\.1\.\S+ KV "
                         r"cache\) is not supported by NSA \(supported: every layer with its "
                         r"own KV cache\)"),
}

START_EACH = """
import json, sys
from vllm_nsa.engine_runner import nsa_args, start_engine, stop_engine
results = {}
for name, model_dir in json.loads(sys.argv[1]).items():
    try:
        stop_engine(start_engine(model=model_dir, **json.loads(sys.argv[2]), **nsa_args()))
        results[name] = "started"
    except Exception as error:
        results[name] = f"{type(error).__name__}: {error}"
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def layer_rejections(tmp_path_factory):
    """Each per-layer case's engine start, in one fresh process: name -> its error."""
    root = tmp_path_factory.mktemp("unsupported_layers")
    models = {name: config_only_model(root / name, config or gemma4_kv_sharing_config())
              for name, (config, _) in LAYER_CASES.items()}
    proc = run_in_fresh_process(START_EACH, json.dumps(models), json.dumps(ENGINE))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_feature_rejected(layer_rejections, case):
    print(layer_rejections[case])
    assert layer_rejections[case].startswith("ValueError")
    assert re.search(LAYER_CASES[case][1], layer_rejections[case])


def test_support_speaks_vllms_names():
    """vllm_nsa.support is importable without vLLM, so it spells vLLM's values itself."""
    from vllm.v1.attention.backend import AttentionType

    from vllm_nsa import support

    assert support.DECODER == AttentionType.DECODER
    assert unsupported_reasons(NSAConfig(), attn_type=AttentionType.ENCODER_DECODER)
