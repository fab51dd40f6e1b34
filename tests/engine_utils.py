"""Helpers for tests that start vLLM engines (one at a time on this 2-core machine).
Starting and stopping engines is `vllm_nsa.engine_runner`'s (shared with evals and
benchmarks); this module holds what only the tests use."""
import gc
import os
import subprocess
import sys

import torch

from vllm_nsa.engine_runner import run_engine  # noqa: F401  (the tests' engine helper)

BLOCK_SIZE = 32   # CPU_ATTN needs a multiple of 32; NSA a multiple of compress_stride
# The engine settings of the equality tests: float32, eager, reproducible.
TEST_ENGINE = {"dtype": "float32", "max_model_len": 2048, "block_size": BLOCK_SIZE, "seed": 0,
               "enforce_eager": True}


def random_text(rng, num_chars):
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(num_chars // 5)]
    return " ".join(words)[:num_chars]


def tokens_of(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def prompt_logprobs_of(output):
    """Log-probability vLLM assigned to each actual prompt token (from position 1)."""
    ids = output.prompt_token_ids
    return torch.tensor([entry[ids[i]].logprob for i, entry in enumerate(output.prompt_logprobs)
                         if entry is not None])


def run_in_fresh_process(code: str, *args: str, timeout: float = 600
                         ) -> subprocess.CompletedProcess:
    """Run `code` (python -c) in a new interpreter with vLLM's engine core in that process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0: an engine's exceptions reach the caller, and several
    engines can run one after the other). vLLM's in-process engines leave process state
    behind (e.g. kernel registrations), hence a fresh process rather than pytest's."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------ in-process engines
# `LLM` runs its engine core in a child process. The scheduler tests need the scheduler,
# the block pool and the KV cache tensors in their own process: `start_inprocess_engine`
# builds vLLM's LLMEngine with the engine core in-process (what VLLM_ENABLE_V1_
# MULTIPROCESSING=0 gives) and `EngineInternals` names the objects the tests read.
INPROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def start_inprocess_engine(model, **engine_kwargs):
    """A vLLM LLMEngine whose EngineCore (scheduler, worker, KV cache) runs in this
    process; drive it with add_request / abort_request / step; stop it with
    `stop_inprocess_engine`. Defaults as `run_engine`'s."""
    from vllm import EngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor import Executor

    saved = {"env": os.environ.get(INPROCESS_ENV), "threads": torch.get_num_threads(),
             "set_num_threads": torch.set_num_threads}
    # vLLM's CPU platform picks its single-process executor only under this setting.
    os.environ[INPROCESS_ENV] = "0"
    engine_kwargs = {"dtype": "float32", "max_model_len": 2048, "block_size": BLOCK_SIZE,
                     "seed": 0, "enforce_eager": True, **engine_kwargs}
    try:
        vllm_config = EngineArgs(model=str(model), **engine_kwargs).create_engine_config(
            UsageContext.ENGINE_CONTEXT)
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
    import vllm.envs

    if saved["env"] is None:
        os.environ.pop(INPROCESS_ENV, None)
    else:
        os.environ[INPROCESS_ENV] = saved["env"]
    vllm.envs.disable_envs_cache()    # an engine core froze os.environ's vLLM variables
    torch.set_num_threads = saved["set_num_threads"]
    torch.set_num_threads(saved["threads"])


def stop_inprocess_engine(engine):
    """Shut the engine down and undo the process-wide state an in-process engine core
    leaves behind (vLLM's environment-variable cache, torch's thread setting)."""
    try:
        engine.engine_core.shutdown()
    finally:
        _restore_process(engine._nsa_saved)
        gc.collect()


class EngineInternals:
    """The in-process engine's scheduler, block pool, model runner and per-layer KV caches."""

    def __init__(self, engine):
        core = engine.engine_core.engine_core
        self.scheduler = core.scheduler
        self.kv_cache_manager = self.scheduler.kv_cache_manager
        self.block_pool = self.kv_cache_manager.block_pool
        self.runner = core.model_executor.driver_worker.worker.model_runner
        self.kv_caches = list(self.runner.kv_caches)     # one [B, H, N, C] view per layer

    @property
    def num_blocks(self):
        """Usable blocks (the pool's block 0 is vLLM's null block)."""
        return self.block_pool.num_gpu_blocks - 1

    def num_free_blocks(self):
        return self.block_pool.get_num_free_blocks()

    def blocks_held(self):
        """Blocks still listed in any request's block table."""
        return sum(len(blocks) for manager in self.kv_cache_manager.coordinator.single_type_managers
                   for blocks in manager.req_to_blocks.values())

    def whole_pages(self):
        """Per layer, a [num_blocks, page elements] view of each page as allocated, i.e. the
        raw K/V plus whatever a backend padded the page with (NSA's compressed entries)."""
        pages = []
        for kv in self.kv_caches:
            page = kv.stride(0)
            pages.append(torch.as_strided(kv, (kv.shape[0], page), (page, 1),
                                          kv.storage_offset()))
        return pages

    def poison(self, block_ids=None, value=float("nan")):
        """Fill whole pages (all of them when block_ids is None) with `value` in every layer."""
        for pages in self.whole_pages():
            if block_ids is None:
                pages.fill_(value)
            elif block_ids:
                pages[torch.tensor(sorted(block_ids))] = value

    def page_bits(self, block_id):
        """A page's exact bits in every layer (NaN-safe comparison of page contents)."""
        return torch.stack([pages[block_id].view(torch.uint8) for pages in self.whole_pages()])


# ------------------------------------------------------------------ `vllm-nsa serve`
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir, args, log_path, env=None, startup_seconds=240):
    """`vllm-nsa serve MODEL_DIR ARGS` on a free loopback port, waited for until /health
    answers; returns (process, base_url). Output goes to log_path."""
    import subprocess
    import sys
    import time

    import requests

    port = free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "vllm-nsa"), "serve",
               str(model_dir), "--host", "127.0.0.1", "--port", str(port), *args]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, **(env or {})))
    log.close()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.time() + startup_seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}:\n"
                               f"{open(log_path).read()[-4000:]}")
        try:
            if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process, base_url
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"vllm serve not healthy after {startup_seconds}s:\n"
                               f"{open(log_path).read()[-4000:]}")
        time.sleep(2)
