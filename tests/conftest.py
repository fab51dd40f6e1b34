import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py and helpers import by name
# vLLM's CPU backend reserves gpu_memory_utilization x the NUMA node's memory by default,
# which this 24 GiB box cannot give several engines; 1 GiB of KV cache is plenty here.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# The Triton interpreter tests need TRITON_INTERPRET=1 from interpreter start and must not
# share a process with vLLM: `make test` runs them as a second pytest process.
INTERPRETER_TESTS = "test_triton_kernels.py"
if os.environ.get("TRITON_INTERPRET") == "1":
    collect_ignore_glob = [name for name in os.listdir(os.path.dirname(__file__))
                           if name.startswith("test_") and name != INTERPRETER_TESTS]
else:
    collect_ignore = [INTERPRETER_TESTS]
