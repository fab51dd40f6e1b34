"""NSA kernels (Triton) and their torch twins; installed as ``vllm_nsa.kernels``.

reference.py: one sequence, torch (the math of NSA_SPEC.md, stage by stage);
paged.py: the torch twin over vLLM's paged caches (the CPU serving path);
triton/: the CUDA path, one module per stage. kernels/README.md maps them.
Importable without vLLM (and without a GPU: `triton/` is imported only when used).
"""
from vllm_nsa.kernels.reference import decode_read_counts, nsa_attention

__all__ = ["nsa_attention", "decode_read_counts"]
