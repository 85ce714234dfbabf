# Two commands on a fresh machine: `make train` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# These resolve from this machine's local disk; pyproject.toml keeps ranges for other environments.
PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv train test bench clean

# PYTHONWARNINGS hides setuptools' one notice on an editable install of this layout (cli/ installed as
# mobilenet_fn.cli): information, not a warning ("be careful with folders named like the package").
$(BIN)/mobilenet-fn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/pip install -q $(PINS) -e '.[test]'
	touch $@

venv: $(BIN)/mobilenet-fn

train: venv
	$(BIN)/mobilenet-fn train --data sample

test: venv
	$(BIN)/pytest -q

bench: venv
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
