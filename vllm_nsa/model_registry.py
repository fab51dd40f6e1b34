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
        return None

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        from vllm_nsa.backend import NSAAttentionBackend
        from vllm_nsa.config import NSAConfigError
        from vllm_nsa.hf_nsa import validate_config

        config = model_config.hf_config
        validate_config(config)
        supported = NSAAttentionBackend.get_supported_head_sizes()
        if config.head_dim not in supported:
            raise NSAConfigError(
                f"NSA model: head_dim={config.head_dim} is not supported by the NSA backend "
                f"(supported: {supported})")


def register_model() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_nsa.hf_nsa import register_with_transformers

    register_with_transformers()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:Class" form: vllm_nsa.model imports the backend only when used.
        ModelRegistry.register_model(ARCHITECTURE, "vllm_nsa.model:NSAForCausalLM")
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, NSAModelConfigCheck)
