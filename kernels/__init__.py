"""NSA kernels (Triton) and their torch twins; installed as ``vllm_nsa.kernels``.

Importable without vLLM (and without a GPU: the Triton modules import lazily).
"""
from vllm_nsa.kernels.reference import decode_read_counts, nsa_attention

__all__ = ["nsa_attention", "decode_read_counts"]
