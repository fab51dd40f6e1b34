"""Registers the NSA model architecture with vLLM and the FLA config with transformers.

Called from `vllm_nsa.plugin.register` (once per vLLM process); idempotent.
"""
from __future__ import annotations

ARCHITECTURE = "NSAForCausalLM"


class NSAModelConfigCheck:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`): it runs in the process that
    parses the engine arguments, so a bad NSA checkpoint config fails there with its own
    message instead of inside the engine-core process."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_nsa_model(vllm_config.model_config.hf_config, vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_nsa_model(model_config.hf_config)


def check_nsa_model(hf_config, vllm_config=None):
    """The NSA model's check (config hooks above, and `vllm_nsa.model` itself): the
    checkpoint config (`hf_nsa.validate_config`), then what NSA supports
    (`vllm_nsa.support`) for its shapes and, given a vLLM config, the engine's settings.
    Returns the NSA parameters; raises NSAConfigError naming every unsupported value."""
    from vllm_nsa.backend import engine_facts
    from vllm_nsa.hf_nsa import validate_config
    from vllm_nsa.support import check_supported

    params = validate_config(hf_config)
    check_supported(params, "NSA model", head_size=hf_config.head_dim,
                    head_size_label="head_dim", num_heads=hf_config.num_heads,
                    num_kv_heads=hf_config.num_kv_heads, gated=True,
                    **engine_facts(vllm_config))
    return params


def register_model() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_nsa.hf_nsa import register_with_transformers

    register_with_transformers()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:Class" form: vllm_nsa.model imports the backend only when used.
        ModelRegistry.register_model(ARCHITECTURE, "vllm_nsa.model:NSAForCausalLM")
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, NSAModelConfigCheck)
