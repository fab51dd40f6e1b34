"""How this project's tests, evals and benchmarks start vLLM engines (the one owner):
the keyword arguments that serve a model with NSA, this machine's defaults, starting and
stopping an engine, and running an engine job in a process of its own.

Importing this module does not import vLLM.
"""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# vLLM's CPU build reserves gpu_memory_utilization x the NUMA node's memory for the KV
# cache (its default 0.92 fails at start on these machines), and torch.compile costs
# minutes of warm-up on 2 cores.
CPU_DEFAULTS = {"gpu_memory_utilization": 0.3, "enforce_eager": True}
# NSA's CPU prefill of a multi-thousand-token chunk can outlast vLLM's default 300 s limit
# on one model step (2 shared cores); the engine then dies with "RPC call timed out". Set
# in the environment before the engine starts.
SLOW_STEP_ENV = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "7200"}


def nsa_args(nsa: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`LLM` keyword arguments that serve a dense model with NSA, parameters `nsa`
    (None or {}: the paper's defaults). NSA checkpoints need none: they always use NSA."""
    return {"attention_backend": "NSA", "additional_config": {"nsa": dict(nsa or {})}}


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(model: str, **kwargs: Any) -> dict[str, Any]:
    """`LLM` keyword arguments: `kwargs` over this machine's defaults (CPU_DEFAULTS on
    vLLM's CPU build, none on CUDA)."""
    return (CPU_DEFAULTS if on_cpu() else {}) | {"model": str(model)} | kwargs


def start_engine(**kwargs: Any):
    """`vllm.LLM(**kwargs)`. Scripts that call it must guard with
    `if __name__ == "__main__":` (vLLM spawns its engine-core process)."""
    from vllm import LLM

    return LLM(**kwargs)


def stop_engine(llm) -> None:
    """Shut the engine core down and free its memory before the next engine starts."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@contextlib.contextmanager
def engine(**kwargs: Any) -> Iterator[Any]:
    llm = start_engine(**kwargs)
    try:
        yield llm
    finally:
        stop_engine(llm)


def run_engine(model: str, prompts, sampling, **kwargs: Any) -> list:
    """Start an engine, generate, shut it down (one engine at a time on small machines).
    Returns [outputs]; with prefix caching on, the prompts run a second time without
    prompt logprobs (which bypass the prefix cache), now reading their prefixes from it,
    and the result is [outputs, outputs_from_cache]."""
    with engine(model=str(model), **kwargs) as llm:
        outputs = [llm.generate(prompts, sampling, use_tqdm=False)]
        if kwargs.get("enable_prefix_caching"):
            from vllm import SamplingParams

            plain = SamplingParams(max_tokens=sampling.max_tokens, temperature=0)
            outputs.append(llm.generate(prompts, plain, use_tqdm=False))
    return outputs


def start_isolated(command: list[str], *, env: Mapping[str, str],
                   log_path: str | Path | None, cwd: str | Path | None = None
                   ) -> subprocess.Popen:
    """Start one engine job (`command`) in a process of its own and a new process group,
    output to `log_path` (None: this process's stdout and stderr)."""
    log = open(log_path, "w") if log_path else None
    try:
        return subprocess.Popen(command, env=dict(env), cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT if log else None,
                                start_new_session=True)
    finally:
        if log:
            log.close()  # the child holds its own descriptor


def wait_isolated(proc: subprocess.Popen, timeout: float | None) -> str | None:
    """Wait for a job from `start_isolated`. On a timeout its whole process group is
    killed (its engine-core child too, which would otherwise keep its memory). Returns
    None on success, else why it failed."""
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timed out after {timeout:g} s"
    return f"exited with status {returncode}" if returncode else None


def run_isolated(command: list[str], *, env: Mapping[str, str], log_path: str | Path | None,
                 timeout: float | None, cwd: str | Path | None = None) -> str | None:
    """Run one engine job (`command`) in a process of its own: a second engine in one
    process does not reliably free GPU memory. Returns None on success, else why it
    failed (`wait_isolated`)."""
    return wait_isolated(start_isolated(command, env=env, log_path=log_path, cwd=cwd), timeout)
