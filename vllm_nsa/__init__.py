"""vllm-nsa: Native Sparse Attention served by vLLM.

Importing this package does not import vLLM; `vllm_nsa.plugin.register` (the
`vllm.general_plugins` entry point) does the vLLM-side registration.
"""
from vllm_nsa.config import NSAConfig, NSAConfigError

__all__ = ["NSAConfig", "NSAConfigError"]
__version__ = "0.1.0"
