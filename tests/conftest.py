import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py and helpers import by name
# vLLM's CPU backend reserves gpu_memory_utilization x the NUMA node's memory by default,
# which this 24 GiB box cannot give several engines; 1 GiB of KV cache is plenty here.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
