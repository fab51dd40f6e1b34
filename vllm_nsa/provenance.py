"""Where a result was measured: the git commit, package versions and device every result
file of the benchmarks, GPU checks and evals records (one owner for these facts)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """$GIT_COMMIT (the device machine gets the work tree without .git), else the
    checkout's HEAD (+"-dirty" with uncommitted changes to tracked files); None when
    neither is known."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def device_name() -> str:
    """The CUDA device's name, "cpu" without CUDA."""
    try:
        import torch
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001  (the name is informational)
        return "unknown"


def versions() -> dict:
    """vLLM, torch and Triton versions (None where not installed)."""
    found = {}
    for name in ("vllm", "torch", "triton"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (informational)
            found[name] = None
    return found
