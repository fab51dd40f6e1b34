#!/usr/bin/env bash
# On the GPU machine, from the repo root, once the vLLM stack is in $VLLM_SITE (default
# /var/tmp/vllm-site; .gpu-stack/install.sh) and DIR holds .gpu-eval's parts joined and
# unpacked (evals/gpu_eval_pack.sh): installs the wheels and this tree's vllm_nsa into a
# folder of their own, $NSA_EVAL_SITE (default /var/tmp/nsa-eval-site; the stack's folder is
# left as it is: pip --target --upgrade would replace its bin/), checks that they import,
# and prepares DIR/SmolLM2-135M-Instruct: weights converted from the carried GGUF (checked
# against the CPU runs' sha256), every other file the CPU runs' (carried): the image's
# transformers 5.17 converts the GGUF's tokenizer otherwise than the 5.19 that made them
# (eos_token <|im_start|>, a byte-fallback decoder).
# Then run with PYTHONPATH=$NSA_EVAL_SITE:$VLLM_SITE (this copy of vllm_nsa, and of its vLLM
# plugin entry point, comes first).
#
#     bash evals/gpu_eval_install.sh DIR
set -euo pipefail
dir=$(cd "${1:?usage: evals/gpu_eval_install.sh DIR}" && pwd)
repo=$(pwd)
site=${NSA_EVAL_SITE:-/var/tmp/nsa-eval-site}
install() {  # pip's output only when it fails
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$@" >/tmp/gpu_eval_pip.log 2>&1 || { cat /tmp/gpu_eval_pip.log; exit 1; }
}
install "$dir"/whl/*.whl
install --no-build-isolation "$repo"
export PYTHONPATH=$site:${VLLM_SITE:-/var/tmp/vllm-site}
# From outside the repo root: its top-level kernels/ must not shadow the PyPI package.
cd /tmp
python3 - "$site" <<'EOF'
import importlib.metadata as md
import sys

import datasets  # noqa: F401
import lm_eval.tasks  # noqa: F401
import more_itertools  # noqa: F401 (lm-eval's vLLM model)
import nltk  # noqa: F401 (RULER; its punkt_tab check runs when the task loads)
import wonderwords  # noqa: F401

import vllm_nsa

assert vllm_nsa.__file__.startswith(sys.argv[1]), vllm_nsa.__file__

def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


print(", ".join(f"{d} {version(d)}" for d in (
    "vllm", "torch", "transformers", "lm_eval", "datasets", "nltk", "wonderwords", "gguf",
    "vllm-nsa")))
EOF
model=$dir/SmolLM2-135M-Instruct
python3 -m vllm_nsa.smollm2 --out "$model"
cp "$dir"/smollm2-files/* "$model"/
python3 - "$model" "$repo" <<'EOF'
import json
import sys
from pathlib import Path

from vllm_nsa.smollm2 import checkpoint_sha256

sha = checkpoint_sha256(sys.argv[1])
reference = Path(sys.argv[2], "evals/results/smollm2/gpu_check_cpu_reference.json")
expected = json.loads(reference.read_text())["checkpoint_sha256"]
print(f"{sys.argv[1]}: weights sha256 {sha[:12]}, " + (
    "the CPU runs' checkpoint" if sha == expected
    else f"WARNING: not the CPU runs' checkpoint ({expected[:12]})"))
EOF
