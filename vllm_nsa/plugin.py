"""The `vllm.general_plugins` entry point: checks the vLLM version and registers NSA.

vLLM calls every general plugin once per process (API server, engine core, workers), so
`register` is idempotent.
"""
from __future__ import annotations

import re

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [min, max) as (major, minor)


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = SUPPORTED_VLLM
    if not match or not low <= (int(match[1]), int(match[2])) < high:
        raise UnsupportedVLLMVersion(
            f"vllm-nsa supports vLLM >= {low[0]}.{low[1]} and < {high[0]}.{high[1]}; "
            f"found vLLM {version}")


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    _registered = True
