"""Helpers for tests that start vLLM engines (one at a time on this 2-core machine).
Starting and stopping engines is `vllm_nsa.engine_runner`'s (shared with evals and
benchmarks); this module holds what only the tests use."""
import os
import subprocess
import sys

import torch

from vllm_nsa.engine_runner import INPROCESS_DEFAULTS, run_engine  # noqa: F401

# The engine settings of the equality tests: float32, eager, reproducible, 32-token pages.
TEST_ENGINE = dict(INPROCESS_DEFAULTS)
BLOCK_SIZE = TEST_ENGINE["block_size"]


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
