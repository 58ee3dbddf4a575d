# `make demo` and `make test` each set up .venv from scratch when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[torch,cpu,demo]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(BIN)/pip install -q -e ".[torch,cpu,test]"
	touch $@

demo: $(VENV)/.installed-base
	$(BIN)/python -m onnx_peft.demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check onnx_peft tests benchmarks examples

# Olive runs in its own venv (it pins its own dependencies); benchmarks/passes.py compares against it.
.venv-olive/bin/python:
	$(PY) -m venv .venv-olive
	.venv-olive/bin/pip install -q $(TORCH)
	.venv-olive/bin/pip install -q olive-ai==0.13.0 onnx onnxruntime onnxscript requests

bench: $(VENV)/.installed-test .venv-olive/bin/python
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/passes.py
	$(BIN)/python benchmarks/runtime.py

clean:
	rm -rf $(VENV) .venv-olive build *.egg-info
