"""The `vllm.general_plugins` entry point: checks the vLLM version and registers NSA.

vLLM runs every general plugin once per process (API server, engine core, workers) before
it parses `--attention-backend` or builds a model, so after `pip install` both
`vllm serve MODEL --attention-backend NSA` and `LLM(..., attention_backend="NSA")` find the
backend. `register` is idempotent.
"""
from __future__ import annotations

import re

from vllm_nsa.model_registry import register_model

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [min, max) as (major, minor)
BACKEND_NAME = "NSA"
BACKEND_PATH = "vllm_nsa.backend.NSAAttentionBackend"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = SUPPORTED_VLLM
    if not match or not low <= (int(match[1]), int(match[2])) < high:
        raise UnsupportedVLLMVersion(
            f"vllm-nsa supports vLLM >= {low[0]}.{low[1]} and < {high[0]}.{high[1]}; "
            f"found vLLM {version}")


def backend_member():
    """The `AttentionBackendEnum.NSA` member, registering it first if needed.

    A run-time enum member pickles by value, and vLLM's engine-core process unpickles its
    config before it loads plugins, where that value would be unknown; the member
    therefore pickles as a call of this function, which works in any process.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        member = AttentionBackendEnum.register(BACKEND_NAME, BACKEND_PATH)
        member.__reduce_ex__ = lambda protocol: (backend_member, ())
    return AttentionBackendEnum[BACKEND_NAME]


def register_backend() -> None:
    backend_member()


def honour_nsa_on_cpu() -> None:
    """vLLM's CPU platform replaces every requested backend but CPU_ATTN with CPU_ATTN
    (platforms/cpu.py). Wrap its selector so a request for NSA is validated like CUDA
    does and honoured; every other request goes to the original selector unchanged."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_nsa_wrapped", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is None or selected_backend.name != BACKEND_NAME:
            return original(selected_backend, attn_selector_config, num_heads)
        backend = selected_backend.get_class()
        reasons = backend.validate_configuration(device_capability=None,
                                                 **attn_selector_config._asdict())
        if reasons:
            raise ValueError(f"Selected backend {BACKEND_NAME} is not valid for this "
                             f"configuration: {'; '.join(reasons)}")
        return selected_backend.get_path()

    get_attn_backend_cls._nsa_wrapped = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def uses_nsa_backend(vllm_config) -> bool:
    backend = vllm_config.attention_config.backend
    return backend is not None and backend.name == BACKEND_NAME


def check_engines_at_start() -> None:
    """Reject unsupported settings of an engine asked to serve a model with NSA while vLLM
    builds its config (`VllmConfig.__post_init__` ends with the platform's
    `check_and_update_config`, on CPU and CUDA alike): the caller of `LLM(...)` or
    `vllm serve` gets the message, naming the value and what is supported, before any
    engine process starts. NSA models are checked by their own config hook
    (`vllm_nsa.model_registry`)."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = platform.check_and_update_config
    if getattr(original, "_nsa_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        if vllm_config.model_config is not None and uses_nsa_backend(vllm_config):
            from vllm_nsa.backend import check_engine

            check_engine(vllm_config)
        original(vllm_config)

    check_and_update_config._nsa_wrapped = True
    platform.check_and_update_config = classmethod(check_and_update_config)


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    register_backend()
    honour_nsa_on_cpu()
    check_engines_at_start()
    register_model()
    _registered = True
