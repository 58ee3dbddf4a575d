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

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
