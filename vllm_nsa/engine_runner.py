"""How this project's tests, evals and benchmarks start vLLM engines (the one owner):
the keyword arguments that serve a model with NSA, this machine's defaults, starting and
stopping an engine (`LLM`, or an engine core in this process), running an engine job in a
process of its own, and counting an engine's CUDA-graph replays.

Importing this module does not import vLLM.
"""
from __future__ import annotations

import contextlib
import gc
import json
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
# The in-process engines' defaults (`start_inprocess_engine`; the tests' equality engines
# too): float32, eager, reproducible; 32-token pages (CPU_ATTN needs a multiple of 32, NSA
# one of compress_stride).
INPROCESS_DEFAULTS = {"dtype": "float32", "max_model_len": 2048, "block_size": 32, "seed": 0,
                      "enforce_eager": True}
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
    """Wait for a job from `start_isolated`; then kill whatever is left of its process
    group: on a timeout the job itself, and in any case its engine-core child, which
    outlives a job that exits without shutting its engine down (the eval workers exit
    with os._exit) and would keep its memory. Returns None on success, else why it
    failed."""
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()
        return f"timed out after {timeout:g} s"
    kill_group(proc)
    return f"exited with status {returncode}" if returncode else None


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to every process left in the process group `start_isolated` made."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing of the group is left
        pass


def run_isolated(command: list[str], *, env: Mapping[str, str], log_path: str | Path | None,
                 timeout: float | None, cwd: str | Path | None = None) -> str | None:
    """Run one engine job (`command`) in a process of its own: a second engine in one
    process does not reliably free GPU memory. Returns None on success, else why it
    failed (`wait_isolated`)."""
    return wait_isolated(start_isolated(command, env=env, log_path=log_path, cwd=cwd), timeout)


def run_job(job_fn, job_path: str | Path, result_path: str | Path) -> int:
    """The job process's side of `run_isolated`: `job_fn` of the JSON job in job_path,
    its JSON result written to result_path."""
    result = job_fn(json.loads(Path(job_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------ in-process engines
# `LLM` runs its engine core in a child process. The scheduler fuzz needs the scheduler,
# the block pool and the KV cache tensors in its own process: `start_inprocess_engine`
# builds vLLM's LLMEngine with the engine core in-process (what VLLM_ENABLE_V1_
# MULTIPROCESSING=0 gives); `vllm_nsa.scheduler_fuzz.EngineInternals` names the objects.
INPROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def start_inprocess_engine(model, **kwargs: Any):
    """A vLLM LLMEngine whose EngineCore (scheduler, worker, KV cache) runs in this
    process; drive it with add_request / abort_request / step; stop it with
    `stop_inprocess_engine`. `kwargs` over INPROCESS_DEFAULTS."""
    import torch

    from vllm import EngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor import Executor

    saved = {"env": os.environ.get(INPROCESS_ENV), "threads": torch.get_num_threads(),
             "set_num_threads": torch.set_num_threads}
    # vLLM's CPU platform picks its single-process executor only under this setting.
    os.environ[INPROCESS_ENV] = "0"
    try:
        vllm_config = EngineArgs(model=str(model), **(INPROCESS_DEFAULTS | kwargs)
                                 ).create_engine_config(UsageContext.ENGINE_CONTEXT)
        engine = LLMEngine(vllm_config=vllm_config,
                           executor_class=Executor.get_class(vllm_config),
                           log_stats=False, multiprocess_mode=False)
    except BaseException:
        _restore_process(saved)
        raise
    # vLLM's CPU worker replaces torch.set_num_threads (process-wide) by a no-op before
    # its own "reduce Torch threads to 1 for serving" runs, so in-process the engine kept
    # every core's OpenMP thread: spin-waiting on a shared 2-core machine made each step
    # 3-20x slower. One thread, as a vLLM engine process runs.
    saved["set_num_threads"](1)
    engine._nsa_saved = saved
    return engine


def _restore_process(saved):
    import torch

    import vllm.envs

    if saved["env"] is None:
        os.environ.pop(INPROCESS_ENV, None)
    else:
        os.environ[INPROCESS_ENV] = saved["env"]
    vllm.envs.disable_envs_cache()    # an engine core froze os.environ's vLLM variables
    torch.set_num_threads = saved["set_num_threads"]
    torch.set_num_threads(saved["threads"])


def stop_inprocess_engine(engine) -> None:
    """Shut the engine down and undo the process-wide state an in-process engine core
    leaves behind (vLLM's environment-variable cache, torch's thread setting)."""
    try:
        engine.engine_core.shutdown()
    finally:
        _restore_process(engine._nsa_saved)
        gc.collect()


# ------------------------------------------------------------------ CUDA graphs
def count_graph_replays() -> dict[str, int]:
    """Counters of the CUDA-graph replays in this process from now on, kept up to date:
    "graph", every replay (piecewise pieces and full graphs); "full", the full-graph
    replays of vLLM's (V2) model runner. They stay 0 without CUDA. Call before the engine
    starts."""
    import torch

    replays = {"graph": 0, "full": 0}
    if not torch.cuda.is_available():
        return replays
    from vllm.v1.worker.gpu import cudagraph_utils

    graph_replay = torch.cuda.CUDAGraph.replay
    full_replay = cudagraph_utils.CudaGraphManager.run_fullgraph

    def counted_graph_replay(self, *args, **kwargs):
        replays["graph"] += 1
        return graph_replay(self, *args, **kwargs)

    def counted_full_replay(self, *args, **kwargs):
        replays["full"] += 1
        return full_replay(self, *args, **kwargs)

    torch.cuda.CUDAGraph.replay = counted_graph_replay
    cudagraph_utils.CudaGraphManager.run_fullgraph = counted_full_replay
    return replays
