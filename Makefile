# Two commands on a fresh machine: `make train` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# These resolve from this machine's local disk; pyproject.toml keeps ranges for other environments.
PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv train test test-avx2 docs-check bench clean

# Modules are compiled to bytecode as they are first imported, not all of them at install (pip --no-compile: the
# tests import a small part of torch). Where PYTHONDONTWRITEBYTECODE is set, nothing would be kept and every
# process would compile torch anew: the commands below run without it.
unexport PYTHONDONTWRITEBYTECODE

# PYTHONWARNINGS hides setuptools' one notice on an editable install of this layout (cli/ installed as
# mobilenet_fn.cli): information, not a warning ("be careful with folders named like the package").
# uv unpacks the wheels in parallel (torch's CUDA build is 5.9 GB installed): the venv in 25 s against pip's 70 s
# here. `make venv INSTALLER=pip` installs with pip alone, e.g. where only pip's configuration names your index.
INSTALLER ?= uv

$(BIN)/mobilenet-fn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),uv)
	$(BIN)/pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python $(PINS) -e '.[test]'
else
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/pip install -q --no-compile $(PINS) -e '.[test]'
endif
	touch $@

venv: $(BIN)/mobilenet-fn

train: venv
	$(BIN)/mobilenet-fn train --data sample

test: venv
	$(BIN)/pytest -q

# The tests whose outcome could hang on the CPU's kernels (they train, quantize or audit: pytest -m kernels), run
# with the kernels of a CPU that has AVX2 and nothing newer, whatever this machine has.
AVX2_KERNELS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
# Inductor's on-disk cache keeps code compiled for this machine's instructions, which a capped run must not reuse
# (the bf16 step it compiled then gave NaN): the capped run has a cache of its own.
test-avx2: venv
	$(AVX2_KERNELS) TORCHINDUCTOR_CACHE_DIR=$(abspath $(VENV))/inductor-avx2 $(BIN)/pytest -q -m kernels

# The command blocks of README.md and docs/*.md marked to run (the README's make train and make test among them),
# and the links between the pages: docs/tests.md says how blocks are marked.
docs-check: venv
	$(PYTHON) tools/docs_check.py $(DOCS_CHECK_ARGS)

bench: venv
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
